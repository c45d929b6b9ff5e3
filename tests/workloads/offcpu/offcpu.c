// Off-CPU workload with known waits.
//
//   offcpu sleep SECONDS
//     One thread sleeps 3 ms in sleep_long, then 1 ms in sleep_short, in
//     turn: its time off the CPU splits 3:1 between the two stacks.
//
//   offcpu mutex SECONDS THREADS
//     Once a line arrives on its standard input (the profiler is
//     attached), THREADS threads take one pthread mutex in take_lock and
//     hold it for about 1 ms of work in hold_lock, which releases it (the
//     holder's site: where waiting threads are woken), in a loop. At exit it
//     prints the nanoseconds all threads spent waiting in
//     pthread_mutex_lock, as it measured them.
//
// Built with -O2 and no frame pointers: the stacks are unwound from the
// registers saved at the system call.
#include <pthread.h>
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

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static double mutex_end;
static long long waited_ns;

__attribute__((noinline)) void hold_lock(void) {
    double until = now() + 0.001;
    volatile unsigned long acc = 1;
    while (now() < until)
        for (int i = 0; i < 1000; i++)
            acc = acc * 6364136223846793005UL + 1;
    pthread_mutex_unlock(&lock);
    __asm__ volatile("" ::: "memory");
}

// Returns the nanoseconds it waited for the lock.
__attribute__((noinline)) long long take_lock(void) {
    double before = now();
    pthread_mutex_lock(&lock);
    long long waited = (long long)((now() - before) * 1e9);
    __asm__ volatile("" ::: "memory");
    return waited;
}

__attribute__((noinline)) void *contender(void *arg) {
    long long mine = 0;
    (void)arg;
    while (now() < mutex_end) {
        mine += take_lock();
        hold_lock();
    }
    __atomic_add_fetch(&waited_ns, mine, __ATOMIC_RELAXED);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "mutex") == 0) {
        int threads = atoi(argv[3]);
        pthread_t t[64];
        if (threads < 1 || threads > 64)
            return 2;
        char go[8];
        if (!fgets(go, sizeof go, stdin))
            return 2;
        mutex_end = now() + atof(argv[2]);
        for (int i = 0; i < threads; i++)
            pthread_create(&t[i], 0, contender, 0);
        for (int i = 0; i < threads; i++)
            pthread_join(t[i], 0);
        printf("%lld\n", waited_ns);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "sleep") == 0) {
        sleeper(atof(argv[2]));
        return 0;
    }
    fprintf(stderr, "usage: offcpu sleep SECONDS | offcpu mutex SECONDS THREADS\n");
    return 2;
}
