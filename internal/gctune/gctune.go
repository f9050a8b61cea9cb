// Package gctune gives the garbage collector a floor of heap headroom, so
// that a daemon with a small live heap and a high allocation rate does not
// collect a dozen or more times a second.
//
// With GOGC=100 the runtime starts a collection when the heap has grown by
// about the live heap since the last one. A freshly started keyd has a
// live heap of a few MiB and allocates about 25 KB of short-lived garbage
// per lease and report at full load: 12 to 19 collections a second. A
// fixed larger GOGC would multiply a large live heap too (GOGC=400 lets
// 500 MiB live grow to 2.5 GiB). Start instead keeps the heap goal at
//
//	max(GOGC=100's goal, live heap + headroom)
//
// by setting GOGC again after every collection: a large percentage while
// the live heap is small, 100 once it exceeds the headroom. The cost is at
// most headroom bytes of heap more than GOGC=100, and none once the live
// heap exceeds the headroom.
package gctune

import (
	"errors"
	"fmt"
	"math"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"sync/atomic"
)

// DefaultHeadroom is the headroom keyd keeps by default (--gc-headroom).
const DefaultHeadroom = 64 << 20

// minHeap is the runtime's minimum heap goal at GOGC=100
// (defaultHeapMinimum in runtime/mgcpacer.go). It scales with GOGC like
// the rest of the goal: at GOGC=1600 no collection starts below 64 MiB.
// TestStart fails if the runtime changes it.
const minHeap = 4 << 20

// The runtime's inputs to the heap goal, as of the last collection: at
// GOGC=p the goal is live + (live + stacks + globals) * p/100, and at least
// minHeap * p/100.
var sampleNames = [...]string{
	"/gc/heap/live:bytes",
	"/gc/scan/stack:bytes",
	"/gc/scan/globals:bytes",
}

// running is set while a tuner runs: there is one GOGC per process.
var running atomic.Bool

// Start sets GOGC so that the heap goal is max(GOGC=100's goal, live heap
// + headroom), within 1%, and sets it again after each collection, from
// the live heap that collection marked. Until the next collection the
// goal stays the one set after the last.
//
// Start does nothing, and says why in its error, if the environment sets
// GOGC (the operator chose), if headroom is not positive, or if another
// tuner runs in the process. A memory limit (GOMEMLIMIT, or
// debug.SetMemoryLimit) still applies: the runtime collects before the
// heap reaches it whatever GOGC says, so the headroom gives way to it.
//
// stop ends the tuning and restores the GOGC in force before Start; once
// it returns, the tuner changes GOGC no more. stop may be called from any
// goroutine, more than once. While a tuner runs, nothing else should call
// debug.SetGCPercent: the tuner overwrites it after the next collection.
//
// The tuner runs no goroutine of its own: a sentinel object's cleanup
// (runtime.AddCleanup) runs after each collection, retunes, and arms a
// new sentinel.
func Start(headroom int64) (stop func(), err error) {
	if headroom <= 0 {
		return nil, fmt.Errorf("headroom %d: must be positive", headroom)
	}
	if v := os.Getenv("GOGC"); v != "" {
		return nil, fmt.Errorf("GOGC=%s is set in the environment", v)
	}
	if !running.CompareAndSwap(false, true) {
		return nil, errors.New("a tuner already runs in this process")
	}
	t := &tuner{headroom: uint64(headroom)}
	for i, name := range sampleNames {
		t.samples[i].Name = name
	}
	metrics.Read(t.samples[:])
	for _, s := range t.samples {
		if s.Value.Kind() != metrics.KindUint64 {
			running.Store(false)
			return nil, fmt.Errorf("runtime/metrics has no %s", s.Name)
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.percent = t.next()
	t.prev = debug.SetGCPercent(t.percent)
	t.arm()
	return t.stop, nil
}

// A tuner is one Start's state.
type tuner struct {
	headroom uint64

	mu      sync.Mutex // guards the fields below
	samples [len(sampleNames)]metrics.Sample
	percent int  // GOGC as last set
	prev    int  // GOGC before Start
	stopped bool // stop was called
}

// sentinel is the object whose cleanup marks the end of a collection. It
// holds a pointer so that it is never batched with other tiny objects,
// whose cleanups may then never run.
type sentinel struct{ _ *byte }

// arm attaches the next collection's cleanup to a fresh sentinel, which
// nothing references: the next collection finds it unreachable.
func (t *tuner) arm() {
	runtime.AddCleanup(new(sentinel), (*tuner).cycle, t)
}

// cycle runs after each collection: it retunes GOGC and re-arms, unless
// stop was called.
func (t *tuner) cycle() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		return
	}
	if p := t.next(); p != t.percent {
		debug.SetGCPercent(p)
		t.percent = p
	}
	t.arm()
}

// next reads the last collection's statistics and returns the GOGC for
// them. t.mu must be held.
func (t *tuner) next() int {
	metrics.Read(t.samples[:])
	live := t.samples[0].Value.Uint64()
	roots := t.samples[1].Value.Uint64() + t.samples[2].Value.Uint64()
	return percent(live, roots, t.headroom)
}

func (t *tuner) stop() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		return
	}
	t.stopped = true
	debug.SetGCPercent(t.prev)
	running.Store(false)
}

// percent returns the GOGC that puts the heap goal at live+headroom, and
// 100 if GOGC=100's goal is there already. live is the heap the last
// collection marked, roots the stacks and globals it scanned. The runtime's
// goal at GOGC=p is
//
//	max(live + (live+roots)*p/100, minHeap*p/100)
//
// so p is the smaller of headroom*100/(live+roots), rounded up, and
// (live+headroom)*100/minHeap, rounded down: the first term reaches the
// target, and the second does not overshoot it. For a live heap under
// about 4 MiB the second decides, and the goal is the scaled minimum.
func percent(live, roots, headroom uint64) int {
	target := float64(live) + float64(headroom)
	p := math.Floor(target * 100 / minHeap)
	if base := float64(live) + float64(roots); base > 0 {
		p = min(p, math.Ceil(float64(headroom)*100/base))
	}
	// debug.SetGCPercent's value is an int32 in the runtime.
	return int(max(min(p, math.MaxInt32), 100))
}
