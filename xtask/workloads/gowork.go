// Go benchmark workload: main.main -> main.hotGoLoop, ITERATIONS million
// steps in all (a fixed amount of work). Go keeps frame pointers on amd64.
package main

import (
	"os"
	"strconv"
)

//go:noinline
func hotGoLoop(seed uint64) uint64 {
	var state [8]uint64
	for i := range state {
		state[i] = seed
	}
	for i := uint64(0); i < 1000000; i++ {
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
	millions := uint64(1000)
	if len(os.Args) > 1 {
		if n, err := strconv.ParseUint(os.Args[1], 10, 64); err == nil {
			millions = n
		}
	}
	var sink uint64
	for m := uint64(0); m < millions; m++ {
		sink += hotGoLoop(sink)
	}
	if sink == 42 {
		os.Exit(1)
	}
}
