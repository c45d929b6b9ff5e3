/* A library loaded after start: gcc -O2 -g (no frame pointers), with
 * libdlopen_lib.so (dlopen_lib.c) beside the binary.
 *
 * The process first blocks reading its standard input (no CPU time, so no
 * samples); once the input is closed it dlopens the library, then spends
 * argv[1] seconds in it. Expected chains (share of the process's samples):
 *   main -> run_library -> lib_entry -> lib_hot_a   75 %
 *   main -> run_library -> lib_entry -> lib_hot_b   25 %
 * The library's mapping appears after the process started (and after a
 * profiler started on it). */
#include <dlfcn.h>
#include <libgen.h>
#include <stdio.h>
#include <unistd.h>

#include "work.h"

typedef unsigned long (*entry_fn)(double);

__attribute__((noipa)) unsigned long run_library(entry_fn entry, double seconds) {
    unsigned long x = entry(seconds);
    KEEP(x);
    return x;
}

int main(int argc, char **argv) {
    double seconds = seconds_arg(argc, argv);
    /* Static: 8 KiB of locals would put main's return address out of reach
     * of perf's default 8 KiB stack dump. */
    static char exe[4096], path[4200];
    if (readlink("/proc/self/exe", exe, sizeof exe - 1) < 0) {
        perror("readlink /proc/self/exe");
        return 1;
    }
    snprintf(path, sizeof path, "%s/libdlopen_lib.so", dirname(exe));
    char c;
    while (read(0, &c, 1) > 0) {
    }
    void *lib = dlopen(path, RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "dlopen %s: %s\n", path, dlerror());
        return 1;
    }
    entry_fn entry = (entry_fn)dlsym(lib, "lib_entry");
    if (!entry) {
        fprintf(stderr, "dlsym lib_entry: %s\n", dlerror());
        return 1;
    }
    printf("%lu\n", run_library(entry, seconds));
    return 0;
}
