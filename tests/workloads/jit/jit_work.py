"""Python workload for the JIT-frame tests: `work` calls `leaf_a` three
times for each call of `leaf_b`; both leaves run the same loop, so their
CPU time splits 3:1. Runs for the seconds given on the command line."""

import sys
import time


def leaf_a(n):
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def leaf_b(n):
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def work(deadline):
    sink = 0
    while time.monotonic() < deadline:
        for _ in range(3):
            sink += leaf_a(20000)
        sink += leaf_b(20000)
    return sink


if __name__ == "__main__":
    print(work(time.monotonic() + float(sys.argv[1])) % 10)
