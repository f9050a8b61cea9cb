package daemon

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/store"
)

// retainKeys is one key with limits no run reaches.
const retainKeys = `{"keys":[{"key_id":"k1","project":"p1","model_name":"m","rpm":1000000000,"tpm":1000000000000}]}`

// retainedBytes fills a pool on a fake clock with n leases in the given
// way, moves the clock 2 minutes on (out of the limiter's window, well
// inside every retention), and returns the heap bytes per lease that the
// pool frees when it forgets its lease records (dropLeaseRecords): the
// live heap after a GC with the records, minus the live heap after a GC
// without them, divided by the leases held, and how many it held.
//
//	reported  granted and reported 1 ms apart (status 200 with usage)
//	lapsed    granted 1 ms apart, never reported, past lease_ttl:
//	          reportable late
//	restored  granted and reported 1 ms apart before a restart, rebuilt
//	          by restore from the store's records
//	steady    granted and reported at a steady rate for 3 reportRetention,
//	          so that answers come and go as in a long run: per answer
//	          still held at the end
func retainedBytes(tb testing.TB, n int, how string) (perLease float64, held int) {
	clock := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	p := newPool(engineStore{}, func() time.Time { return clock }, slog.New(slog.NewTextHandler(io.Discard, nil)))
	p.mu.Lock()
	p.apply(bdConfig(tb, retainKeys), clock, &store.Batch{})
	p.mu.Unlock()
	ctx := context.Background()
	rep := api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: 900, OutputTokens: 100}}
	switch how {
	case "reported", "lapsed", "steady":
		step := time.Millisecond
		if how == "steady" {
			step = 3 * reportRetention / time.Duration(n)
		}
		for range n {
			l, err := p.lease(ctx, &api.LeaseRequest{Model: "m", Tokens: 1000, Client: "bench"})
			if err != nil {
				tb.Fatal(err)
			}
			if how != "lapsed" {
				if _, err := p.report(ctx, l.LeaseID, &rep); err != nil {
					tb.Fatal(err)
				}
			}
			clock = clock.Add(step)
			if how == "steady" {
				p.mu.Lock()
				p.expire(clock) // as the daemon's janitor does
				p.mu.Unlock()
			}
		}
		if how == "lapsed" {
			clock = clock.Add(p.cfg.LeaseTTL)
		}
	case "restored":
		// The records as Load returns them: every string its own copy,
		// as JSON decoding makes them.
		s := &store.State{}
		for range n {
			id := newLeaseID(clock)
			s.Leases = append(s.Leases, store.Lease{
				ID: id, KeyID: strings.Clone("k1"), Project: strings.Clone("p1"), Model: strings.Clone("m"),
				Client: strings.Clone("bench"), Tokens: 1000, GrantedAt: clock, ExpiresAt: clock.Add(10 * time.Minute),
				Day: strings.Clone("2026-11-29"), Reported: true, ReportedAt: clock.Add(time.Millisecond),
				Classification: strings.Clone(api.ClassSuccess), PromptTokens: 900, OutputTokens: 100})
			clock = clock.Add(time.Millisecond)
		}
		p.mu.Lock()
		p.restore(s, clock, &store.Batch{})
		p.mu.Unlock()
	default:
		tb.Fatalf("unknown way %q", how)
	}
	clock = clock.Add(2 * time.Minute)
	p.mu.Lock()
	p.expire(clock)
	p.mu.Unlock()
	p.status("x") // moves every bucket's window on
	held = n
	if how == "steady" {
		held = 0
		for _, g := range p.reported.gens {
			held += len(g.answers)
		}
	}
	with := liveHeap()
	p.mu.Lock()
	dropLeaseRecords(p)
	p.mu.Unlock()
	without := liveHeap()
	runtime.KeepAlive(p)
	return float64(int64(with)-int64(without)) / float64(held), held
}

// dropLeaseRecords makes p forget every lease record it keeps, open or
// not. Callers hold mu.
func dropLeaseRecords(p *pool) {
	p.leases = map[string]*leaseState{}
	p.lapsed = nil
	p.reported = reportedLeases{}
	p.expiries = nil
	for _, ks := range p.keys {
		ks.open = map[*leaseState]struct{}{}
	}
}

