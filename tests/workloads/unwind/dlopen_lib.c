/* The library dlopen_main loads at run time: gcc -O2 -g -fPIC -shared
 * (no frame pointers), installed as libdlopen_lib.so beside dlopen_main.
 *
 * Expected chains, below dlopen_main's run_library:
 *   lib_entry -> lib_hot_a   75 %
 *   lib_entry -> lib_hot_b   25 %
 * lib_entry gives lib_hot_a three times the units of lib_hot_b each round. */
#include "work.h"

/* Both hot functions are the same code at the same cache-line alignment,
 * so a unit of work costs the same in each (unaligned, their loops can
 * differ by several per cent in speed, and the split with them). */
__attribute__((noipa, aligned(64))) unsigned long lib_hot_a(unsigned long x, unsigned long n) {
    return work(x, n);
}

__attribute__((noipa, aligned(64))) unsigned long lib_hot_b(unsigned long x, unsigned long n) {
    return work(x, n);
}

/* Works for `seconds`; the caller's frame stays below. */
unsigned long lib_entry(double seconds) {
    unsigned long rng = 88172645463325252UL, x = 1;
    double end = now() + seconds;
    while (now() < end) {
        unsigned long n = chunk(&rng);
        x = lib_hot_a(x, 3 * n);
        KEEP(x);
        x = lib_hot_b(x, n);
        KEEP(x);
    }
    return x;
}
