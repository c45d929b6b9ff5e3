// Off-CPU workload with known waits.
//
//   offcpu sleep SECONDS
//     One thread sleeps 3 ms in sleep_long, then 1 ms in sleep_short, in
//     turn: its time off the CPU splits 3:1 between the two stacks.
//
// Built with -O2 and no frame pointers: the stacks are unwound from the
// registers saved at the system call.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_ns(long ns) {
    struct timespec ts = {0, ns};
    nanosleep(&ts, NULL);
}

// The empty asm after each call keeps it from being a tail call, so the
// function's own frame stays on the stack while it sleeps.
__attribute__((noinline)) void sleep_long(void) {
    sleep_ns(3000000);
    __asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) void sleep_short(void) {
    sleep_ns(1000000);
    __asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) void sleeper(double seconds) {
    double end = now() + seconds;
    while (now() < end) {
        sleep_long();
        sleep_short();
    }
    __asm__ volatile("" ::: "memory");
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "sleep") == 0) {
        sleeper(atof(argv[2]));
        return 0;
    }
    fprintf(stderr, "usage: offcpu sleep SECONDS\n");
    return 2;
}
