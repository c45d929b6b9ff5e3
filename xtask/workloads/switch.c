/* Off-CPU benchmark workload: `switch THREADS PERIOD_US`: THREADS threads
 * each sleep PERIOD_US microseconds in a loop (wait -> pause ->
 * nanosleep), so the host does about THREADS * 1e6 / PERIOD_US context
 * switches a second, every wait as long as the period. Runs until killed. */
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

static long period_us;

__attribute__((noinline)) static void pause_once(void) {
    struct timespec t = {period_us / 1000000, (period_us % 1000000) * 1000L};
    nanosleep(&t, 0);
    __asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) static void *wait_loop(void *arg) {
    (void)arg;
    for (;;)
        pause_once();
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3)
        return 2;
    int threads = atoi(argv[1]);
    period_us = atol(argv[2]);
    pthread_t t;
    for (int i = 1; i < threads; i++)
        pthread_create(&t, 0, wait_loop, 0);
    wait_loop(0);
    return 0;
}
