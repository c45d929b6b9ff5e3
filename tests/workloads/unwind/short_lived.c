/* Processes that live a few milliseconds.
 *   short_lived spawn SECONDS ITERATIONS  runs `short_lived work ITERATIONS`
 *                                        one after another for SECONDS and
 *                                        prints how many it ran;
 *   short_lived work ITERATIONS          main -> work -> mid -> leaf, the
 *                                        leaf spinning for ITERATIONS.
 * The launcher renames itself `launcher`, so every sample named
 * `short_lived` is from a process that lived milliseconds. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) unsigned long leaf(unsigned long n) {
    volatile unsigned long acc = n;
    for (unsigned long i = 0; i < n; i++)
        acc = acc * 6364136223846793005UL + 1442695040888963407UL;
    return acc;
}

__attribute__((noinline)) unsigned long mid(unsigned long n) { return leaf(n) ^ n; }

__attribute__((noinline)) unsigned long work(unsigned long n) { return mid(n) + 1; }

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "work") == 0)
        return (int)(work(strtoul(argv[2], NULL, 10)) & 1) * 0;
    if (argc != 4 || strcmp(argv[1], "spawn") != 0) {
        fprintf(stderr, "usage: short_lived spawn SECONDS ITERATIONS | work ITERATIONS\n");
        return 2;
    }
    char self[4096];
    ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    if (len <= 0)
        return 1;
    self[len] = 0;
    prctl(PR_SET_NAME, "launcher");
    double end = now() + atof(argv[2]);
    unsigned long runs = 0;
    while (now() < end) {
        pid_t pid = fork();
        if (pid < 0)
            return 1;
        if (pid == 0) {
            execl(self, "short_lived", "work", argv[3], (char *)NULL);
            _exit(127);
        }
        int status;
        if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
            return 1;
        runs++;
    }
    printf("%lu\n", runs);
    return 0;
}