// liveHeap returns the heap in use after a full collection.
func liveHeap() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// BenchmarkRetainedLeaseMemory reports the heap bytes that keyd keeps per
// lease record it retains (B/lease; see retainedBytes), for 100,000
// leases reported, lapsed (expired unreported), restored after a restart,
// and reported at a steady rate. Run each once:
//
//	go test -run='^$' -bench=RetainedLeaseMemory -benchtime=1x ./internal/daemon/
func BenchmarkRetainedLeaseMemory(b *testing.B) {
	const n = 100_000
	for _, how := range []string{"reported", "lapsed", "restored", "steady"} {
		b.Run(fmt.Sprintf("%s/n=%d", how, n), func(b *testing.B) {
			var per float64
			var held int
			for b.Loop() {
				per, held = retainedBytes(b, n, how)
			}
			b.ReportMetric(per, "B/lease")
			b.ReportMetric(float64(held), "leases-held")
		})
	}
}

// clockPool is testPool on a clock that the test moves, with p.expire as
// the daemon's janitor runs it.
func clockPool(t *testing.T, st store.Store, keysJSON string) (*pool, *time.Time) {
	t.Helper()
	now := new(time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC))
	p := testPool(t, st, keysJSON)
	p.now = func() time.Time { return *now }
	return p, now
}

func janitor(p *pool) {
	p.mu.Lock()
	p.expire(p.now())
	p.mu.Unlock()
}

func reportErr(t *testing.T, p *pool, id string, rep api.ReportRequest) *api.Error {
	t.Helper()
	r, err := p.report(context.Background(), id, &rep)
	if err == nil {
		t.Fatalf("report %s: got %+v, want an error", id, r)
	}
	return err
}

// A repeated report gets the first answer, action included, until
// reportRetention after the first report, and nothing is applied twice;
// later it gets 404 not_found.
func TestRepeatedReportsUntilReportRetention(t *testing.T) {
	st := &memStore{}
	p, now := clockPool(t, st, twoKeysOneProject)
	lOK := mustLease(t, p, api.LeaseRequest{Model: "m"})
	l429 := mustLease(t, p, api.LeaseRequest{Model: "m"})
	first := mustReport(t, p, l429.LeaseID, api.ReportRequest{Status: 429, Error: readBody(t, "429_paid_rpm.json")})
	if first.Classification != api.ClassRateMinute || first.Action == "" {
		t.Fatalf("first report %+v", first)
	}
	*now = now.Add(time.Second)
	firstOK := mustReport(t, p, lOK.LeaseID, api.ReportRequest{Status: 200})
	batches := len(st.batches)

	*now = now.Add(reportRetention - time.Second)
	janitor(p)
	want := *first
	want.Duplicate = true
	if r := mustReport(t, p, l429.LeaseID, api.ReportRequest{Status: 200}); *r != want {
		t.Fatalf("repeat at the end of the retention: %+v, want %+v", r, want)
	}
	*now = now.Add(time.Nanosecond)
	if e := reportErr(t, p, l429.LeaseID, api.ReportRequest{Status: 200}); e.Code != api.CodeNotFound ||
		!strings.Contains(e.Message, "reported over 10m0s ago") {
		t.Fatalf("repeat after the retention: %s %s", e.Code, e.Message)
	}
	wantOK := *firstOK
	wantOK.Duplicate = true
	if r := mustReport(t, p, lOK.LeaseID, api.ReportRequest{Outcome: api.OutcomeUnused}); *r != wantOK {
		t.Fatalf("repeat of the success: %+v, want %+v", r, wantOK)
	}
	if len(st.batches) != batches {
		t.Fatalf("repeated reports committed %d batches", len(st.batches)-batches)
	}
	*now = now.Add(time.Second)
	janitor(p)
	reportErr(t, p, lOK.LeaseID, api.ReportRequest{Status: 200})
	if len(p.leases) != 0 || len(p.reported.gens) != 0 {
		t.Fatalf("after the retention: %d leases, %d generations of answers", len(p.leases), len(p.reported.gens))
	}
}

