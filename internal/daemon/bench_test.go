package daemon

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"math"
	"os"
	"regexp"
	rtmetrics "runtime/metrics"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/client"
	"github.com/keyd/keyd/internal/gctune"
	"github.com/keyd/keyd/internal/store"
)

// benchKeys are four keys in two projects with limits no benchmark can
// reach, so that every lease is granted at once.
const benchKeys = `{"default_tokens":1000,"keys":[
	{"key_id":"k1","project":"p1","model_name":"m","rpm":1000000000,"tpm":1000000000000},
	{"key_id":"k2","project":"p1","model_name":"m","rpm":1000000000,"tpm":1000000000000},
	{"key_id":"a","project":"p2","model_name":"m","rpm":1000000000,"tpm":1000000000000},
	{"key_id":"b","project":"p2","model_name":"m","rpm":1000000000,"tpm":1000000000000}]}`

// benchClients are the client counts of the table.
var benchClients = []int{1, 8, 64}

// BenchmarkLeaseReport measures lease+report pairs over the real Unix
// socket, through the public client, against keyd started by Run with its
// durable bbolt store: each of N clients loops Lease then Report (status
// 200 with usage), each answered only once its record is fsynced. One op
// is one pair; ns/op is the inverse of pairs/s. Metrics:
//
//	pairs/s          pairs completed per second, all clients together
//	p50-ms, p99-ms   latency of a pair (lease then report) as a client sees it
//	lease-p50-ms     latency of the lease alone, and its p99; at clients=1,
//	lease-p99-ms     the lone-lease latency
//	report-p50-ms    latency of the report alone
//	records/commit   records (grants and reports) per store commit, that
//	                 is per write-ahead log write and fdatasync, from
//	                 keyd_store_commit_seconds_count
//	cpu-us/pair      user+system CPU of the whole process (clients, HTTP,
//	                 keyd and the store) per pair
//	gc/s             garbage collections per second, whole process
//	runq-p50-ms      how long goroutines waited to run once runnable
//	runq-p99-ms      (the runtime's /sched/latencies:seconds, sampled),
//	                 whole process: the wait for a CPU, a bucket's upper
//	                 bound
//	peak-rss-MiB     the process's peak RSS (VmHWM) during the run; the
//	                 peak is reset as the run starts, to the RSS of the moment
//
// Each sub-benchmark run starts a fresh keyd on an empty store. The
// daemon logs at info, keyd's default. Use -benchtime=3s or more and
// -count: the numbers move with other load on the machine.
//
// The process keeps the heap headroom for the garbage collector that the
// keyd binary keeps by default (Main, --gc-headroom 64): Run, which this
// benchmark starts, leaves the collector alone. As for keyd, GOGC in the
// environment turns it off: GOGC=100 measures keyd without it.
func BenchmarkLeaseReport(b *testing.B) {
	if stop, err := gctune.Start(gctune.DefaultHeadroom); err != nil {
		b.Logf("gc heap headroom off: %v", err)
	} else {
		defer stop()
	}
	for _, n := range benchClients {
		b.Run(fmt.Sprintf("clients=%d", n), func(b *testing.B) {
			d := startDaemonLevel(b, benchKeys, slog.LevelInfo)
			c := client.New(d.socket)
			defer c.CloseIdleConnections()
			commits := storeCommits(b, d)
			r := runClients(b, n, clientPair(c, nil))
			r.report(b)
			if c := storeCommits(b, d) - commits; c > 0 {
				// runClients's warm-up makes n pairs more.
				b.ReportMetric(float64(2*(b.N+n))/float64(c), "records/commit")
			}
		})
	}
}

