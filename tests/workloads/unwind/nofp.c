/* C without frame pointers, the way distributions build it:
 * gcc -O2 -fomit-frame-pointer -g, once as PIE (default) and once -no-pie.
 *
 * Expected chains (share of the process's samples):
 *   main -> run -> top -> mid -> leaf_a   75 %
 *   main -> run -> top -> mid -> leaf_b   25 %
 *
 * leaf_a and leaf_b set up no stack frame; mid keeps six values live across
 * its calls in callee-saved registers (RBP among them, holding data, not a
 * frame pointer); every caller works after its call, so no call becomes a
 * jump. noipa keeps gcc from cloning or inlining the chain. */
#include <stdio.h>

#include "work.h"

__attribute__((noipa)) unsigned long leaf_a(unsigned long x, unsigned long n) {
    return work(x, n);
}

__attribute__((noipa)) unsigned long leaf_b(unsigned long x, unsigned long n) {
    return work(x, n);
}

__attribute__((noipa)) unsigned long mid(unsigned long seed, unsigned long n) {
    unsigned long p = seed * 3, q = seed ^ n, r = n << 3, s = seed + 7, t = n ^ 0x55;
    unsigned long a = leaf_a(seed, 3 * n);
    KEEP(a);
    unsigned long b = leaf_b(a ^ p, n);
    KEEP(b);
    return a ^ b ^ p ^ (q * r) ^ (s + t) ^ seed ^ n;
}

__attribute__((noipa)) unsigned long top(unsigned long seed, unsigned long *rng) {
    unsigned long x = mid(seed, chunk(rng));
    KEEP(x);
    return x + seed;
}

__attribute__((noipa)) unsigned long run(double seconds) {
    unsigned long rng = 88172645463325252UL, x = 1;
    double end = now() + seconds;
    while (now() < end) {
        x = top(x, &rng);
        KEEP(x);
    }
    return x;
}

int main(int argc, char **argv) {
    unsigned long x = run(seconds_arg(argc, argv));
    printf("%lu\n", x);
    return 0;
}
