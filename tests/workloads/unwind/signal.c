/* Work inside a signal handler: gcc -O2 -g (no frame pointers).
 *
 * A CPU-time timer (setitimer ITIMER_PROF, every 40 ms) sends SIGPROF; the
 * handler does a third as many units as the main code did since the last
 * signal. So a sample in the handler has the kernel's signal frame below it:
 * on_sigprof's caller is glibc's __restore_rt, and below that is whatever
 * was interrupted (mostly main_leaf), then compute, run and main.
 * Expected chains (share of the process's samples):
 *   main -> run -> compute -> main_leaf                                          75 %
 *   main -> run -> compute -> ... -> __restore_rt -> on_sigprof -> handler_leaf  25 %
 * (`...` is the interrupted function: main_leaf, or compute itself.
 * __restore_rt has size 0 in glibc's symbol table: perf names it [unknown].) */
#include <signal.h>
#include <stdio.h>
#include <sys/time.h>

#include "work.h"

#define STEP 100000

/* Written only by the main code, read by the handler (one 8-byte store). */
static volatile unsigned long main_units;
/* The handler's own count. */
static unsigned long handler_units, sink;

__attribute__((noipa)) unsigned long handler_leaf(unsigned long x, unsigned long n) {
    return work(x, n);
}

__attribute__((noipa)) void on_sigprof(int sig) {
    unsigned long target = main_units / 3;
    unsigned long x = handler_leaf(sink + sig, target - handler_units);
    KEEP(x);
    handler_units = target;
    sink ^= x;
}

__attribute__((noipa)) unsigned long main_leaf(unsigned long x, unsigned long n) {
    return work(x, n);
}

/* STEP units at a time, each counted once done. */
__attribute__((noipa)) unsigned long compute(unsigned long x, unsigned long n) {
    for (unsigned long done = 0; done < n; done += STEP) {
        x = main_leaf(x, STEP);
        KEEP(x);
        main_units += STEP;
    }
    return x;
}

__attribute__((noipa)) unsigned long run(double seconds) {
    unsigned long x = 1;
    double end = now() + seconds;
    while (now() < end) {
        x = compute(x, 50 * STEP);
        KEEP(x);
    }
    return x;
}

int main(int argc, char **argv) {
    struct sigaction sa = {.sa_handler = on_sigprof, .sa_flags = SA_RESTART};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGPROF, &sa, NULL);
    struct itimerval every = {{0, 40000}, {0, 40000}};
    setitimer(ITIMER_PROF, &every, NULL);
    unsigned long x = run(seconds_arg(argc, argv));
    printf("%lu %lu\n", x, sink);
    return 0;
}
