package limiter_test

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/keyd/keyd/internal/limiter"
)

// TestCheckBehind: CheckBehind(now, T, E) must answer what Check(now, T)
// answers once a grant of E tokens is made at now, over random histories
// of grants on buckets with and without a daily limit and a pacer, and
// must change nothing. The pacer's part is computed, so its wait may be a
// nanosecond off.
func TestCheckBehind(t *testing.T) {
	for seed := range uint64(200) {
		r := rand.New(rand.NewPCG(seed, 7))
		l := limiter.Limits{RPM: 1 + r.Int64N(8), TPM: 100 + r.Int64N(1000)}
		if r.IntN(2) == 0 {
			l.RPD = l.RPM + r.Int64N(20)
		}
		if r.IntN(2) == 0 {
			l.BurstCapacity = 1 + r.Int64N(l.RPM)
		}
		// a makes the real grants; replay(extra) is a bucket that made
		// them too, then the hypothetical grant.
		type grant struct {
			at     time.Time
			tokens int64
		}
		var history []grant
		a := limiter.New(l, la)
		replay := func(now time.Time, extra int64) *limiter.Bucket {
			b := limiter.New(l, la)
			for i, g := range history {
				b.Grant(g.at, fmt.Sprint(i), g.tokens)
			}
			b.Grant(now, "extra", extra)
			return b
		}
		now := t0.Add(time.Duration(r.Int64N(int64(24 * time.Hour))))
		for i := range 150 {
			now = now.Add(time.Duration(r.Int64N(int64(20 * time.Second))))
			tokens, extra := 1+r.Int64N(l.TPM), 1+r.Int64N(l.TPM/2)
			if !a.Check(now, extra).OK {
				continue
			}
			before := a.Check(now, tokens)
			got := a.CheckBehind(now, tokens, extra)
			if again := a.Check(now, tokens); again != before {
				t.Fatalf("seed %d step %d: CheckBehind changed the bucket: Check was %+v, is %+v", seed, i, before, again)
			}
			want := replay(now, extra).Check(now, tokens)
			d := got.Wait - want.Wait
			if got.OK != want.OK || got.Never != want.Never || d < -time.Nanosecond || d > time.Nanosecond {
				t.Fatalf("seed %d step %d %+v: CheckBehind(%d behind %d) = %+v, Check after the grant = %+v", seed, i, l, tokens, extra, got, want)
			}
			if r.IntN(3) == 0 {
				a.Grant(now, fmt.Sprint(len(history)), extra)
				history = append(history, grant{now, extra})
			}
		}
	}
}
