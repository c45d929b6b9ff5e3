// C++ without frame pointers: g++ -O2 -g.
//
// Expected chains (share of the process's samples):
//   main -> run -> sort_round -> (std::sort's internals, inlined or not) -> by_weight   75 %
//   main -> run -> shade_round -> Outer::shade -> Inner::shade                         25 %
//
// Each round sorts a fresh vector with std::sort and a comparator, counting
// the comparisons, then sends a third as many comparisons' worth of work
// down a chain of two virtual calls (Outer::shade calls next->shade, an
// Inner). A comparison costs WEIGHT units of work, so the time is in
// by_weight and Inner::shade. The objects are made where the compiler cannot
// see their types at the call sites.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <vector>

#include "work.h"

constexpr unsigned long WEIGHT = 1000;

struct Item {
    unsigned long key;
};

static unsigned long comparisons, sink;

__attribute__((noinline)) bool by_weight(const Item &a, const Item &b) {
    sink ^= work(a.key ^ b.key, WEIGHT);
    comparisons++;
    return a.key < b.key;
}

struct Stage {
    virtual ~Stage() = default;
    virtual unsigned long shade(unsigned long x, unsigned long n) const = 0;
};

struct Inner : Stage {
    __attribute__((noinline)) unsigned long shade(unsigned long x,
                                                  unsigned long n) const override {
        return work(x, n);
    }
};

struct Outer : Stage {
    std::unique_ptr<Stage> next;
    explicit Outer(std::unique_ptr<Stage> next) : next(std::move(next)) {}
    __attribute__((noinline)) unsigned long shade(unsigned long x,
                                                  unsigned long n) const override {
        unsigned long y = next->shade(x, n);
        KEEP(y);
        return y ^ x;
    }
};

__attribute__((noipa)) std::unique_ptr<Stage> make_stages() {
    return std::make_unique<Outer>(std::make_unique<Inner>());
}

__attribute__((noipa)) unsigned long sort_round(std::vector<Item> &items, unsigned long *rng) {
    for (Item &item : items)
        item.key = next_random(rng) % 1000000;
    unsigned long before = comparisons;
    std::sort(items.begin(), items.end(), by_weight);
    unsigned long made = comparisons - before;
    KEEP(made);
    return made;
}

__attribute__((noipa)) unsigned long shade_round(const Stage &stage, unsigned long units) {
    unsigned long x = stage.shade(units, units);
    KEEP(x);
    return x;
}

__attribute__((noipa)) unsigned long run(double seconds) {
    std::unique_ptr<Stage> stage = make_stages();
    std::vector<Item> items;
    unsigned long rng = 88172645463325252UL, x = 0;
    double end = now() + seconds;
    while (now() < end) {
        items.resize(1000 + next_random(&rng) % 3000);
        unsigned long made = sort_round(items, &rng);
        x ^= shade_round(*stage, made * WEIGHT / 3);
    }
    return x;
}

int main(int argc, char **argv) {
    unsigned long x = run(seconds_arg(argc, argv));
    std::printf("%lu %lu\n", x, sink);
    return 0;
}
