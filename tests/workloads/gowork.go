// Go workload: main.main -> main.hotGoLoop. Go keeps frame pointers on amd64.
//
//	gowork [SECONDS]      spin for SECONDS (default 3): the end-to-end tests
//	gowork -calls N       a fixed amount of work, N calls of hotGoLoop (2 M
//	                      steps each): the benchmarks (cargo xtask bench)
package main

import (
	"os"
	"strconv"
	"time"
)

//go:noinline
func hotGoLoop(seed uint64) uint64 {
	var state [8]uint64
	for i := range state {
		state[i] = seed
	}
	for i := uint64(0); i < 2000000; i++ {
		j := i & 7
		state[j] = state[j]*6364136223846793005 + i
	}
	var out uint64
	for _, s := range state {
		out ^= s
	}
	return out
}

func main() {
	var sink uint64
	if len(os.Args) > 2 && os.Args[1] == "-calls" {
		calls, err := strconv.ParseUint(os.Args[2], 10, 64)
		if err != nil {
			os.Exit(2)
		}
		for c := uint64(0); c < calls; c++ {
			sink += hotGoLoop(sink)
		}
	} else {
		seconds := 3.0
		if len(os.Args) > 1 {
			if s, err := strconv.ParseFloat(os.Args[1], 64); err == nil {
				seconds = s
			}
		}
		end := time.Now().Add(time.Duration(seconds * float64(time.Second)))
		for time.Now().Before(end) {
			sink ^= hotGoLoop(sink)
		}
	}
	if sink == 42 {
		os.Exit(3)
	}
}