// BenchmarkLeaseReportAtRate offers lease+report pairs at a fixed rate
// (open loop) from 64 clients, against the same keyd as
// BenchmarkLeaseReport: pair k is due at start + k/rate and goes to client
// k mod 64, which starts it when it is due, or at once if it is still busy
// with its previous pair. A pair's latency runs from when it was due, so
// a stall counts for every pair it delays (no coordinated omission). This
// is the latency a client sees at a given load, where the closed loop of
// BenchmarkLeaseReport measures the most pairs keyd can do, with 64 pairs
// always waiting by construction. One op is one pair. Metrics:
//
//	pairs/s          pairs completed per second (the offered rate, unless
//	                 keyd falls behind)
//	p50-ms, p99-ms,  latency of a pair from its due time to its report's
//	p999-ms          answer
//	lease-p99-ms     latency of the lease alone, from when it was sent
//	late-%           pairs started more than 1 ms after they were due,
//	                 because their client was still busy
//	cpu-us/pair      as in BenchmarkLeaseReport
func BenchmarkLeaseReportAtRate(b *testing.B) {
	if stop, err := gctune.Start(gctune.DefaultHeadroom); err == nil {
		defer stop()
	}
	const clients = 64
	for _, rate := range []int{5000, 8000, 10000} {
		b.Run(fmt.Sprintf("rate=%d/clients=%d", rate, clients), func(b *testing.B) {
			d := startDaemonLevel(b, benchKeys, slog.LevelInfo)
			c := client.New(d.socket)
			defer c.CloseIdleConnections()
			ctx := context.Background()
			rep := api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: 900, OutputTokens: 100}}
			var wg sync.WaitGroup
			for range clients { // open every connection first
				wg.Go(func() {
					l, err := c.Lease(ctx, api.LeaseRequest{Model: "m", Tokens: 1000, Client: "bench"})
					if err == nil {
						_, err = c.Report(ctx, l.LeaseID, rep)
					}
					if err != nil {
						b.Error(err)
					}
				})
			}
			wg.Wait()
			if b.Failed() {
				b.FailNow()
			}
			type sample struct{ pair, lease time.Duration }
			samples := make([][]sample, clients)
			var late atomic.Int64
			interval := time.Second / time.Duration(rate)
			b.ReportAllocs()
			b.ResetTimer()
			cpu0 := cpuTime()
			start := time.Now().Add(5 * time.Millisecond)
			for i := range clients {
				wg.Go(func() {
					out := make([]sample, 0, b.N/clients+1)
					for k := i; k < b.N; k += clients {
						due := start.Add(time.Duration(k) * interval)
						if w := time.Until(due); w > 0 {
							time.Sleep(w)
						}
						t0 := time.Now()
						if t0.Sub(due) > time.Millisecond {
							late.Add(1)
						}
						l, err := c.Lease(ctx, api.LeaseRequest{Model: "m", Tokens: 1000, Client: "bench"})
						if err != nil {
							b.Error(err)
							return
						}
						t1 := time.Now()
						if _, err := c.Report(ctx, l.LeaseID, rep); err != nil {
							b.Error(err)
							return
						}
						out = append(out, sample{pair: time.Since(due), lease: t1.Sub(t0)})
					}
					samples[i] = out
				})
			}
			wg.Wait()
			elapsed, cpu := time.Since(start), cpuTime()-cpu0
			b.StopTimer()
			var pairs, leases []time.Duration
			for _, ss := range samples {
				for _, x := range ss {
					pairs, leases = append(pairs, x.pair), append(leases, x.lease)
				}
			}
			slices.Sort(pairs)
			slices.Sort(leases)
			b.ReportMetric(float64(len(pairs))/elapsed.Seconds(), "pairs/s")
			b.ReportMetric(ms(pct(pairs, 50)), "p50-ms")
			b.ReportMetric(ms(pct(pairs, 99)), "p99-ms")
			b.ReportMetric(ms(pct(pairs, 99.9)), "p999-ms")
			b.ReportMetric(ms(pct(leases, 99)), "lease-p99-ms")
			b.ReportMetric(100*float64(late.Load())/float64(max(len(pairs), 1)), "late-%")
			b.ReportMetric(float64(cpu.Microseconds())/float64(max(len(pairs), 1)), "cpu-us/pair")
		})
	}
}