// An unreported lease stays reportable, in full, until leaseGrace after
// its expiry; reported then, its answer stays reportRetention.
func TestLateReportsUntilLeaseGrace(t *testing.T) {
	st := &memStore{}
	p, now := clockPool(t, st, twoKeysOneProject)
	late := mustLease(t, p, api.LeaseRequest{Model: "m"})
	never := mustLease(t, p, api.LeaseRequest{Model: "m"})
	*now = late.ExpiresAt
	janitor(p)
	if s := p.status("x"); s.Keys[0].InFlight+s.Keys[1].InFlight != 0 || len(p.lapsed) != 2 {
		t.Fatalf("after expiry: keys %+v, %d lapsed", s.Keys, len(p.lapsed))
	}
	*now = late.ExpiresAt.Add(leaseGrace)
	janitor(p)
	r := mustReport(t, p, late.LeaseID, api.ReportRequest{Outcome: api.OutcomeUnused})
	if r.Duplicate || r.Classification != api.ClassUnused {
		t.Fatalf("late report %+v", r)
	}
	if b := st.batches[len(st.batches)-1]; len(b.Leases) != 1 || !b.Leases[0].Reported || b.Leases[0].Client != "" ||
		b.Leases[0].KeyID != late.KeyID || !b.Leases[0].GrantedAt.Equal(late.ExpiresAt.Add(-10*time.Minute)) {
		t.Fatalf("late report's record %+v", b.Leases)
	}
	*now = now.Add(time.Nanosecond)
	janitor(p)
	if e := reportErr(t, p, never.LeaseID, api.ReportRequest{Status: 200}); e.Code != api.CodeNotFound {
		t.Fatalf("report after the grace: %s %s", e.Code, e.Message)
	}
	if len(p.lapsed) != 0 || len(p.leases) != 0 {
		t.Fatalf("%d lapsed, %d leases left", len(p.lapsed), len(p.leases))
	}
	// The late report's answer outlives the lease's grace.
	if r := mustReport(t, p, late.LeaseID, api.ReportRequest{Status: 200}); !r.Duplicate || r.Classification != api.ClassUnused {
		t.Fatalf("repeat of the late report %+v", r)
	}
}

