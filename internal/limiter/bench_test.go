package limiter_test

import (
	"testing"
	"time"

	"github.com/keyd/keyd/internal/limiter"
)

// benchBucket returns a bucket of rpm 1e6 whose window holds 10,000
// grants, one every 6 ms, and the time of the last.
func benchBucket(b *testing.B, l limiter.Limits) (*limiter.Bucket, time.Time) {
	bk := limiter.New(l, la)
	now := t0
	for range 10_000 {
		now = now.Add(6 * time.Millisecond)
		bk.Grant(now, "g", 100)
	}
	if u := bk.Usage(now); u.Requests != 10_000 {
		b.Fatalf("window of %d", u.Requests)
	}
	return bk, now
}

// BenchmarkCheckGrant is the daemon's hot path: a Check and a Grant on a
// bucket with a full window of 10,000 grants, one leaving as one comes.
func BenchmarkCheckGrant(b *testing.B) {
	for _, bc := range []struct {
		name string
		l    limiter.Limits
	}{
		{"rpm", limiter.Limits{RPM: 1e6, TPM: 1e12}},
		{"rpm+rpd+pacing", limiter.Limits{RPM: 1e6, TPM: 1e12, RPD: 1e9, BurstCapacity: 1000}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			bk, now := benchBucket(b, bc.l)
			b.ReportAllocs()
			for b.Loop() {
				now = now.Add(6 * time.Millisecond)
				if d := bk.Check(now, 100); !d.OK {
					b.Fatal(d)
				}
				bk.Grant(now, "g", 100)
			}
			b.ReportMetric(float64(bk.Usage(now).Requests), "window")
		})
	}
}

// BenchmarkCheckRefused is a Check that fails on the tpm limit: the wait
// is searched through the window and the reason formatted.
func BenchmarkCheckRefused(b *testing.B) {
	bk, now := benchBucket(b, limiter.Limits{RPM: 1e6, TPM: 10_000 * 100})
	b.ReportAllocs()
	for b.Loop() {
		if d := bk.Check(now, 100); d.OK {
			b.Fatal(d)
		}
	}
}