// BenchmarkLeaseReportTail looks into the tail of BenchmarkLeaseReport
// at 64 clients: each request's end is timed, the slow ones (over 5 ms,
// the p99 target) are counted, and so are the 10 ms windows in
// which more than a quarter of the requests that ended were slow, which
// tells a stall (many slow requests at once) from spread. It runs keyd
// as BenchmarkLeaseReport does (default), with a 512 MiB heap headroom
// (a collection every few seconds instead of several a second), and with
// checkpoints off (a 1 GiB log, so none during the run but the first
// prune's), to see how much of the tail each of the two explains.
// Metrics besides those of BenchmarkLeaseReport:
//
//	slow-%           requests (leases and reports) over 5 ms
//	stall-windows-%  10 ms windows in which over 25% of the requests that
//	                 ended took over 5 ms
func BenchmarkLeaseReportTail(b *testing.B) {
	const clients = 64
	for _, v := range []struct {
		name     string
		headroom int64
		store    store.Options
	}{
		{"default", gctune.DefaultHeadroom, store.Options{}},
		{"headroom=512MiB", 512 << 20, store.Options{}},
		{"checkpoints=off", gctune.DefaultHeadroom, store.Options{CheckpointBytes: 1 << 30, CheckpointInterval: time.Hour, MaxSegmentBytes: 1 << 30}},
	} {
		b.Run(v.name+fmt.Sprintf("/clients=%d", clients), func(b *testing.B) {
			if stop, err := gctune.Start(v.headroom); err != nil {
				b.Logf("gc heap headroom off: %v", err)
			} else {
				defer stop()
			}
			d := startDaemonWith(b, benchKeys, func(o *Options) { o.LogLevel, o.Store = slog.LevelInfo, v.store })
			c := client.New(d.socket)
			defer c.CloseIdleConnections()
			// ends holds each request's end and whether it was slow, in
			// slots taken in turn: 2 per pair, warm-up pairs included.
			type end struct {
				at   time.Time
				slow bool
			}
			ends := make([]end, 2*(b.N+clients))
			var next atomic.Int64
			record := func(t0, t1 time.Time) {
				if i := next.Add(1) - 1; i < int64(len(ends)) {
					ends[i] = end{t1, t1.Sub(t0) > 5*time.Millisecond}
				}
			}
			pair := clientPair(c, func(t0, t1, t2 time.Time) {
				record(t0, t1)
				record(t1, t2)
			})
			r := runClients(b, clients, pair)
			r.report(b)
			ends = ends[2*clients : min(int(next.Load()), len(ends))] // the run's, not the warm-up's
			if len(ends) == 0 {
				return
			}
			first := ends[0].at
			for _, e := range ends {
				if e.at.Before(first) {
					first = e.at
				}
			}
			const window = 10 * time.Millisecond
			type count struct{ all, slow int }
			windows := map[int64]count{}
			slow := 0
			for _, e := range ends {
				w := int64(e.at.Sub(first) / window)
				c := windows[w]
				c.all++
				if e.slow {
					c.slow++
					slow++
				}
				windows[w] = c
			}
			stalls := 0
			for _, c := range windows {
				if 4*c.slow > c.all {
					stalls++
				}
			}
			n := int64(r.elapsed/window) + 1
			b.ReportMetric(100*float64(slow)/float64(len(ends)), "slow-%")
			b.ReportMetric(100*float64(stalls)/float64(n), "stall-windows-%")
		})
	}
}

// clientPair returns the op of the closed-loop benchmarks: a lease (1,000
// tokens of model m) then its report (status 200 with usage) through c.
// observe, when set, sees when the lease was sent, answered, and the
// report answered.
func clientPair(c *client.Client, observe func(t0, t1, t2 time.Time)) func() (lease, report time.Duration, err error) {
	ctx := context.Background()
	rep := api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: 900, OutputTokens: 100}}
	return func() (lease, report time.Duration, err error) {
		t0 := time.Now()
		l, err := c.Lease(ctx, api.LeaseRequest{Model: "m", Tokens: 1000, Client: "bench"})
		if err != nil {
			return 0, 0, err
		}
		t1 := time.Now()
		if _, err := c.Report(ctx, l.LeaseID, rep); err != nil {
			return 0, 0, err
		}
		t2 := time.Now()
		if observe != nil {
			observe(t0, t1, t2)
		}
		return t1.Sub(t0), t2.Sub(t1), nil
	}
}

