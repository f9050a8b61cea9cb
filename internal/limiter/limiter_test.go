package limiter_test

import (
	"strings"
	"testing"
	"time"
	_ "time/tzdata" // the tests must not depend on the host's zoneinfo

	"github.com/keyd/keyd/internal/limiter"
)

// la is the day-reset time zone of the spec: its 2026 days of 23 h
// (2026-03-08) and 25 h (2026-11-01) are the ones tested.
var la = func() *time.Location {
	loc, err := time.LoadLocation("America/Los_Angeles")
	if err != nil {
		panic(err)
	}
	return loc
}()

// t0 is the fixed instant the tables count from, as in x/time/rate's
// tests: an ordinary June noon, far from any midnight or DST change.
var t0 = time.Date(2026, 6, 15, 12, 0, 0, 0, la)

// local returns an instant given as a wall time in la. It must not be
// ambiguous (the repeated hour of 2026-11-01 is given in UTC instead).
func local(y int, mo time.Month, d, h, mi, s, ns int) time.Time {
	return time.Date(y, mo, d, h, mi, s, ns, la)
}

func utc(s string) time.Time {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		panic(err)
	}
	return t
}

const sec = time.Second

// op is one step of a table test, run against one bucket.
type op func(t *testing.T, b *limiter.Bucket)

// want checks the decision of Check(at, tokens). reason is a prefix of the
// expected reason ("" when OK). A want with ok also grants nothing: use
// grant for that.
func want(at time.Time, tokens int64, w limiter.Decision) op {
	return func(t *testing.T, b *limiter.Bucket) {
		t.Helper()
		got := b.Check(at, tokens)
		if got.OK != w.OK || got.Never != w.Never || got.Wait != w.Wait || !strings.HasPrefix(got.Reason, w.Reason) {
			t.Errorf("Check(%v, %d) = %+v, want %+v", at.Format(time.RFC3339Nano), tokens, got, w)
		}
		if !got.OK && got.Reason == "" {
			t.Errorf("Check(%v, %d) = %+v: refused without a reason", at.Format(time.RFC3339Nano), tokens, got)
		}
	}
}

func ok(at time.Time, tokens int64) op { return want(at, tokens, limiter.Decision{OK: true}) }

func blocked(at time.Time, tokens int64, wait time.Duration, reason string) op {
	return want(at, tokens, limiter.Decision{Wait: wait, Reason: reason})
}

func never(at time.Time, tokens int64, reason string) op {
	return want(at, tokens, limiter.Decision{Never: true, Reason: reason})
}

// exact checks the promise of Check's Wait for a refusal at `at`: at
// at+wait a Check succeeds and at at+wait-1ns it does not. Like the
// daemon's clock, it moves the bucket's time on to at+wait: ops after it
// must not go back.
func exact(at time.Time, tokens int64, wait time.Duration, reason string) op {
	return func(t *testing.T, b *limiter.Bucket) {
		t.Helper()
		blocked(at, tokens, wait, reason)(t, b)
		blocked(at.Add(wait-1), tokens, 1, reason)(t, b)
		ok(at.Add(wait), tokens)(t, b)
	}
}

// grant makes a grant the way the daemon does: only after an OK Check.
func grant(at time.Time, id string, tokens int64) op {
	return func(t *testing.T, b *limiter.Bucket) {
		t.Helper()
		if d := b.Check(at, tokens); !d.OK {
			t.Fatalf("grant %s at %v: Check = %+v", id, at.Format(time.RFC3339Nano), d)
		}
		b.Grant(at, id, tokens)
	}
}

func usage(at time.Time, w limiter.Usage) op {
	return func(t *testing.T, b *limiter.Bucket) {
		t.Helper()
		if got := b.Usage(at); got != w {
			t.Errorf("Usage(%v) = %+v, want %+v", at.Format(time.RFC3339Nano), got, w)
		}
	}
}

func day(at time.Time, wantDay string, wantN int64) op {
	return func(t *testing.T, b *limiter.Bucket) {
		t.Helper()
		if d, n := b.Day(at); d != wantDay || n != wantN {
			t.Errorf("Day(%v) = %s, %d, want %s, %d", at.Format(time.RFC3339Nano), d, n, wantDay, wantN)
		}
	}
}

func do(f func(b *limiter.Bucket)) op {
	return func(t *testing.T, b *limiter.Bucket) { f(b) }
}

func penalty(at time.Time, w limiter.Penalty) op {
	return func(t *testing.T, b *limiter.Bucket) {
		t.Helper()
		if got := b.Penalty(at); got != w {
			t.Errorf("Penalty(%v) = %+v, want %+v", at.Format(time.RFC3339Nano), got, w)
		}
	}
}

// restart replaces the bucket the way the daemon does after a restart:
// New, then Restore from what the store holds (the grants of the window
// with their current token counts, the day and its count), then
// SetPenalty.
func restart(at time.Time, grants []limiter.Grant) op {
	return restartWith(at, limiter.Limits{}, grants)
}

// restartWith is restart with new limits (zero: the same), as after an
// edit of the configuration while the daemon was down.
func restartWith(at time.Time, l limiter.Limits, grants []limiter.Grant) op {
	return func(t *testing.T, b *limiter.Bucket) {
		d, n := b.Day(at)
		p := b.Penalty(at)
		if l == (limiter.Limits{}) {
			l = b.Limits()
		}
		nb := limiter.New(l, la)
		nb.Restore(at, grants, d, n)
		nb.SetPenalty(p)
		*b = *nb
	}
}

type tcase struct {
	name   string
	limits limiter.Limits
	ops    []op
}

