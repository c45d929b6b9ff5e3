/* A deep stack: gcc -O2 -g (no frame pointers). descend recurses 150 levels
 * (151 descend frames, depth 150 down to 0), so the whole stack is about
 * 157 frames: _start, __libc_start_main_impl, __libc_start_call_main, main,
 * run, descend x 151, deep_leaf.
 *
 * Expected chains (share of the process's samples):
 *   main -> run -> descend x 151 -> deep_leaf   75 %
 *   main -> run -> descend x 76 -> half_leaf    25 %  (called at depth 75)
 * Each round goes down once: half_leaf does n units on the way, deep_leaf 3n
 * at the bottom. descend works after its call, so the recursion stays real. */
#include <stdio.h>

#include "work.h"

#define DEPTH 150
#define HALF 75

/* Both leaves are the same code at the same cache-line alignment, so a
 * unit of work costs the same in each. */
__attribute__((noipa, aligned(64))) unsigned long deep_leaf(unsigned long x, unsigned long n) {
    return work(x, n);
}

__attribute__((noipa, aligned(64))) unsigned long half_leaf(unsigned long x, unsigned long n) {
    return work(x, n);
}

__attribute__((noipa)) unsigned long descend(int depth, unsigned long x, unsigned long n) {
    unsigned long r;
    if (depth == 0) {
        r = deep_leaf(x, 3 * n);
    } else {
        if (depth == HALF)
            x = half_leaf(x, n);
        r = descend(depth - 1, x, n);
    }
    KEEP(r);
    return r ^ (unsigned long)depth;
}

__attribute__((noipa)) unsigned long run(double seconds) {
    unsigned long rng = 88172645463325252UL, x = 1;
    double end = now() + seconds;
    while (now() < end) {
        x = descend(DEPTH, x, chunk(&rng));
        KEEP(x);
    }
    return x;
}

int main(int argc, char **argv) {
    unsigned long x = run(seconds_arg(argc, argv));
    printf("%lu\n", x);
    return 0;
}
