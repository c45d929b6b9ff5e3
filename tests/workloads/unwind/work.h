/* Shared by the unwinding workloads: the run time from argv[1], a clock,
 * random chunk sizes, and the unit of work every hot function runs.
 *
 * Shares are set by work, not by time: each round gives every part a
 * number of units in the stated ratio, with the round's size drawn at
 * random so rounds never phase-lock with a sampling timer. All parts run
 * the same loop, so a unit costs the same everywhere. */
#ifndef UNWIND_WORK_H
#define UNWIND_WORK_H

#include <stdlib.h>
#include <time.h>

static inline double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline double seconds_arg(int argc, char **argv) {
    return argc > 1 ? atof(argv[1]) : 3.0;
}

/* xorshift64; each caller keeps its own state. */
static inline unsigned long next_random(unsigned long *state) {
    unsigned long x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *state = x;
}

/* Units in a round's smallest part: about 1.6-6.4 ms of work (a unit is
 * ~1.6 ns). A recording starts and ends inside some round, whose parts it
 * sees only in part; small rounds keep that error far below the tests'
 * tolerance (a round of up to 25 ms in a 3 s recording: under 1 point). */
static inline unsigned long chunk(unsigned long *state) {
    return 1000000 + next_random(state) % 3000000;
}

/* n units of work on x, in registers only: no memory, no stack frame. The
 * empty asm keeps every iteration (gcc can neither fold nor vectorize it). */
static inline __attribute__((always_inline)) unsigned long work(unsigned long x,
                                                                unsigned long n) {
    for (unsigned long i = 0; i < n; i++) {
        x = x * 6364136223846793005UL + i;
        __asm__ volatile("" : "+r"(x));
    }
    return x;
}

/* Keeps a value live after a call, so gcc cannot turn the call into a jump
 * (a tail call would take the caller's frame off the stack). */
#define KEEP(x) __asm__ volatile("" : "+r"(x))

#endif
