/* Syscall-heavy: copies /dev/zero to /dev/null in 64 KiB reads and writes
 * for argv[1] seconds, so most samples are taken in the kernel. */
#include <fcntl.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static char buf[1 << 16];

__attribute__((noinline)) void copy_chunk(int in, int out) {
    if (read(in, buf, sizeof buf) > 0)
        (void)!write(out, buf, sizeof buf);
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 3.0;
    int in = open("/dev/zero", O_RDONLY), out = open("/dev/null", O_WRONLY);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double end = ts.tv_sec + ts.tv_nsec / 1e9 + seconds;
    for (;;) {
        for (int i = 0; i < 100; i++)
            copy_chunk(in, out);
        clock_gettime(CLOCK_MONOTONIC, &ts);
        if (ts.tv_sec + ts.tv_nsec / 1e9 >= end)
            break;
    }
    return 0;
}
