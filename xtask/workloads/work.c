/* Benchmark workload: recurse DEPTH frames, then run ITERATIONS million
 * steps of an LCG at the leaf (0: spin until killed). A fixed amount of work,
 * not a fixed time, so a profiler's cost shows as longer wall time.
 * Built with -O0 -fno-omit-frame-pointer: every frame, the leaf too, has a
 * frame pointer, so the kernel's stack walk sees DEPTH + a few frames. */
#include <stdlib.h>

__attribute__((noinline)) unsigned long spin(unsigned long millions) {
    volatile unsigned long acc = millions;
    for (unsigned long m = 0; millions == 0 || m < millions; m++)
        for (int i = 0; i < 1000000; i++)
            acc = acc * 6364136223846793005UL + 1442695040888963407UL;
    return acc;
}

__attribute__((noinline)) unsigned long down(int depth, unsigned long millions) {
    if (depth <= 0)
        return spin(millions);
    return down(depth - 1, millions) + 1;
}

int main(int argc, char **argv) {
    int depth = argc > 1 ? atoi(argv[1]) : 1;
    unsigned long millions = argc > 2 ? strtoul(argv[2], 0, 10) : 1000;
    volatile unsigned long sink = down(depth, millions);
    return (int)(sink & 1) * 0;
}
