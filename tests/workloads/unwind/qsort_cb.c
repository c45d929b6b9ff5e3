/* Callbacks called from inside glibc: gcc -O2 -g (no frame pointers).
 *
 * Expected chains (share of the process's samples):
 *   main -> run -> sort_phase -> (glibc: __qsort_r, msort_with_tmp ...) -> by_key     75 %
 *   main -> run -> search_phase -> (glibc: bsearch) -> by_key                          25 %
 *
 * Each round sorts a fresh array with qsort, counting the comparisons, then
 * looks up random keys with bsearch until it has made a third as many. A
 * comparison costs WEIGHT units of work, so nearly all the time is in by_key,
 * called by glibc, with glibc's frames between it and its caller. */
#include <stdio.h>
#include <stdlib.h>

#include "work.h"

#define WEIGHT 1000

static unsigned long comparisons, sink;

__attribute__((noipa)) int by_key(const void *pa, const void *pb) {
    unsigned long a = *(const unsigned long *)pa, b = *(const unsigned long *)pb;
    sink ^= work(a ^ b, WEIGHT);
    comparisons++;
    return (a > b) - (a < b);
}

/* stdlib.h inlines bsearch at -O2; called through a pointer it is glibc's. */
static void *(*volatile glibc_bsearch)(const void *, const void *, size_t, size_t,
                                       int (*)(const void *, const void *)) = bsearch;

__attribute__((noipa)) unsigned long sort_phase(unsigned long *keys, size_t n,
                                                unsigned long *rng) {
    for (size_t i = 0; i < n; i++)
        keys[i] = next_random(rng) % 1000000;
    unsigned long before = comparisons;
    qsort(keys, n, sizeof *keys, by_key);
    unsigned long made = comparisons - before;
    KEEP(made);
    return made;
}

__attribute__((noipa)) unsigned long search_phase(const unsigned long *keys, size_t n,
                                                  unsigned long budget, unsigned long *rng) {
    unsigned long found = 0, start = comparisons;
    while (comparisons - start < budget) {
        unsigned long key = keys[next_random(rng) % n];
        found += glibc_bsearch(&key, keys, n, sizeof *keys, by_key) != NULL;
    }
    KEEP(found);
    return found;
}

__attribute__((noipa)) unsigned long run(double seconds) {
    static unsigned long keys[4000];
    unsigned long rng = 88172645463325252UL, found = 0;
    double end = now() + seconds;
    while (now() < end) {
        size_t n = 1000 + next_random(&rng) % 3000;
        unsigned long made = sort_phase(keys, n, &rng);
        found += search_phase(keys, n, made / 3, &rng);
    }
    return found;
}

int main(int argc, char **argv) {
    unsigned long found = run(seconds_arg(argc, argv));
    printf("%lu %lu\n", found, sink);
    return 0;
}
