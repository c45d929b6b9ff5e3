// Go workload that makes the garbage collector work: main.churn allocates
// small objects and keeps a window of them alive (marking, assists,
// sweeping, write barriers), main.crunch computes without allocating. It
// writes a CPU profile of itself, the truth the agent's GC figures are
// compared with.
//
//	gcalloc SECONDS PROFILE
//
// It waits for a line on stdin before it starts (once the agent is
// attached), then profiles itself for SECONDS at 200 Hz.
package main

import (
	"bufio"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"time"
)

type node struct {
	next    *node
	payload [6]uint64
}

// The live window: old nodes are dropped as new ones come in, so the heap
// stays a few MiB and every cycle has pointers to mark.
var window [1 << 15]*node

//go:noinline
func churn(deadline time.Time) uint64 {
	var sum uint64
	for i := 0; time.Now().Before(deadline); i++ {
		for j := 0; j < 1000; j++ {
			n := &node{next: window[(i*1000+j+1)&(len(window)-1)]}
			n.payload[0] = uint64(j)
			window[(i*1000+j)&(len(window)-1)] = n
			buf := make([]byte, 64+j%512)
			sum += uint64(len(buf)) + n.payload[0]
		}
	}
	return sum
}

//go:noinline
func crunch(deadline time.Time) uint64 {
	x := uint64(1)
	for time.Now().Before(deadline) {
		for i := 0; i < 100000; i++ {
			x = x*6364136223846793005 + 1442695040888963407
		}
	}
	return x
}

func main() {
	if len(os.Args) != 3 {
		os.Stderr.WriteString("usage: gcalloc SECONDS PROFILE\n")
		os.Exit(2)
	}
	secs, err := strconv.ParseFloat(os.Args[1], 64)
	if err != nil {
		os.Exit(2)
	}
	out, err := os.Create(os.Args[2])
	if err != nil {
		panic(err)
	}
	bufio.NewReader(os.Stdin).ReadString('\n')
	// 200 Hz rather than 100, for twice the samples (the runtime keeps a
	// rate set before the profile starts, and says it cannot set it again).
	// Not above the kernel's tick (250 Hz on these hosts): the per-thread
	// CPU timers behind Go's profile fire at most once a tick, so a thread
	// that runs without pause would lose samples and a thread that runs in
	// bursts would not, which skews the shares.
	runtime.SetCPUProfileRate(200)
	if err := pprof.StartCPUProfile(out); err != nil {
		panic(err)
	}
	deadline := time.Now().Add(time.Duration(secs * float64(time.Second)))
	done := make(chan uint64)
	go func() { done <- churn(deadline) }()
	go func() { done <- crunch(deadline) }()
	sink := <-done + <-done
	pprof.StopCPUProfile()
	out.Close()
	os.Stdout.WriteString(strconv.FormatUint(sink%10, 10) + "\n")
}