type table []tcase

func (tt table) run(t *testing.T) {
	t.Helper()
	for _, tc := range tt {
		t.Run(tc.name, func(t *testing.T) {
			b := limiter.New(tc.limits, la)
			for _, o := range tc.ops {
				o(t, b)
			}
		})
	}
}

func TestRPM(t *testing.T) {
	big := int64(1 << 40)
	table{
		{"window of 60 s", limiter.Limits{RPM: 3, TPM: big}, []op{
			grant(t0, "a", 1),
			grant(t0.Add(1*sec), "b", 1),
			grant(t0.Add(2*sec), "c", 1),
			usage(t0.Add(60*sec-1), limiter.Usage{Requests: 3, Tokens: 3, Day: 3}),
			exact(t0.Add(2*sec), 1, 58*sec, "rpm 3/3"),
			usage(t0.Add(60*sec), limiter.Usage{Requests: 2, Tokens: 2, Day: 3}),
			grant(t0.Add(60*sec), "d", 1),
			exact(t0.Add(60*sec), 1, 1*sec, "rpm 3/3"),
		}},
		{"same instant", limiter.Limits{RPM: 2, TPM: big}, []op{
			grant(t0, "a", 1),
			grant(t0, "b", 1),
			exact(t0, 1, 60*sec, "rpm 2/2"),
			grant(t0.Add(60*sec), "c", 1),
			grant(t0.Add(60*sec), "d", 1),
			blocked(t0.Add(60*sec), 1, 60*sec, "rpm 2/2"),
		}},
		{"the n-rpm+1 oldest must leave", limiter.Limits{RPM: 3, TPM: big}, []op{
			grant(t0, "a", 1),
			grant(t0.Add(10*sec), "b", 1),
			grant(t0.Add(20*sec), "c", 1),
			exact(t0.Add(30*sec), 1, 30*sec, "rpm 3/3"),
			grant(t0.Add(60*sec), "d", 1),
			exact(t0.Add(60*sec), 1, 10*sec, "rpm 3/3"),
		}},
		{"rpm 1", limiter.Limits{RPM: 1, TPM: big}, []op{
			grant(t0, "a", 1),
			exact(t0.Add(1), 1, 60*sec-1, "rpm 1/1"),
		}},
	}.run(t)
}

func TestTPM(t *testing.T) {
	l := limiter.Limits{RPM: 100, TPM: 100}
	table{
		{"window of 60 s", l, []op{
			grant(t0, "a", 60),
			grant(t0.Add(10*sec), "b", 30),
			ok(t0.Add(10*sec), 10),
			exact(t0.Add(10*sec), 11, 50*sec, "tpm 90+11/100"),
			usage(t0.Add(60*sec), limiter.Usage{Requests: 1, Tokens: 30, Day: 2}),
			exact(t0.Add(60*sec), 71, 10*sec, "tpm 30+71/100"),
		}},
		{"wait until enough tokens leave", l, []op{
			grant(t0, "a", 10),
			grant(t0.Add(5*sec), "b", 50),
			grant(t0.Add(10*sec), "c", 30),
			// 90+50 is 40 over: a (10) is not enough, a and b (60) are.
			blocked(t0.Add(10*sec), 50, 55*sec, "tpm 90+50/100"),
			exact(t0.Add(10*sec), 20, 50*sec, "tpm 90+20/100"),
			blocked(t0.Add(60*sec), 50, 5*sec, "tpm 80+50/100"),
			exact(t0.Add(60*sec), 50, 5*sec, "tpm 80+50/100"),
		}},
		{"more than tpm is never", l, []op{
			ok(t0, 100),
			never(t0, 101, "101 tokens exceed tpm 100"),
			grant(t0, "a", 100),
			never(t0, 101, "101 tokens exceed tpm 100"),
			blocked(t0, 1, 60*sec, "tpm 100+1/100"),
		}},
		{"reconcile replaces the estimate", l, []op{
			grant(t0, "a", 80),
			blocked(t0.Add(1*sec), 30, 59*sec, "tpm 80+30/100"),
			do(func(b *limiter.Bucket) { b.Reconcile("a", t0, 20) }),
			usage(t0.Add(1*sec), limiter.Usage{Requests: 1, Tokens: 20, Day: 1}),
			ok(t0.Add(1*sec), 80),
			// The provider counted more than estimated: the window is over
			// tpm until the grant leaves.
			do(func(b *limiter.Bucket) { b.Reconcile("a", t0, 150) }),
			usage(t0.Add(1*sec), limiter.Usage{Requests: 1, Tokens: 150, Day: 1}),
			blocked(t0.Add(1*sec), 1, 59*sec, "tpm 150+1/100"),
			// Unknown ids and grants that left the window change nothing.
			do(func(b *limiter.Bucket) { b.Reconcile("nope", t0, 0) }),
			do(func(b *limiter.Bucket) { b.Reconcile("a", t0.Add(1), 0) }),
			usage(t0.Add(1*sec), limiter.Usage{Requests: 1, Tokens: 150, Day: 1}),
			usage(t0.Add(60*sec), limiter.Usage{Requests: 0, Tokens: 0, Day: 1}),
			do(func(b *limiter.Bucket) { b.Reconcile("a", t0, 10) }),
			usage(t0.Add(60*sec), limiter.Usage{Requests: 0, Tokens: 0, Day: 1}),
			ok(t0.Add(60*sec), 100),
		}},
		{"reconcile finds the grant among several at one instant", l, []op{
			grant(t0, "a", 10),
			grant(t0, "b", 20),
			grant(t0, "c", 30),
			do(func(b *limiter.Bucket) { b.Reconcile("b", t0, 5) }),
			usage(t0, limiter.Usage{Requests: 3, Tokens: 45, Day: 3}),
		}},
	}.run(t)
}