// storeCommits returns keyd's keyd_store_commit_seconds_count: the store
// commits (log writes) since it started.
func storeCommits(b *testing.B, d *testDaemon) int64 {
	b.Helper()
	status, body := d.do(b, "GET", "/metrics", "")
	if status != 200 {
		b.Fatalf("GET /metrics: %d", status)
	}
	m := regexp.MustCompile(`(?m)^keyd_store_commit_seconds_count (\d+)$`).FindSubmatch(body)
	if m == nil {
		b.Fatal("no keyd_store_commit_seconds_count in /metrics")
	}
	n, _ := strconv.ParseInt(string(m[1]), 10, 64)
	return n
}

// BenchmarkHealth is the floor under the numbers above: GET /v1/health
// over the same socket and client, which takes the pool lock but writes
// nothing to the store.
func BenchmarkHealth(b *testing.B) {
	for _, n := range benchClients {
		b.Run(fmt.Sprintf("clients=%d", n), func(b *testing.B) {
			d := startDaemonLevel(b, benchKeys, slog.LevelInfo)
			c := client.New(d.socket)
			defer c.CloseIdleConnections()
			ctx := context.Background()
			r := runClients(b, n, func() (time.Duration, time.Duration, error) {
				t0 := time.Now()
				_, err := c.Health(ctx)
				return time.Since(t0), 0, err
			})
			b.ReportMetric(float64(b.N)/r.elapsed.Seconds(), "req/s")
			b.ReportMetric(float64(r.cpu.Microseconds())/float64(b.N), "cpu-us/req")
			b.ReportMetric(ms(pct(r.first, 50)), "p50-ms")
			b.ReportMetric(ms(pct(r.first, 99)), "p99-ms")
		})
	}
}

// clientRun holds the latencies of one run of runClients.
type clientRun struct {
	elapsed              time.Duration
	cpu                  time.Duration   // user+system CPU of the process (clients and keyd)
	gcs                  uint64          // garbage collections
	peakRSS              int64           // bytes, VmHWM; 0 if unknown
	first, second, total []time.Duration // sorted
	runnable             [2]float64      // seconds: p50, p99 of goroutines' wait to run
}

// runClients runs op b.N times in all, from n goroutines, and collects
// the two latencies each op returns. Every goroutine does one op before
// the timer starts, so that its connection is open.
func runClients(b *testing.B, n int, op func() (time.Duration, time.Duration, error)) *clientRun {
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			if _, _, err := op(); err != nil {
				b.Error(err)
			}
		})
	}
	wg.Wait()
	if b.Failed() {
		b.FailNow()
	}
	type lat struct{ first, second []time.Duration }
	lats := make([]lat, n)
	var next atomic.Int64
	b.ReportAllocs()
	resetPeakRSS()
	b.ResetTimer()
	cpu0, gc0, sched0 := cpuTime(), gcCycles(), schedLatencies()
	start := time.Now()
	for i := range n {
		wg.Go(func() {
			l := &lats[i]
			l.first = make([]time.Duration, 0, b.N/n+1)
			l.second = make([]time.Duration, 0, b.N/n+1)
			for next.Add(1) <= int64(b.N) {
				x, y, err := op()
				if err != nil {
					b.Error(err)
					return
				}
				l.first, l.second = append(l.first, x), append(l.second, y)
			}
		})
	}
	wg.Wait()
	r := &clientRun{elapsed: time.Since(start), cpu: cpuTime() - cpu0, gcs: gcCycles() - gc0}
	r.runnable = histPercentiles(schedLatencies(), sched0, 50, 99)
	b.StopTimer()
	r.peakRSS = peakRSS()
	for _, l := range lats {
		r.first = append(r.first, l.first...)
		r.second = append(r.second, l.second...)
		for j := range l.first {
			r.total = append(r.total, l.first[j]+l.second[j])
		}
	}
	slices.Sort(r.first)
	slices.Sort(r.second)
	slices.Sort(r.total)
	return r
}

