"""CPython workload of the Python frame tests (run without any flag) and of
the JIT-frame test of `-X perf`.

    pywork.py split SECONDS   work() calls leaf_a three times for each call
                              of leaf_b; the leaves run the same loop, so
                              their CPU time splits 3:1. Each call lasts
                              several sampling periods: calls much shorter
                              and as regular as the sampling clock alias
                              with it and skew the split.
    pywork.py shapes SECONDS  three threads: one alternates between
                              compressing with zlib (a C extension) under
                              squeeze() and sorting with a Python key
                              (order() -> sorted() in C -> weight()), one
                              drains a generator (consume() -> produce()), one
                              runs an asyncio coroutine (crunch()).
"""

import asyncio
import sys
import threading
import time
import zlib


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
            sink += leaf_a(200000)
        sink += leaf_b(200000)
    return sink


def squeeze(data):
    return len(zlib.compress(data, 9))


def weight(x):
    for _ in range(20):
        x = (x * 7919) % 1009
    return x


def order(items):
    return sorted(items, key=weight)[0]


def native_calls(deadline):
    data = bytes(range(256)) * 4096
    items = list(range(4000))
    sink = 0
    while time.monotonic() < deadline:
        sink += squeeze(data)
        sink += order(items)
    return sink


def produce(deadline):
    i = 0
    while time.monotonic() < deadline:
        total = 0
        for j in range(500):
            total += j * j % 11
        i += 1
        yield total


def consume(deadline):
    return sum(produce(deadline))


async def crunch(deadline):
    sink = 0
    while time.monotonic() < deadline:
        for j in range(500):
            sink += j * j % 13
        await asyncio.sleep(0)
    return sink


def run_async(deadline):
    return asyncio.run(crunch(deadline))


def shapes(deadline):
    threads = [
        threading.Thread(target=consume, args=(deadline,), name="gen"),
        threading.Thread(target=run_async, args=(deadline,), name="async"),
    ]
    for t in threads:
        t.start()
    native_calls(deadline)
    for t in threads:
        t.join()


if __name__ == "__main__":
    deadline = time.monotonic() + float(sys.argv[2])
    {"split": work, "shapes": shapes}[sys.argv[1]](deadline)