func TestNextReset(t *testing.T) {
	for _, tc := range []struct{ at, want string }{
		{"2026-06-15T19:00:00Z", "2026-06-16T07:00:00Z"}, // noon PDT
		{"2026-06-16T06:59:59.999999999Z", "2026-06-16T07:00:00Z"},
		{"2026-06-16T07:00:00Z", "2026-06-17T07:00:00Z"},
		{"2026-03-07T20:00:00Z", "2026-03-08T08:00:00Z"}, // noon PST
		// 2026-03-08 has 23 h: 00:00 PST to 00:00 PDT.
		{"2026-03-08T08:00:00Z", "2026-03-09T07:00:00Z"},
		{"2026-03-08T09:59:59.999999999Z", "2026-03-09T07:00:00Z"}, // 01:59:59 PST
		{"2026-03-08T10:00:00Z", "2026-03-09T07:00:00Z"},           // 03:00 PDT
		{"2026-03-09T06:59:59.999999999Z", "2026-03-09T07:00:00Z"},
		{"2026-03-09T07:00:00Z", "2026-03-10T07:00:00Z"},
		// 2026-11-01 has 25 h: 00:00 PDT to 00:00 PST, 01:xx twice.
		{"2026-10-31T06:59:59Z", "2026-10-31T07:00:00Z"},
		{"2026-11-01T07:00:00Z", "2026-11-02T08:00:00Z"},
		{"2026-11-01T08:30:00Z", "2026-11-02T08:00:00Z"}, // 01:30 PDT
		{"2026-11-01T09:30:00Z", "2026-11-02T08:00:00Z"}, // 01:30 PST
		{"2026-11-02T07:59:59.999999999Z", "2026-11-02T08:00:00Z"},
		{"2026-11-02T08:00:00Z", "2026-11-03T08:00:00Z"},
		{"2026-12-31T23:00:00-08:00", "2027-01-01T08:00:00Z"},
	} {
		if got := limiter.NextReset(utc(tc.at), la); !got.Equal(utc(tc.want)) {
			t.Errorf("NextReset(%s) = %s, want %s", tc.at, got.UTC().Format(time.RFC3339Nano), tc.want)
		}
	}
	if got, want := limiter.NextReset(utc("2026-03-08T12:00:00Z"), time.UTC), utc("2026-03-09T00:00:00Z"); !got.Equal(want) {
		t.Errorf("NextReset in UTC = %s, want %s", got, want)
	}
}

func TestRPD(t *testing.T) {
	l := limiter.Limits{RPM: 100, TPM: 1 << 40, RPD: 3}
	var tt table
	for _, tc := range []struct {
		name       string
		start, end time.Time // first and last instant of the local day
		length     time.Duration
		date, next string
	}{
		{"24 h", local(2026, 6, 15, 0, 0, 0, 0), local(2026, 6, 15, 23, 59, 59, 999999999), 24 * time.Hour, "2026-06-15", "2026-06-16"},
		{"23 h", local(2026, 3, 8, 0, 0, 0, 0), local(2026, 3, 8, 23, 59, 59, 999999999), 23 * time.Hour, "2026-03-08", "2026-03-09"},
		{"25 h", local(2026, 11, 1, 0, 0, 0, 0), local(2026, 11, 1, 23, 59, 59, 999999999), 25 * time.Hour, "2026-11-01", "2026-11-02"},
	} {
		if got := tc.end.Sub(tc.start) + 1; got != tc.length {
			t.Fatalf("%s: the day lasts %v", tc.name, got)
		}
		mid := tc.start.Add(tc.length / 2)
		tt = append(tt, tcase{tc.name, l, []op{
			// The last instant of the day before does not count.
			grant(tc.start.Add(-1), "eve", 1),
			day(tc.start.Add(-1), tc.start.Add(-1).Format(time.DateOnly), 1),
			grant(tc.start, "a", 1),
			day(tc.start, tc.date, 1),
			grant(mid, "b", 1),
			grant(tc.end, "c", 1),
			day(tc.end, tc.date, 3),
			exact(tc.end, 1, 1, "rpd 3/3"),
			day(tc.end.Add(1), tc.next, 0),
		}})
		tt = append(tt, tcase{tc.name + " wait", limiter.Limits{RPM: 100, TPM: 1 << 40, RPD: 1}, []op{
			grant(tc.start, "a", 1),
			blocked(tc.start, 1, tc.length, "rpd 1/1"),
			blocked(tc.start.Add(3*time.Hour), 1, tc.length-3*time.Hour, "rpd 1/1"),
			exact(mid, 1, tc.length-tc.length/2, "rpd 1/1"),
		}})
	}
	tt.run(t)
}

