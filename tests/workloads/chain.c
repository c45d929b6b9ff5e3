/* Hot path main -> outer -> inner_hot for argv[1] seconds (default 3).
 * Built with -O0 -fno-omit-frame-pointer: every function, the leaf too,
 * sets up a frame, so the kernel's frame-pointer walk sees each caller. */
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) unsigned long inner_hot(unsigned long x) {
    volatile unsigned long acc = x;
    for (int i = 0; i < 2000000; i++)
        acc = acc * 6364136223846793005UL + 1442695040888963407UL;
    return acc;
}

__attribute__((noinline)) unsigned long outer(unsigned long x) {
    return inner_hot(x) ^ x;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 3.0;
    double end = now() + seconds;
    volatile unsigned long sink = 0;
    while (now() < end)
        sink += outer(sink);
    return (int)(sink & 1) * 0;
}
