package daemon

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
)

// BenchmarkWaiters measures what waiting requests cost the pool: N
// goroutines loop lease (waiting as long as it takes) then report, on one
// key that allows one lease at a time (max_in_flight 1), so that at any
// moment one holds the lease and N-1 wait in the queue. Every report and
// every grant changes what the waiters may have, and every lease joins
// the queue behind N-1 others. The store is in memory: this is the
// pool's own cost, under its mutex. One op is one lease; leases/s is
// what N waiters leave of the pool's throughput.
func BenchmarkWaiters(b *testing.B) {
	for _, n := range []int{8, 64, 256, 1024} {
		b.Run(fmt.Sprintf("waiters=%d", n), func(b *testing.B) {
			p := testPool(b, &memStore{}, `{"keys":[{"key_id":"k1","model_name":"m","rpm":1000000000,"tpm":1000000000000,"max_in_flight":1}]}`)
			ctx := context.Background()
			var done atomic.Int64
			var wg sync.WaitGroup
			b.ResetTimer()
			start := time.Now()
			for range n {
				wg.Go(func() {
					for done.Add(1) <= int64(b.N) {
						l, err := p.lease(ctx, &api.LeaseRequest{Model: "m", Tokens: 1, WaitMS: 600_000})
						if err != nil {
							b.Error(err)
							return
						}
						if _, err := p.report(ctx, l.LeaseID, &api.ReportRequest{Status: 200}); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "leases/s")
		})
	}
}
