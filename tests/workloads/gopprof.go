// Go service with net/http/pprof, for the scrape and upload tests: a CPU
// loop with a known split (main.spinA 3 : main.spinB 1), goroutines that
// contend on one mutex in main.contendedLock, and main.allocate, which
// allocates steadily.
//
//	gopprof LISTEN_ADDR
//
// Prints "listening on ADDR" once its pprof handlers serve.
package main

import (
	"fmt"
	"math/rand"
	"net"
	"net/http"
	_ "net/http/pprof"
	"os"
	"runtime"
	"sync"
	"time"
)

var sink uint64

//go:noinline
func spin(d time.Duration) uint64 {
	var x uint64 = 1
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		for i := 0; i < 2000; i++ {
			x = x*6364136223846793005 + 1442695040888963407
		}
	}
	return x
}

// Spin times vary around their means (3 ms and 1 ms), so no sampling
// clock can keep step with the loop.
func jitter(mean time.Duration) time.Duration {
	return mean/2 + time.Duration(rand.Int63n(int64(mean)))
}

//go:noinline
func spinA() { sink += spin(jitter(3 * time.Millisecond)) }

//go:noinline
func spinB() { sink += spin(jitter(1 * time.Millisecond)) }

var mu sync.Mutex
var shared uint64

//go:noinline
func contendedLock() {
	mu.Lock()
	for i := 0; i < 20000; i++ {
		shared = shared*31 + uint64(i)
	}
	mu.Unlock()
}

var kept [][]byte

//go:noinline
func allocate() {
	buf := make([]byte, 16<<10)
	buf[0] = byte(len(kept))
	kept = append(kept, buf)
	if len(kept) > 256 {
		kept = kept[:0]
	}
}

func main() {
	runtime.SetMutexProfileFraction(1)
	runtime.SetBlockProfileRate(1)
	listener, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	go func() {
		for {
			spinA()
			spinB()
		}
	}()
	for i := 0; i < 4; i++ {
		go func() {
			for {
				contendedLock()
				time.Sleep(200 * time.Microsecond)
			}
		}()
	}
	go func() {
		for {
			allocate()
			time.Sleep(100 * time.Microsecond)
		}
	}()
	fmt.Printf("listening on %s\n", listener.Addr())
	if err := http.Serve(listener, nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