func TestPacing(t *testing.T) {
	big := int64(1 << 40)
	table{
		{"burst then one a second", limiter.Limits{RPM: 60, TPM: big, BurstCapacity: 3}, []op{
			grant(t0, "a", 1),
			grant(t0, "b", 1),
			grant(t0, "c", 1),
			exact(t0, 1, 1*sec, "paced: burst_capacity 3 at 60/min"),
			grant(t0.Add(1*sec), "d", 1),
			blocked(t0.Add(1*sec), 1, 1*sec, "paced"),
			exact(t0.Add(1500*time.Millisecond), 1, 500*time.Millisecond, "paced"),
			// Idle time refills up to the burst capacity only.
			grant(t0.Add(30*sec), "e", 1),
			grant(t0.Add(30*sec), "f", 1),
			grant(t0.Add(30*sec), "g", 1),
			blocked(t0.Add(30*sec), 1, 1*sec, "paced"),
		}},
		{"a rate that is not a whole number per second", limiter.Limits{RPM: 7, TPM: big, BurstCapacity: 1}, []op{
			grant(t0, "a", 1),
			// 60/7 s is 8.571428571428... s: the wait rounds up.
			exact(t0, 1, 8571428572, "paced"),
		}},
		{"the window caps what the token bucket would allow", limiter.Limits{RPM: 3, TPM: big, BurstCapacity: 3}, []op{
			grant(t0, "a", 1),
			grant(t0, "b", 1),
			grant(t0, "c", 1),
			// The token bucket has 1 token back at 20 s, 2 at 40 s, 3 at
			// 60 s; the window is full until 60 s.
			blocked(t0.Add(20*sec), 1, 40*sec, "rpm 3/3"),
			exact(t0.Add(40*sec), 1, 20*sec, "rpm 3/3"),
		}},
		{"pacing decides when it is the longer wait", limiter.Limits{RPM: 2, TPM: big, BurstCapacity: 1}, []op{
			grant(t0, "a", 1),
			exact(t0, 1, 30*sec, "paced"),
			grant(t0.Add(30*sec), "b", 1),
			exact(t0.Add(30*sec), 1, 30*sec, "rpm 2/2"),
		}},
	}.run(t)
}

func TestSetLimits(t *testing.T) {
	big := int64(1 << 40)
	set := func(at time.Time, l limiter.Limits) op {
		return do(func(b *limiter.Bucket) { b.SetLimits(l, at) })
	}
	l := limiter.Limits{RPM: 5, TPM: 100, RPD: 10}
	table{
		{"lower rpm blocks at once", l, []op{
			grant(t0, "a", 1),
			grant(t0.Add(1*sec), "b", 1),
			grant(t0.Add(2*sec), "c", 1),
			grant(t0.Add(3*sec), "d", 1),
			set(t0.Add(3*sec), limiter.Limits{RPM: 2, TPM: 100, RPD: 10}),
			// 4 in the window, 2 allowed: the 3rd oldest must leave.
			blocked(t0.Add(3*sec), 1, 59*sec, "rpm 4/2"),
			set(t0.Add(4*sec), l),
			ok(t0.Add(4*sec), 1),
			set(t0.Add(4*sec), limiter.Limits{RPM: 2, TPM: 100, RPD: 10}),
			blocked(t0.Add(4*sec), 1, 58*sec, "rpm 4/2"),
			// At 62 s-1ns, 2 grants are left: "rpm 2/2".
			exact(t0.Add(4*sec), 1, 58*sec, "rpm "),
			usage(t0.Add(62*sec), limiter.Usage{Requests: 1, Tokens: 1, Day: 4}),
		}},
		{"lower tpm and rpd block at once", l, []op{
			grant(t0, "a", 40),
			grant(t0.Add(1*sec), "b", 40),
			set(t0.Add(1*sec), limiter.Limits{RPM: 5, TPM: 50, RPD: 10}),
			blocked(t0.Add(1*sec), 1, 59*sec, "tpm 80+1/50"),
			never(t0.Add(1*sec), 51, "51 tokens exceed tpm 50"),
			set(t0.Add(2*sec), limiter.Limits{RPM: 5, TPM: 100, RPD: 2}),
			blocked(t0.Add(2*sec), 1, limiter.NextReset(t0, la).Sub(t0.Add(2*sec)), "rpd 2/2"),
			set(t0.Add(2*sec), l),
			ok(t0.Add(2*sec), 20),
		}},
		{"a reload keeps the day count", l, []op{
			grant(t0, "a", 1),
			grant(t0.Add(1*sec), "b", 1),
			set(t0.Add(2*sec), l),
			set(t0.Add(2*sec), limiter.Limits{RPM: 50, TPM: 1000, RPD: 100}),
			usage(t0.Add(2*sec), limiter.Usage{Requests: 2, Tokens: 2, Day: 2}),
		}},
		{"a reload never refills the pacer", limiter.Limits{RPM: 60, TPM: big, BurstCapacity: 3}, []op{
			grant(t0, "a", 1),
			grant(t0, "b", 1),
			grant(t0, "c", 1),
			set(t0.Add(500*time.Millisecond), limiter.Limits{RPM: 60, TPM: big, BurstCapacity: 3}),
			blocked(t0.Add(500*time.Millisecond), 1, 500*time.Millisecond, "paced"),
			set(t0.Add(500*time.Millisecond), limiter.Limits{RPM: 60, TPM: big, BurstCapacity: 10}),
			blocked(t0.Add(500*time.Millisecond), 1, 500*time.Millisecond, "paced"),
			// Pacing off, then on again: still no refill.
			set(t0.Add(500*time.Millisecond), limiter.Limits{RPM: 60, TPM: big}),
			ok(t0.Add(500*time.Millisecond), 1),
			set(t0.Add(500*time.Millisecond), limiter.Limits{RPM: 60, TPM: big, BurstCapacity: 3}),
			blocked(t0.Add(500*time.Millisecond), 1, 500*time.Millisecond, "paced"),
		}},
		{"a faster rate refills faster from now on", limiter.Limits{RPM: 60, TPM: big, BurstCapacity: 1}, []op{
			grant(t0, "a", 1),
			set(t0.Add(500*time.Millisecond), limiter.Limits{RPM: 120, TPM: big, BurstCapacity: 1}),
			// Half a token at 1/s, the other half at 2/s.
			exact(t0.Add(500*time.Millisecond), 1, 250*time.Millisecond, "paced"),
		}},
	}.run(t)
}

