/* Splits CPU work 3:1 between work_a and work_b for argv[1] seconds.
 * Each round does n units in work_b and 3n in work_a, with n drawn at
 * random so rounds never phase-lock with the sampling timer (a time-based
 * split would alias with a time-based sampler). */
#include <stdlib.h>
#include <time.h>

static unsigned long rng = 88172645463325252UL;

__attribute__((noinline)) unsigned long spin(unsigned long units) {
    volatile unsigned long acc = units;
    for (unsigned long i = 0; i < units; i++)
        acc = acc * 6364136223846793005UL + i;
    return acc;
}

__attribute__((noinline)) unsigned long work_a(unsigned long n) { return spin(3 * n); }
__attribute__((noinline)) unsigned long work_b(unsigned long n) { return spin(n); }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 3.0;
    double end = now() + seconds;
    volatile unsigned long sink = 0;
    while (now() < end) {
        for (int r = 0; r < 50; r++) {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            unsigned long n = 20000 + rng % 200000;
            sink += work_a(n);
            sink += work_b(n);
        }
    }
    return (int)(sink & 0);
}
