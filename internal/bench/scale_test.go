package bench

import (
	"context"
	"testing"
	"time"

	"github.com/keyd/keyd/internal/store"
)

// TestPopulateStore checks that the restore measurement's store holds
// what a keyd at a sustained rate leaves just before a prune, and that
// keyd's restore reads back what the prose says it does.
func TestPopulateStore(t *testing.T) {
	const n = 4200
	keys := GenKeys(RestoreKeys, 1, ScaleModel)
	for _, reported := range []bool{true, false} {
		t.Run(reportedWord(reported), func(t *testing.T) {
			dir := t.TempDir()
			now := time.Now()
			if err := populateStore(context.Background(), dir, keys, n, reported, now); err != nil {
				t.Fatal(err)
			}
			db, err := store.Open(dir, store.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			all, err := db.Load(now.Add(-24*time.Hour), []string{now.In(mustLA()).Format(time.DateOnly)})
			if err != nil {
				t.Fatal(err)
			}
			if len(all.Leases) != n {
				t.Fatalf("%d leases in the store, want %d", len(all.Leases), n)
			}
			var sum int64
			for _, d := range all.Days {
				sum += d.Count
			}
			if sum != n {
				t.Errorf("day counts sum to %d, want %d", sum, n)
			}
			span := UnreportedSpan
			if reported {
				span = ReportedSpan
			}
			for _, l := range all.Leases {
				at := l.GrantedAt
				if reported {
					at = l.ReportedAt
					if !l.Reported || l.ReportedAt.Sub(l.GrantedAt) != restoreHold {
						t.Fatalf("lease %+v", l)
					}
				} else if l.Reported || !l.ReportedAt.IsZero() {
					t.Fatalf("lease %+v", l)
				}
				if at.Before(now.Add(-span)) || at.After(now) {
					t.Fatalf("lease %+v: outside the %v before %v", l, span, now)
				}
			}
			// keyd's start reads the rows granted in the last lease_ttl + 1 h.
			kept, err := db.Load(now.Add(-(restoreTTL + restoreGrace)), nil)
			if err != nil {
				t.Fatal(err)
			}
			want := n
			if !reported {
				want = n * 70 / 81
			}
			if d := len(kept.Leases) - want; d < -1 || d > 1 {
				t.Errorf("%d leases granted in the last 70 minutes, want %d", len(kept.Leases), want)
			}
		})
	}
}

func TestRestoreRates(t *testing.T) {
	if p, q := restoreRates(300000, true); int(p) != 238 || int(q) != 454 {
		t.Errorf("reported: %v %v", p, q)
	}
	if p, q := restoreRates(300000, false); int(p) != 61 || int(q) != 70 {
		t.Errorf("unreported: %v %v", p, q)
	}
	for n, want := range map[int]string{0: "0", 999: "999", 1000: "1,000", 1260000: "1,260,000", -4200: "-4,200"} {
		if got := commaInt(n); got != want {
			t.Errorf("commaInt(%d) = %q, want %q", n, got, want)
		}
	}
}
