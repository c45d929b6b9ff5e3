/* Footprint benchmark workload: a long-lived process that wakes every
 * PERIOD_MS milliseconds, works for about WORK_US microseconds a few frames
 * deep (serve -> handle -> crunch), and sleeps again: a daemon serving a
 * trickle of requests. The first wake-up is offset by the pid so that many
 * copies do not wake in step. Runs until killed. */
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static long now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000L + t.tv_nsec / 1000;
}

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, 0);
}

__attribute__((noinline)) unsigned long crunch(long until_us) {
    volatile unsigned long acc = 1;
    while (now_us() < until_us)
        for (int i = 0; i < 10000; i++)
            acc = acc * 6364136223846793005UL + 1442695040888963407UL;
    return acc;
}

__attribute__((noinline)) unsigned long handle(long work_us) {
    return crunch(now_us() + work_us) + 1;
}

__attribute__((noinline)) unsigned long serve(long period_ms, long work_us) {
    unsigned long sink = 0;
    sleep_ms(getpid() % period_ms);
    for (;;) {
        sink += handle(work_us);
        sleep_ms(period_ms);
    }
    return sink;
}

int main(int argc, char **argv) {
    long period_ms = argc > 1 ? atol(argv[1]) : 500;
    long work_us = argc > 2 ? atol(argv[2]) : 2000;
    if (period_ms < 1)
        period_ms = 1;
    return (int)(serve(period_ms, work_us) & 1);
}
