package gctune

import (
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strings"
	"testing"
	"time"
)

const mib = 1 << 20

func TestPercent(t *testing.T) {
	for _, tc := range []struct {
		name                  string
		live, roots, headroom uint64
		want                  int
	}{
		{"before the first collection: the scaled minimum", 0, 0, 64 * mib, 1600},
		{"small heap: the scaled minimum, not the live heap, decides", 2 * mib, mib / 2, 64 * mib, 1650},
		{"16 MiB live: headroom over live+roots", 16 * mib, 0, 64 * mib, 400},
		{"rounded up", 16 * mib, mib, 64 * mib, 377},
		{"live equals headroom", 64 * mib, 0, 64 * mib, 100},
		{"live above headroom: GOGC=100", 500 * mib, 4 * mib, 64 * mib, 100},
		{"headroom below the minimum heap", mib, 0, mib, 100},
		{"huge headroom stays an int32", 0, 0, 1 << 62, 1<<31 - 1},
	} {
		if got := percent(tc.live, tc.roots, tc.headroom); got != tc.want {
			t.Errorf("%s: percent(%d, %d, %d) = %d, want %d", tc.name, tc.live, tc.roots, tc.headroom, got, tc.want)
		}
	}
}

// runtimeGoal is the runtime's heap goal at GOGC=p (runtime/mgcpacer.go,
// gcControllerState.commit), without a memory limit.
func runtimeGoal(live, roots uint64, p int) uint64 {
	return max(live+(live+roots)*uint64(p)/100, minHeap*uint64(p)/100)
}

// TestPercentGoal: across live heaps from nothing to far above the
// headroom, the goal at percent's GOGC is max(GOGC=100's, live+headroom)
// within one percentage step.
func TestPercentGoal(t *testing.T) {
	for _, headroom := range []uint64{8 * mib, 64 * mib, 1024 * mib} {
		for _, live := range []uint64{0, 100 << 10, mib, 3 * mib, 4 * mib, 10 * mib, 63 * mib, 64 * mib, 65 * mib, 2048 * mib} {
			for _, roots := range []uint64{0, 300 << 10, 5 * mib} {
				p := percent(live, roots, headroom)
				goal := runtimeGoal(live, roots, p)
				want := max(runtimeGoal(live, roots, 100), live+headroom)
				step := max(live+roots, minHeap) / 100
				if goal+step < want || goal > want+step {
					t.Errorf("live %d, roots %d, headroom %d: GOGC %d, goal %d, want %d±%d", live, roots, headroom, p, goal, want, step)
				}
			}
		}
	}
}

// readGC returns the runtime's GOGC, its heap goal and the goal wanted for
// headroom from the last collection's statistics.
func readGC(headroom uint64) (gogc int, goal, want uint64) {
	s := []metrics.Sample{{Name: "/gc/gogc:percent"}, {Name: "/gc/heap/goal:bytes"}, {Name: sampleNames[0]}, {Name: sampleNames[1]}, {Name: sampleNames[2]}}
	metrics.Read(s)
	live, roots := s[2].Value.Uint64(), s[3].Value.Uint64()+s[4].Value.Uint64()
	// GOGC=100's goal is the runtime's, and max(..., live+headroom) is
	// what Start promises.
	want = max(runtimeGoal(live, roots, 100), live+headroom)
	return int(int32(s[0].Value.Uint64())), s[1].Value.Uint64(), want
}

// waitGoal waits until the tuner has retuned after the last collection,
// i.e. the heap goal is within 1% of what Start promises, and returns the
// GOGC it set.
func waitGoal(t *testing.T, headroom uint64) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		gogc, goal, want := readGC(headroom)
		if goal+want/100 >= want && goal <= want+want/100 {
			return gogc
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 10s: GOGC %d, heap goal %d, want %d", gogc, goal, want)
		}
		time.Sleep(time.Millisecond)
	}
}

// waitCleanups waits until the cleanups queued so far have run.
func waitCleanups(t *testing.T) {
	t.Helper()
	s := []metrics.Sample{{Name: "/gc/cleanups/queued:cleanups"}, {Name: "/gc/cleanups/executed:cleanups"}}
	metrics.Read(s)
	queued := s[0].Value.Uint64()
	deadline := time.Now().Add(10 * time.Second)
	for s[1].Value.Uint64() < queued {
		if time.Now().After(deadline) {
			t.Fatalf("after 10s: %d of %d cleanups ran", s[1].Value.Uint64(), queued)
		}
		time.Sleep(time.Millisecond)
		metrics.Read(s)
	}
}

func TestStart(t *testing.T) {
	t.Setenv("GOGC", "")
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	runtime.GC()
	stop, err := Start(DefaultHeadroom)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()

	// This test's live heap is well under 4 MiB: the scaled minimum heap
	// sets the goal, at live + 64 MiB. A change of the runtime's minimum
	// heap fails here.
	small := waitGoal(t, DefaultHeadroom)
	if small <= 100 {
		t.Fatalf("GOGC %d after Start with a small heap, want over 100", small)
	}

	// 32 MiB more live heap: the collection's cleanup lowers GOGC so that
	// the goal stays at live + 64 MiB.
	ballast := make([]byte, 32<<20)
	runtime.GC()
	if got := waitGoal(t, DefaultHeadroom); got >= small || got <= 100 {
		t.Errorf("GOGC %d with 32 MiB more live heap, want between 100 and %d", got, small)
	}
	runtime.KeepAlive(ballast)
	// The ballast is garbage after its last use above: the next
	// collection, through the sentinel the last one armed, raises GOGC
	// again.
	runtime.GC()
	if got := waitGoal(t, DefaultHeadroom); got <= 1000 {
		t.Errorf("GOGC %d once the ballast is garbage, want over 1000", got)
	}

	stop()
	stop()
	if got, _, _ := readGC(0); got != 100 {
		t.Fatalf("GOGC %d after stop, want the 100 from before Start", got)
	}
	// A stopped tuner neither retunes nor re-arms.
	runtime.GC()
	waitCleanups(t)
	runtime.GC()
	waitCleanups(t)
	if got, _, _ := readGC(0); got != 100 {
		t.Errorf("GOGC %d after collections after stop, want 100", got)
	}
}

func TestStartDeclines(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	t.Setenv("GOGC", "400")
	if _, err := Start(DefaultHeadroom); err == nil || !strings.Contains(err.Error(), "GOGC=400") {
		t.Errorf("Start with GOGC=400 in the environment: err %v, want one naming GOGC=400", err)
	}
	t.Setenv("GOGC", "")
	if _, err := Start(0); err == nil {
		t.Error("Start(0): no error")
	}
	if got, _, _ := readGC(0); got != 100 {
		t.Errorf("GOGC %d after Start declined, want 100 unchanged", got)
	}
	stop, err := Start(DefaultHeadroom)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	if _, err := Start(DefaultHeadroom); err == nil {
		t.Error("a second Start while one runs: no error")
	}
}