func TestRefund(t *testing.T) {
	l := limiter.Limits{RPM: 2, TPM: 100, RPD: 3}
	table{
		{"leaves the window and the day", l, []op{
			grant(t0, "a", 30),
			grant(t0.Add(1*sec), "b", 50),
			blocked(t0.Add(1*sec), 1, 59*sec, "rpm 2/2"),
			do(func(b *limiter.Bucket) { b.Refund(t0.Add(2*sec), "a", t0) }),
			usage(t0.Add(2*sec), limiter.Usage{Requests: 1, Tokens: 50, Day: 1}),
			ok(t0.Add(2*sec), 50),
		}},
		{"twice, or an unknown grant, changes nothing", l, []op{
			grant(t0, "a", 30),
			grant(t0, "b", 30),
			do(func(b *limiter.Bucket) { b.Refund(t0.Add(1*sec), "a", t0) }),
			do(func(b *limiter.Bucket) { b.Refund(t0.Add(1*sec), "a", t0) }),
			do(func(b *limiter.Bucket) { b.Refund(t0.Add(1*sec), "zz", t0) }),
			do(func(b *limiter.Bucket) { b.Refund(t0.Add(1*sec), "b", t0.Add(1)) }),
			usage(t0.Add(1*sec), limiter.Usage{Requests: 1, Tokens: 30, Day: 1}),
		}},
		{"after the window, the day only", l, []op{
			grant(t0, "a", 30),
			grant(t0.Add(90*sec), "b", 30),
			do(func(b *limiter.Bucket) { b.Refund(t0.Add(90*sec), "a", t0) }),
			usage(t0.Add(90*sec), limiter.Usage{Requests: 1, Tokens: 30, Day: 1}),
		}},
		{"of yesterday, not today's count", l, []op{
			grant(local(2026, 6, 15, 23, 59, 30, 0), "a", 30),
			grant(local(2026, 6, 16, 0, 0, 10, 0), "b", 30),
			do(func(b *limiter.Bucket) {
				b.Refund(local(2026, 6, 16, 0, 0, 20, 0), "a", local(2026, 6, 15, 23, 59, 30, 0))
			}),
			usage(local(2026, 6, 16, 0, 0, 20, 0), limiter.Usage{Requests: 1, Tokens: 30, Day: 1}),
		}},
		{"one of several at one instant", limiter.Limits{RPM: 5, TPM: 100}, []op{
			grant(t0, "a", 10),
			grant(t0, "b", 20),
			grant(t0, "c", 40),
			do(func(b *limiter.Bucket) { b.Refund(t0, "b", t0) }),
			usage(t0, limiter.Usage{Requests: 2, Tokens: 50, Day: 2}),
			do(func(b *limiter.Bucket) { b.Reconcile("c", t0, 5) }),
			usage(t0, limiter.Usage{Requests: 2, Tokens: 15, Day: 2}),
		}},
	}.run(t)
}

func TestRestore(t *testing.T) {
	big := int64(1 << 40)
	l := limiter.Limits{RPM: 3, TPM: 100, RPD: 4}
	g := func(id string, at time.Time, tokens int64) limiter.Grant {
		return limiter.Grant{ID: id, At: at, Tokens: tokens}
	}
	table{
		{"window, reconciled tokens and day count survive", l, []op{
			grant(t0, "a", 10),
			grant(t0.Add(30*sec), "b", 50),
			grant(t0.Add(40*sec), "c", 20),
			do(func(b *limiter.Bucket) { b.Reconcile("b", t0.Add(30*sec), 60) }),
			// The store holds older grants too, in any order.
			restart(t0.Add(50*sec), []limiter.Grant{
				g("c", t0.Add(40*sec), 20), g("old", t0.Add(-10*sec), 99),
				g("a", t0, 10), g("b", t0.Add(30*sec), 60),
			}),
			usage(t0.Add(50*sec), limiter.Usage{Requests: 3, Tokens: 90, Day: 3}),
			blocked(t0.Add(50*sec), 1, 10*sec, "rpm 3/3"),
			blocked(t0.Add(60*sec), 21, 30*sec, "tpm 80+21/100"),
			do(func(b *limiter.Bucket) { b.Reconcile("c", t0.Add(40*sec), 0) }),
			grant(t0.Add(60*sec), "d", 40),
			usage(t0.Add(60*sec), limiter.Usage{Requests: 3, Tokens: 100, Day: 4}),
			exact(t0.Add(60*sec), 0, 12*time.Hour-time.Minute, "rpd 4/4"),
		}},
		{"a day count of another day is not today's", l, []op{
			do(func(b *limiter.Bucket) { b.Restore(t0, nil, "2026-06-14", 5) }),
			day(t0, "2026-06-15", 0),
			do(func(b *limiter.Bucket) { b.Restore(t0, nil, "2026-06-15", 4) }),
			blocked(t0, 1, 12*time.Hour, "rpd 4/4"),
		}},
		{"the pacer is replayed", limiter.Limits{RPM: 60, TPM: big, BurstCapacity: 3}, []op{
			grant(t0, "a", 1),
			grant(t0, "b", 1),
			grant(t0, "c", 1),
			restart(t0.Add(500*time.Millisecond), []limiter.Grant{g("a", t0, 1), g("b", t0, 1), g("c", t0, 1)}),
			exact(t0.Add(500*time.Millisecond), 1, 500*time.Millisecond, "paced"),
		}},
		{"the pacer is charged for every grant, even over lowered limits", limiter.Limits{RPM: 60, TPM: big, BurstCapacity: 3}, []op{
			grant(t0, "a", 1),
			grant(t0, "b", 1),
			grant(t0, "c", 1),
			grant(t0.Add(1*sec), "d", 1),
			// burst_capacity lowered to 2 while down: the replay starts with
			// 2 tokens and owes 2 after a, b, c, d. Forgiving c, as
			// AllowN would, allowed a grant at 2 s: 5 grants in 2 s, over
			// the 2 + 2 the new limits admit.
			restartWith(t0.Add(1*sec), limiter.Limits{RPM: 60, TPM: big, BurstCapacity: 2}, []limiter.Grant{
				g("a", t0, 1), g("b", t0, 1), g("c", t0, 1), g("d", t0.Add(1*sec), 1),
			}),
			exact(t0.Add(1*sec), 1, 2*sec, "paced"),
		}},
		{"the penalty survives", l, []op{
			do(func(b *limiter.Bucket) { b.Cool(t0, 30*sec, "429") }),
			restart(t0.Add(10*sec), nil),
			penalty(t0.Add(10*sec), limiter.Penalty{State: limiter.Cooling, Until: t0.Add(30 * sec), Reason: "429", Streak: 1}),
			exact(t0.Add(10*sec), 1, 20*sec, "cooling: 429"),
		}},
	}.run(t)
}

