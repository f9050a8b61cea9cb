package bench

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// PairFunc does one lease then its report and returns how long each took.
type PairFunc func(ctx context.Context) (lease, report time.Duration, err error)

// Run is the outcome of RunPairs.
type Run struct {
	Clients int
	Elapsed time.Duration // the measured window
	Pairs   int           // pairs completed in the window
	// Latencies of the pairs completed in the window, sorted.
	Lease, Report, Pair []time.Duration
	// ServerCPU is the server process's user+system CPU in the window;
	// ClientCPU is this process's (the clients').
	ServerCPU, ClientCPU time.Duration
}

// PairsPerSec is the throughput of the window.
func (r *Run) PairsPerSec() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Pairs) / r.Elapsed.Seconds()
}

// ServerCPUPerPair is the server's CPU per pair, in µs.
func (r *Run) ServerCPUPerPair() float64 {
	if r.Pairs == 0 {
		return 0
	}
	return float64(r.ServerCPU.Microseconds()) / float64(r.Pairs)
}

// ClientCPUPerPair is the clients' CPU per pair, in µs.
func (r *Run) ClientCPUPerPair() float64 {
	if r.Pairs == 0 {
		return 0
	}
	return float64(r.ClientCPU.Microseconds()) / float64(r.Pairs)
}

// RunPairs runs clients goroutines that loop pair, closed loop (each
// starts its next pair when its last one ends), for warmup and then for
// dur, and returns what was measured in the second part: the pairs that
// completed within it and their latencies. serverPID, when > 0, is the
// process whose CPU time is measured over the same window. The first
// error of any client ends the run.
func RunPairs(ctx context.Context, clients int, warmup, dur time.Duration, serverPID int, pair PairFunc) (*Run, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	const (
		warming = iota
		measuring
		stopped
	)
	var phase atomic.Int32
	type lats struct{ lease, report []time.Duration }
	all := make([]lats, clients)
	var firstErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	for i := range clients {
		wg.Go(func() {
			l := &all[i]
			for phase.Load() != stopped && ctx.Err() == nil {
				a, b, err := pair(ctx)
				if err != nil {
					if ctx.Err() == nil {
						errOnce.Do(func() { firstErr = fmt.Errorf("client %d: %w", i, err) })
					}
					cancel()
					return
				}
				if phase.Load() == measuring {
					l.lease, l.report = append(l.lease, a), append(l.report, b)
				}
			}
		})
	}
	sleep := func(d time.Duration) {
		select {
		case <-ctx.Done():
		case <-time.After(d):
		}
	}
	sleep(warmup)
	srv0, self0 := time.Duration(0), selfCPU()
	if serverPID > 0 {
		srv0 = procCPU(serverPID)
	}
	start := time.Now()
	phase.Store(measuring)
	sleep(dur)
	phase.Store(stopped)
	r := &Run{Clients: clients, Elapsed: time.Since(start), ClientCPU: selfCPU() - self0}
	if serverPID > 0 {
		r.ServerCPU = procCPU(serverPID) - srv0
	}
	wg.Wait()
	if firstErr != nil {
		return nil, firstErr
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	for _, l := range all {
		r.Lease = append(r.Lease, l.lease...)
		r.Report = append(r.Report, l.report...)
		for j := range l.lease {
			r.Pair = append(r.Pair, l.lease[j]+l.report[j])
		}
	}
	r.Pairs = len(r.Pair)
	slices.Sort(r.Lease)
	slices.Sort(r.Report)
	slices.Sort(r.Pair)
	return r, nil
}

// Pct returns the p-th percentile of sorted (nearest rank).
func Pct(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted))*p/100+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// Ms is d in milliseconds.
func Ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// median of xs (not modified); 0 when empty.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// spread is "median [min–max]" of xs with the given format.
func spread(format string, xs []float64) string {
	if len(xs) == 0 {
		return "–"
	}
	m := fmt.Sprintf(format, median(xs))
	if len(xs) == 1 {
		return m
	}
	return fmt.Sprintf("%s ["+format+"–"+format+"]", m, slices.Min(xs), slices.Max(xs))
}

// mergeSorted merges the latencies of several runs into one sorted slice.
func mergeSorted(runs []*Run, f func(*Run) []time.Duration) []time.Duration {
	var out []time.Duration
	for _, r := range runs {
		out = append(out, f(r)...)
	}
	slices.Sort(out)
	return out
}