// After a restart a repeated report gets the answer it got before, up to
// reportRetention after the first report, and the store keeps the records
// of reported leases only for about that long.
func TestRepeatedReportsAcrossARestart(t *testing.T) {
	var now time.Time
	open := restartable(t, &now)
	st, p := open()
	l1 := mustLease(t, p, api.LeaseRequest{Model: "m"})
	l2 := mustLease(t, p, api.LeaseRequest{Model: "m"})
	open3 := mustLease(t, p, api.LeaseRequest{Model: "m"})
	r1 := *mustReport(t, p, l1.LeaseID, api.ReportRequest{Status: 429, Error: readBody(t, "429_no_details_capacity.json")})
	now = now.Add(time.Minute)
	r2 := *mustReport(t, p, l2.LeaseID, api.ReportRequest{Status: 200})
	st.Close()

	now = now.Add(reportRetention - time.Minute) // l1's report is reportRetention old
	st, p = open()
	r1.Duplicate, r2.Duplicate = true, true
	if r := mustReport(t, p, l1.LeaseID, api.ReportRequest{Status: 200}); *r != r1 {
		t.Fatalf("l1 after restart %+v, want %+v", r, r1)
	}
	if r := mustReport(t, p, l2.LeaseID, api.ReportRequest{Status: 200}); *r != r2 {
		t.Fatalf("l2 after restart %+v, want %+v", r, r2)
	}
	// open3 lapsed while keyd was stopped: it is still reportable.
	if len(p.leases) != 1 || len(p.lapsed) != 1 || p.leases[open3.LeaseID] == nil {
		t.Fatalf("restored %d unreported leases (%d lapsed), want open3 lapsed", len(p.leases), len(p.lapsed))
	}
	now = now.Add(time.Nanosecond)
	reportErr(t, p, l1.LeaseID, api.ReportRequest{Status: 200})
	if err := st.Prune(now.Add(-(p.cfg.LeaseTTL + leaseGrace)), now.Add(-reportRetention), now.Add(-24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	st.Close()

	st, p = open()
	defer st.Close()
	reportErr(t, p, l1.LeaseID, api.ReportRequest{Status: 200})
	if r := mustReport(t, p, l2.LeaseID, api.ReportRequest{Status: 200}); *r != r2 {
		t.Fatalf("l2 after the second restart %+v, want %+v", r, r2)
	}
	s, err := st.Load(time.Time{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, l := range s.Leases {
		ids = append(ids, l.ID)
	}
	want := []string{l2.LeaseID, open3.LeaseID}
	slices.Sort(ids)
	slices.Sort(want)
	if !slices.Equal(ids, want) {
		t.Fatalf("store keeps %q after the prune, want %q (l2, open3)", ids, want)
	}
}

// The answers of a steady flow of reports are held in a few generations,
// dropped whole as they age.
func TestReportedLeasesAreForgottenInGenerations(t *testing.T) {
	p, now := clockPool(t, engineStore{}, `{"keys":[{"key_id":"k","model_name":"m","rpm":1000000,"tpm":1000000000}]}`)
	var ids []string
	for range 3 * reportRetention / time.Second {
		l := mustLease(t, p, api.LeaseRequest{Model: "m"})
		mustReport(t, p, l.LeaseID, api.ReportRequest{Status: 200})
		ids = append(ids, l.LeaseID)
		*now = now.Add(time.Second)
		janitor(p)
		if n := len(p.reported.gens); n > int(reportRetention/reportGenSpan)+1 {
			t.Fatalf("%d generations", n)
		}
	}
	held := 0
	for _, g := range p.reported.gens {
		held += len(g.answers)
	}
	if max := int((reportRetention + reportGenSpan) / time.Second); held > max {
		t.Fatalf("%d answers held, want at most %d", held, max)
	}
	for i, id := range ids {
		_, err := p.report(context.Background(), id, &api.ReportRequest{Status: 200})
		if age := time.Duration(len(ids)-i) * time.Second; (err == nil) != (age <= reportRetention) {
			t.Fatalf("lease reported %v ago: %v", age, err)
		}
	}
	if len(p.reported.names) != 2 {
		t.Fatalf("names %q, want the key and success", p.reported.names)
	}
}

func TestLeaseKey(t *testing.T) {
	for range 100 {
		id := newLeaseID(time.Now())
		if _, ok := parseLeaseKey(id); !ok {
			t.Fatalf("%s does not parse", id)
		}
	}
	id := newLeaseID(time.Unix(0, -1)) // before 1970: all ones
	k, ok := parseLeaseKey(id)
	if !ok || k[0] != 0xff || k[7] != 0xff {
		t.Fatalf("%s: %x %v", id, k, ok)
	}
	for _, bad := range []string{"", "l", id[:32], id + "0", "m" + id[1:], strings.ToUpper(id), id[:32] + "g", "l" + strings.Repeat("A", 32)} {
		if _, ok := parseLeaseKey(bad); ok {
			t.Errorf("%q parsed", bad)
		}
	}
}

// A lease reported late (after it expired) keeps its answer across a
// restart and a prune for reportRetention after the report, although its
// grant is older than what a restart restores for unreported leases.
func TestLateReportAcrossARestart(t *testing.T) {
	var now time.Time
	open := restartable(t, &now)
	st, p := open()
	l := mustLease(t, p, api.LeaseRequest{Model: "m"})
	now = l.ExpiresAt.Add(leaseGrace - 5*time.Minute) // late, within the grace
	janitor(p)
	r := *mustReport(t, p, l.LeaseID, api.ReportRequest{Status: 200})
	st.Close()

	now = now.Add(reportRetention - time.Minute) // the grant is older than lease_ttl + leaseGrace
	st, p = open()
	if err := st.Prune(now.Add(-(p.cfg.LeaseTTL + leaseGrace)), now.Add(-(reportRetention + time.Minute)), now.Add(-24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	st.Close()
	st, p = open()
	defer st.Close()
	r.Duplicate = true
	if got := mustReport(t, p, l.LeaseID, api.ReportRequest{Status: 200}); *got != r {
		t.Fatalf("late report repeated after a restart: %+v, want %+v", got, r)
	}
}

// restartable returns a function that opens the store of one state dir
// and a pool restored from it, as keyd does at a start: call it again after
// closing the store for a restart. The pool's clock reads *now, which the
// first call sets to the test pools' start time if it is zero.
func restartable(t *testing.T, now *time.Time) func() (*store.DB, *pool) {
	dir := t.TempDir()
	return func() (*store.DB, *pool) {
		st, err := store.Open(dir, store.Options{})
		if err != nil {
			t.Fatal(err)
		}
		p, clock := clockPool(t, st, twoKeysOneProject)
		if now.IsZero() {
			*now = *clock
		}
		p.now = func() time.Time { return *now }
		restoreFrom(t, p, st, *now)
		return st, p
	}
}
