/* Syscall-heavy benchmark workload: COUNT thousand 4 KiB reads of /dev/zero
 * and writes to /dev/null, so most of the time (and most samples) is in the
 * kernel. A fixed amount of work, not a fixed time. */
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

static char buf[4096];

__attribute__((noinline)) void copy_chunk(int in, int out) {
    if (read(in, buf, sizeof buf) > 0)
        (void)!write(out, buf, sizeof buf);
}

int main(int argc, char **argv) {
    unsigned long thousands = argc > 1 ? strtoul(argv[1], 0, 10) : 1000;
    int in = open("/dev/zero", O_RDONLY), out = open("/dev/null", O_WRONLY);
    for (unsigned long i = 0; i < thousands * 1000; i++)
        copy_chunk(in, out);
    return 0;
}
