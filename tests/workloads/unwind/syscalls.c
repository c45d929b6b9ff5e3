/* Time in system calls under a nested chain: gcc -O2 -g (no frame
 * pointers). Most samples are taken in kernel mode, inside write(2) to
 * /dev/null; the user part of their stacks starts at glibc's write wrapper.
 *
 * Expected chains (share of the process's samples), each with kernel frames
 * above the user frames (glibc's write, then the kernel's):
 *   main -> run -> pump -> emit_a -> write ...   75 %
 *   main -> run -> pump -> emit_b -> write ...   25 %
 * Each round emit_a makes three times as many one-byte writes as emit_b (the
 * same call, so the same cost each; emit_b's 20k-80k writes take 6-25 ms). */
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include "work.h"

__attribute__((noipa)) unsigned long emit_a(int fd, unsigned long n) {
    unsigned long written = 0;
    for (unsigned long i = 0; i < n; i++)
        written += write(fd, "a", 1) == 1;
    return written;
}

__attribute__((noipa)) unsigned long emit_b(int fd, unsigned long n) {
    unsigned long written = 0;
    for (unsigned long i = 0; i < n; i++)
        written += write(fd, "b", 1) == 1;
    return written;
}

__attribute__((noipa)) unsigned long pump(int fd, unsigned long n) {
    unsigned long a = emit_a(fd, 3 * n);
    KEEP(a);
    unsigned long b = emit_b(fd, n);
    KEEP(b);
    return a + b;
}

__attribute__((noipa)) unsigned long run(int fd, double seconds) {
    unsigned long rng = 88172645463325252UL, written = 0;
    double end = now() + seconds;
    while (now() < end) {
        written += pump(fd, 20000 + next_random(&rng) % 60000);
        KEEP(written);
    }
    return written;
}

int main(int argc, char **argv) {
    int fd = open("/dev/null", O_WRONLY);
    if (fd < 0) {
        perror("open /dev/null");
        return 1;
    }
    printf("%lu\n", run(fd, seconds_arg(argc, argv)));
    return 0;
}
