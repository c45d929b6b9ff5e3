/* A 40 KiB stack frame on the hot path: gcc -O2 -g (no frame pointers).
 * big_frame keeps a 40 KiB array on its stack and touches every cache line
 * of it each round: its canonical frame address is 40 KiB above the stack
 * pointer, out of reach of an unwinder that copies only the stack's top
 * (perf's default dump is 8 KiB).
 *
 * Expected chains (share of the process's samples):
 *   main -> run -> big_frame -> scan_leaf   75 %
 *   main -> run -> big_frame                25 %  (big_frame's own loop)
 * Each round gives scan_leaf three times the units of big_frame's loop. */
#include <stdio.h>

#include "work.h"

#define FRAME (40 * 1024)

__attribute__((noipa)) unsigned long scan_leaf(const unsigned char *buf, unsigned long x,
                                               unsigned long n) {
    return work(x ^ buf[x % FRAME & ~63UL], n);
}

__attribute__((noipa)) unsigned long big_frame(unsigned long x, unsigned long n) {
    unsigned char buf[FRAME];
    for (unsigned long i = 0; i < FRAME; i += 64)
        buf[i] = (unsigned char)(x + i);
    x = scan_leaf(buf, x, 3 * n);
    KEEP(x);
    x = work(x, n);
    return x ^ buf[x % FRAME & ~63UL];
}

__attribute__((noipa)) unsigned long run(double seconds) {
    unsigned long rng = 88172645463325252UL, x = 1;
    double end = now() + seconds;
    while (now() < end) {
        x = big_frame(x, chunk(&rng));
        KEEP(x);
    }
    return x;
}

int main(int argc, char **argv) {
    unsigned long x = run(seconds_arg(argc, argv));
    printf("%lu\n", x);
    return 0;
}
