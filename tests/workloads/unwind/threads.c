/* Several threads, each in its own chain: gcc -O2 -g -pthread (no frame
 * pointers). The main thread only creates and joins them (it blocks).
 *
 * Expected chains (share of the process's samples); each thread's stack
 * starts at glibc's clone3 -> start_thread:
 *   start_thread -> thread_a -> stage_a -> leaf_a   50 %
 *   start_thread -> thread_b -> stage_b -> leaf_b   30 %
 *   start_thread -> thread_c -> stage_c -> leaf_c   20 %
 *
 * Each round, the threads do 5n, 3n and 2n units (the same n: each thread
 * draws it from its own copy of one random sequence), then meet at a
 * barrier, where a thread that is done early sleeps. So CPU time splits
 * 5:3:2 whatever the scheduler does. Thread A decides when to stop, before
 * the barrier; the others read its decision after it. */
#include <pthread.h>
#include <stdio.h>

#include "work.h"

static pthread_barrier_t barrier;
static double end;
static int stop;

__attribute__((noipa)) unsigned long leaf_a(unsigned long x, unsigned long n) { return work(x, n); }
__attribute__((noipa)) unsigned long leaf_b(unsigned long x, unsigned long n) { return work(x, n); }
__attribute__((noipa)) unsigned long leaf_c(unsigned long x, unsigned long n) { return work(x, n); }

__attribute__((noipa)) unsigned long stage_a(unsigned long x, unsigned long n) {
    x = leaf_a(x, 5 * n);
    KEEP(x);
    return x;
}
__attribute__((noipa)) unsigned long stage_b(unsigned long x, unsigned long n) {
    x = leaf_b(x, 3 * n);
    KEEP(x);
    return x;
}
__attribute__((noipa)) unsigned long stage_c(unsigned long x, unsigned long n) {
    x = leaf_c(x, 2 * n);
    KEEP(x);
    return x;
}

/* One thread's rounds: `stage` does its part of each, `decides` sets stop. */
static inline __attribute__((always_inline)) unsigned long
rounds(unsigned long (*stage)(unsigned long, unsigned long), int decides) {
    unsigned long rng = 88172645463325252UL, x = 1;
    for (;;) {
        x = stage(x, chunk(&rng));
        if (decides && now() >= end)
            stop = 1;
        pthread_barrier_wait(&barrier);
        if (stop)
            return x;
    }
}

__attribute__((noipa)) void *thread_a(void *out) {
    *(unsigned long *)out = rounds(stage_a, 1);
    return NULL;
}
__attribute__((noipa)) void *thread_b(void *out) {
    *(unsigned long *)out = rounds(stage_b, 0);
    return NULL;
}
__attribute__((noipa)) void *thread_c(void *out) {
    *(unsigned long *)out = rounds(stage_c, 0);
    return NULL;
}

int main(int argc, char **argv) {
    void *(*bodies[3])(void *) = {thread_a, thread_b, thread_c};
    pthread_t threads[3];
    unsigned long results[3];
    end = now() + seconds_arg(argc, argv);
    pthread_barrier_init(&barrier, NULL, 3);
    for (int i = 0; i < 3; i++)
        pthread_create(&threads[i], NULL, bodies[i], &results[i]);
    for (int i = 0; i < 3; i++)
        pthread_join(threads[i], NULL);
    printf("%lu\n", results[0] ^ results[1] ^ results[2]);
    return 0;
}
