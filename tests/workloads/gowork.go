// Go workload: main.main -> main.hotGoLoop. Go keeps frame pointers on amd64.
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
	seconds := 3.0
	if len(os.Args) > 1 {
		if s, err := strconv.ParseFloat(os.Args[1], 64); err == nil {
			seconds = s
		}
	}
	end := time.Now().Add(time.Duration(seconds * float64(time.Second)))
	var sink uint64
	for time.Now().Before(end) {
		sink ^= hotGoLoop(sink)
	}
	if sink == 42 {
		os.Exit(3)
	}
}