func TestCool(t *testing.T) {
	l := limiter.Limits{RPM: 10, TPM: 1000}
	t.Run("doubles per streak up to MaxCooldown", func(t *testing.T) {
		for _, retry := range []time.Duration{0, sec, 7 * sec} {
			b := limiter.New(l, la)
			now := t0
			base := max(retry, limiter.MinCooldown)
			for streak := range 14 {
				want := min(base<<min(streak, 20), limiter.MaxCooldown)
				until := b.Cool(now, retry, "429")
				if got := until.Sub(now); got != want {
					t.Errorf("retry %v, streak %d: cooldown %v, want %v", retry, streak, got, want)
				}
				if p := b.Penalty(now); p.State != limiter.Cooling || p.Streak != streak+1 || !p.Until.Equal(until) {
					t.Errorf("streak %d: penalty %+v", streak, p)
				}
				exact(now, 1, want, "cooling: 429")(t, b)
				now = until
				// The expired penalty is cleared, the streak is kept.
				penalty(now, limiter.Penalty{Streak: streak + 1})(t, b)
			}
		}
	})
	table{
		{"at least until the oldest grant leaves", l, []op{
			grant(t0, "a", 1),
			do(func(b *limiter.Bucket) { b.Cool(t0.Add(10*sec), 5*sec, "429") }),
			exact(t0.Add(10*sec), 1, 50*sec, "cooling: 429"),
			// Streak 1: twice the 50 s the window needed.
			do(func(b *limiter.Bucket) { b.Cool(t0.Add(60*sec), 5*sec, "429") }),
			exact(t0.Add(60*sec), 1, 10*sec, "cooling"),
		}},
		{"Succeeded ends the streak", l, []op{
			do(func(b *limiter.Bucket) { b.Cool(t0, 0, "429") }),
			do(func(b *limiter.Bucket) { b.Cool(t0.Add(1*sec), 0, "429") }),
			penalty(t0.Add(1*sec), limiter.Penalty{State: limiter.Cooling, Until: t0.Add(3 * sec), Reason: "429", Streak: 2}),
			do(func(b *limiter.Bucket) { b.Succeeded() }),
			// Succeeded does not lift the cooldown, only the streak.
			penalty(t0.Add(1*sec), limiter.Penalty{State: limiter.Cooling, Until: t0.Add(3 * sec), Reason: "429"}),
			do(func(b *limiter.Bucket) { b.Cool(t0.Add(3*sec), 0, "429") }),
			penalty(t0.Add(3*sec), limiter.Penalty{State: limiter.Cooling, Until: t0.Add(4 * sec), Reason: "429", Streak: 1}),
		}},
		{"the cooldown covers the limits too", limiter.Limits{RPM: 1, TPM: 1000}, []op{
			grant(t0, "a", 1),
			do(func(b *limiter.Bucket) { b.Backoff(t0, 5*sec, "capacity") }),
			// Waiting out the 5 s would not do: the window is full for 60 s.
			exact(t0, 1, 60*sec, "rpm 1/1"),
		}},
	}.run(t)
}

func TestBackoff(t *testing.T) {
	l := limiter.Limits{RPM: 10, TPM: 1000}
	table{
		{"no streak", l, []op{
			do(func(b *limiter.Bucket) { b.Cool(t0, 0, "429") }),
			do(func(b *limiter.Bucket) { b.Backoff(t0.Add(1*sec), 5*sec, "capacity") }),
			penalty(t0.Add(1*sec), limiter.Penalty{State: limiter.Cooling, Until: t0.Add(6 * sec), Reason: "capacity", Streak: 1}),
			exact(t0.Add(1*sec), 1, 5*sec, "cooling: capacity"),
			penalty(t0.Add(6*sec), limiter.Penalty{Streak: 1}),
		}},
		{"does not shorten a longer cooldown", l, []op{
			do(func(b *limiter.Bucket) { b.Cool(t0, 30*sec, "429") }),
			do(func(b *limiter.Bucket) { b.Backoff(t0.Add(1*sec), 5*sec, "capacity") }),
			penalty(t0.Add(1*sec), limiter.Penalty{State: limiter.Cooling, Until: t0.Add(30 * sec), Reason: "429", Streak: 1}),
		}},
	}.run(t)
}