// report reports a lease+report run's metrics.
func (r *clientRun) report(b *testing.B) {
	b.ReportMetric(float64(len(r.total))/r.elapsed.Seconds(), "pairs/s")
	b.ReportMetric(ms(pct(r.total, 50)), "p50-ms")
	b.ReportMetric(ms(pct(r.total, 99)), "p99-ms")
	b.ReportMetric(ms(pct(r.first, 50)), "lease-p50-ms")
	b.ReportMetric(ms(pct(r.first, 99)), "lease-p99-ms")
	b.ReportMetric(ms(pct(r.second, 50)), "report-p50-ms")
	b.ReportMetric(float64(r.cpu.Microseconds())/float64(len(r.total)), "cpu-us/pair")
	b.ReportMetric(float64(r.gcs)/r.elapsed.Seconds(), "gc/s")
	b.ReportMetric(r.runnable[0]*1000, "runq-p50-ms")
	b.ReportMetric(r.runnable[1]*1000, "runq-p99-ms")
	if r.peakRSS > 0 {
		b.ReportMetric(float64(r.peakRSS)/(1<<20), "peak-rss-MiB")
	}
}

// cpuTime returns the user+system CPU time the process has used.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// gcCycles returns the number of garbage collections the process has
// completed.
func gcCycles() uint64 {
	s := []rtmetrics.Sample{{Name: "/gc/cycles/total:gc-cycles"}}
	rtmetrics.Read(s)
	return s[0].Value.Uint64()
}

// schedLatencies returns the runtime's histogram of the time goroutines
// spent runnable before running (/sched/latencies:seconds, sampled by
// the runtime): how long work waits for a CPU.
func schedLatencies() *rtmetrics.Float64Histogram {
	s := []rtmetrics.Sample{{Name: "/sched/latencies:seconds"}}
	rtmetrics.Read(s)
	h := s[0].Value.Float64Histogram()
	return &rtmetrics.Float64Histogram{Counts: slices.Clone(h.Counts), Buckets: h.Buckets}
}

// histPercentiles returns the percentiles ps of what histogram h counted
// since h0, each as the upper bound of its bucket (the last bucket's
// lower bound when that one is unbounded).
func histPercentiles(h, h0 *rtmetrics.Float64Histogram, ps ...float64) (out [2]float64) {
	var total uint64
	counts := slices.Clone(h.Counts)
	for i := range counts {
		counts[i] -= h0.Counts[i]
		total += counts[i]
	}
	for j, p := range ps[:min(len(ps), len(out))] {
		var acc uint64
		for i, c := range counts {
			acc += c
			if total > 0 && float64(acc) >= p/100*float64(total) {
				out[j] = h.Buckets[i+1]
				if math.IsInf(out[j], 1) {
					out[j] = h.Buckets[i]
				}
				break
			}
		}
	}
	return out
}

// resetPeakRSS resets the process's peak RSS (VmHWM) to its current RSS
// (proc(5), /proc/pid/clear_refs), if the kernel lets it.
func resetPeakRSS() { os.WriteFile("/proc/self/clear_refs", []byte("5"), 0) }

// peakRSS returns the process's peak RSS in bytes, or 0 if unknown.
func peakRSS() int64 {
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for line := range bytes.Lines(status) {
		if v, ok := bytes.CutPrefix(line, []byte("VmHWM:")); ok {
			kb, err := strconv.ParseInt(string(bytes.TrimSuffix(bytes.TrimSpace(v), []byte(" kB"))), 10, 64)
			if err != nil {
				return 0
			}
			return kb << 10
		}
	}
	return 0
}

// pct returns the p-th percentile of sorted (nearest rank).
func pct(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted))*p/100+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
