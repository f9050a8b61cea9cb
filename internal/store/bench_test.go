package store

import (
	"context"
	"fmt"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkCommit measures Commit throughput with one small lease per
// commit. RunParallel runs parallelism×GOMAXPROCS goroutines, so the
// sub-benchmark names give the goroutine count actually used.
func BenchmarkCommit(b *testing.B) {
	procs := runtime.GOMAXPROCS(0)
	for _, want := range []int{1, 8, 64} {
		p := max(1, want/procs)
		b.Run(fmt.Sprintf("goroutines=%d", p*procs), func(b *testing.B) {
			db, _ := openTest(b, "")
			var seq atomic.Int64
			base := time.Now()
			b.ReportAllocs()
			b.SetParallelism(p)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				ctx := context.Background()
				l := Lease{KeyID: "k1", Project: "p", Model: "gemini-2.5-flash", Tokens: 1000}
				batch := &Batch{Leases: []Lease{l}}
				for pb.Next() {
					n := seq.Add(1)
					// Time-sortable IDs, as the daemon makes them.
					l.ID = strconv.FormatInt(base.UnixNano()+n, 36)
					l.GrantedAt = base.Add(time.Duration(n))
					l.ExpiresAt = l.GrantedAt.Add(time.Minute)
					batch.Leases[0] = l
					if err := db.Commit(ctx, batch); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "commits/s")
			st := db.Stats()
			if st.Transactions > 0 {
				b.ReportMetric(float64(st.Commits)/float64(st.Transactions), "commits/tx")
			}
		})
	}
}

// BenchmarkCommitGoroutines runs exactly 1, 8 and 64 goroutines,
// independent of GOMAXPROCS.
func BenchmarkCommitGoroutines(b *testing.B) {
	for _, g := range []int{1, 8, 64} {
		b.Run(fmt.Sprintf("goroutines=%d", g), func(b *testing.B) {
			db, _ := openTest(b, "")
			var seq atomic.Int64
			base := time.Now()
			b.ReportAllocs()
			b.ResetTimer()
			done := make(chan struct{})
			for range g {
				go func() {
					defer func() { done <- struct{}{} }()
					ctx := context.Background()
					l := Lease{KeyID: "k1", Project: "p", Model: "gemini-2.5-flash", Tokens: 1000}
					batch := &Batch{Leases: []Lease{l}}
					for {
						n := seq.Add(1)
						if n > int64(b.N) {
							return
						}
						l.ID = strconv.FormatInt(base.UnixNano()+n, 36)
						l.GrantedAt = base.Add(time.Duration(n))
						l.ExpiresAt = l.GrantedAt.Add(time.Minute)
						batch.Leases[0] = l
						if err := db.Commit(ctx, batch); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			for range g {
				<-done
			}
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "commits/s")
			st := db.Stats()
			if st.Transactions > 0 {
				b.ReportMetric(float64(st.Commits)/float64(st.Transactions), "commits/tx")
			}
		})
	}
}