func TestExhaust(t *testing.T) {
	l := limiter.Limits{RPM: 10, TPM: 1000, RPD: 100}
	for _, tc := range []struct {
		at, until time.Time
	}{
		{t0, local(2026, 6, 16, 0, 0, 0, 0)},
		{local(2026, 3, 8, 0, 0, 0, 0), local(2026, 3, 9, 0, 0, 0, 0)},
		{utc("2026-11-01T09:30:00Z"), local(2026, 11, 2, 0, 0, 0, 0)}, // 01:30 PST
		{local(2026, 11, 1, 23, 59, 59, 999999999), local(2026, 11, 2, 0, 0, 0, 0)},
	} {
		b := limiter.New(l, la)
		b.Grant(tc.at, "a", 1)
		if got := b.Exhaust(tc.at, "rpd 429"); !got.Equal(tc.until) {
			t.Errorf("Exhaust(%v) = %v, want %v", tc.at, got, tc.until)
		}
		// The day's count is what was granted; the penalty blocks.
		if _, n := b.Day(tc.at); n != 1 {
			t.Errorf("Exhaust(%v): day count %d, want 1", tc.at, n)
		}
		exact(tc.at, 1, tc.until.Sub(tc.at), "exhausted: rpd 429")(t, b)
		penalty(tc.until, limiter.Penalty{})(t, b)
	}
	table{
		{"a restart keeps it", l, []op{
			do(func(b *limiter.Bucket) { b.Exhaust(t0, "rpd 429") }),
			restart(t0.Add(1*sec), nil),
			blocked(t0.Add(1*sec), 1, 12*time.Hour-1*sec, "exhausted"),
		}},
		{"Clear reopens the day", l, []op{
			do(func(b *limiter.Bucket) { b.Exhaust(t0, "rpd 429") }),
			do(func(b *limiter.Bucket) { b.Clear() }),
			ok(t0.Add(1*sec), 1),
		}},
	}.run(t)
}

func TestDisable(t *testing.T) {
	l := limiter.Limits{RPM: 10, TPM: 1000}
	table{
		{"until Clear", l, []op{
			do(func(b *limiter.Bucket) { b.Cool(t0, 0, "429") }),
			do(func(b *limiter.Bucket) { b.Disable("billing") }),
			never(t0, 1, "disabled: billing"),
			never(t0.Add(48*time.Hour), 1, "disabled: billing"),
			// Later verdicts on requests in flight do not lift it.
			do(func(b *limiter.Bucket) { b.Cool(t0.Add(48*time.Hour), 0, "429") }),
			do(func(b *limiter.Bucket) { b.Backoff(t0.Add(48*time.Hour), sec, "capacity") }),
			do(func(b *limiter.Bucket) { b.Exhaust(t0.Add(48*time.Hour), "rpd 429") }),
			do(func(b *limiter.Bucket) { b.Succeeded() }),
			never(t0.Add(50*time.Hour), 1, "disabled: billing"),
			restart(t0.Add(50*time.Hour), nil),
			never(t0.Add(50*time.Hour), 1, "disabled: billing"),
			do(func(b *limiter.Bucket) { b.Clear() }),
			penalty(t0.Add(50*time.Hour), limiter.Penalty{}),
			ok(t0.Add(50*time.Hour), 1),
		}},
		{"tokens over tpm are never, whatever the penalty", l, []op{
			do(func(b *limiter.Bucket) { b.Cool(t0, 0, "429") }),
			never(t0, 1001, "1001 tokens exceed tpm 1000"),
			do(func(b *limiter.Bucket) { b.Exhaust(t0, "rpd 429") }),
			never(t0, 1001, "1001 tokens exceed tpm 1000"),
		}},
	}.run(t)
	t.Run("Cool, Backoff and Exhaust do not shorten a penalty", func(t *testing.T) {
		b := limiter.New(l, la)
		reset := b.Exhaust(t0, "rpd 429")
		b.Cool(t0, 0, "429")
		b.Backoff(t0, sec, "capacity")
		if p := b.Penalty(t0); p.State != limiter.Exhausted || !p.Until.Equal(reset) {
			t.Errorf("after Exhaust, Cool and Backoff: %+v", p)
		}
	})
}

func TestClockSteps(t *testing.T) {
	big := int64(1 << 40)
	table{
		{"a grant back in time keeps the window sorted", limiter.Limits{RPM: 3, TPM: big}, []op{
			grant(t0.Add(10*sec), "a", 1),
			grant(t0.Add(5*sec), "b", 2),
			grant(t0.Add(7*sec), "c", 4),
			usage(t0.Add(64*sec), limiter.Usage{Requests: 3, Tokens: 7, Day: 3}),
			usage(t0.Add(65*sec), limiter.Usage{Requests: 2, Tokens: 5, Day: 3}),
			do(func(b *limiter.Bucket) { b.Refund(t0.Add(65*sec), "c", t0.Add(7*sec)) }),
			usage(t0.Add(65*sec), limiter.Usage{Requests: 1, Tokens: 1, Day: 2}),
		}},
		{"a step back across midnight does not zero the day", limiter.Limits{RPM: 100, TPM: big, RPD: 2}, []op{
			grant(local(2026, 6, 16, 0, 0, 1, 0), "a", 1),
			grant(local(2026, 6, 16, 0, 0, 1, 0), "b", 1),
			// The count is 2026-06-16's: it resets at the end of that day.
			blocked(local(2026, 6, 15, 23, 59, 59, 0), 1, 24*time.Hour+sec, "rpd 2/2"),
			day(local(2026, 6, 15, 23, 59, 59, 0), "2026-06-16", 2),
			blocked(local(2026, 6, 16, 0, 0, 2, 0), 1, 24*time.Hour-2*sec, "rpd 2/2"),
		}},
	}.run(t)
}

// TestSaturation checks that the limiter is not conservative: requests
// that wait exactly Check's Wait (as the daemon's waiters do) use every
// limit to the full.
func TestSaturation(t *testing.T) {
	type gr struct {
		at     time.Time
		tokens int64
	}
	// drain runs a waiting client that always has a request of tokens
	// until end.
	drain := func(b *limiter.Bucket, start, end time.Time, tokens int64) []gr {
		var gs []gr
		for now := start; now.Before(end); {
			d := b.Check(now, tokens)
			if !d.OK {
				if d.Never || d.Wait <= 0 {
					t.Fatalf("Check(%v) = %+v", now, d)
				}
				now = now.Add(d.Wait)
				continue
			}
			b.Grant(now, "x", tokens)
			gs = append(gs, gr{now, tokens})
		}
		return gs
	}
	t.Run("rpm", func(t *testing.T) {
		const rpm = 7
		gs := drain(limiter.New(limiter.Limits{RPM: rpm, TPM: 1 << 40}, la), t0, t0.Add(time.Hour), 1)
		if len(gs) != 60*rpm {
			t.Errorf("%d grants in an hour, want %d", len(gs), 60*rpm)
		}
		for i := rpm; i < len(gs); i++ {
			// Each grant reuses the capacity freed by the grant rpm
			// before, the instant it leaves the window: every full window
			// holds exactly rpm grants.
			if want := gs[i-rpm].at.Add(limiter.Window); !gs[i].at.Equal(want) {
				t.Fatalf("grant %d at %v, want %v", i, gs[i].at, want)
			}
		}
	})
	t.Run("tpm", func(t *testing.T) {
		gs := drain(limiter.New(limiter.Limits{RPM: 1000, TPM: 1000}, la), t0, t0.Add(time.Hour), 300)
		if len(gs) != 60*3 {
			t.Errorf("%d grants in an hour, want %d", len(gs), 60*3)
		}
		for i := 3; i < len(gs); i++ {
			if want := gs[i-3].at.Add(limiter.Window); !gs[i].at.Equal(want) {
				t.Fatalf("grant %d at %v, want %v", i, gs[i].at, want)
			}
		}
	})
	t.Run("rpd across DST", func(t *testing.T) {
		for _, tc := range []struct{ start, end time.Time }{
			{local(2026, 3, 6, 0, 0, 0, 0), local(2026, 3, 11, 0, 0, 0, 0)},
			{local(2026, 10, 30, 0, 0, 0, 0), local(2026, 11, 4, 0, 0, 0, 0)},
		} {
			const rpd = 50
			gs := drain(limiter.New(limiter.Limits{RPM: 20, TPM: 1 << 40, RPD: rpd}, la), tc.start, tc.end, 1)
			perDay := map[string]int{}
			for _, g := range gs {
				perDay[g.at.In(la).Format(time.DateOnly)]++
			}
			if len(perDay) != 5 {
				t.Errorf("grants on %d days, want 5: %v", len(perDay), perDay)
			}
			for d, n := range perDay {
				if n != rpd {
					t.Errorf("%s: %d grants, want %d", d, n, rpd)
				}
			}
		}
	})
	t.Run("pacing", func(t *testing.T) {
		// rpm 60 with a burst of 5: the token bucket alone would allow 65
		// in the first minute; the window allows 60, and 60 in every
		// minute after.
		gs := drain(limiter.New(limiter.Limits{RPM: 60, TPM: 1 << 40, BurstCapacity: 5}, la), t0, t0.Add(time.Hour), 1)
		if len(gs) != 3600 {
			t.Errorf("%d grants in an hour, want 3600", len(gs))
		}
		for i := range gs {
			j := i
			for j > 0 && gs[i].at.Sub(gs[j-1].at) < limiter.Window {
				j--
			}
			if n := i - j + 1; n > 60 {
				t.Fatalf("%d grants in the window ending at grant %d", n, i)
			}
		}
	})
}

func TestCoolAfterOneBurstIsOneCooldown(t *testing.T) {
	b := limiter.New(limiter.Limits{RPM: 100, TPM: 1e6}, la)
	for i := range 10 {
		b.Grant(t0, string(rune('a'+i)), 1)
	}
	first := b.CoolAfter(t0.Add(sec), t0, 0, "429")
	// Nine more 429s from the same burst (granted before the cooldown).
	for range 9 {
		if got := b.CoolAfter(t0.Add(2*sec), t0, 0, "429"); !got.Equal(first) {
			t.Fatalf("a 429 from the same burst moved the cooldown from %v to %v", first, got)
		}
	}
	if p := b.Penalty(t0.Add(2 * sec)); p.Streak != 1 {
		t.Fatalf("streak %d after one burst, want 1", p.Streak)
	}
	// A request granted after the cooldown and refused again escalates.
	after := first.Add(sec)
	b.Grant(after, "late", 1)
	if got := b.CoolAfter(after.Add(sec), after, 0, "429"); !got.After(first.Add(limiter.Window)) {
		t.Fatalf("a 429 after the cooldown did not escalate: %v", got)
	}
}
