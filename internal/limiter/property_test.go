package limiter_test

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyd/keyd/internal/limiter"
)

var (
	seedFlag  = flag.Uint64("limiter.seed", 0, "run TestProperties with this seed only (0: the fixed seeds)")
	stepsFlag = flag.Int("limiter.steps", 25000, "attempts per TestProperties simulation")
)

// TestProperties simulates days of traffic on one bucket and checks the
// promises of the package against an independent record of every grant:
//
//   - every Check agrees with a model computed from that record (window,
//     day count, an exact integer token bucket, the penalties imposed):
//     no grant beyond a limit and no refusal when every limit has room;
//   - Wait is exact: a Check at now+Wait succeeds, at now+Wait-1ns not;
//   - at the end, every 60 s window and every local day of the record is
//     within the limits, and so is every interval of the pacing.
//
// The traffic has bursts, steady and slow phases, waiters that come back
// exactly after Wait, quiet gaps of hours, random sizes, Refunds,
// Reconciles, penalties, limit changes and restarts from what the store
// keeps, across a DST change of America/Los_Angeles.
func TestProperties(t *testing.T) {
	seeds := []uint64{1, 2, 3, 4, 5, 6, 7, 8}
	if *seedFlag != 0 {
		seeds = []uint64{*seedFlag}
	}
	steps := *stepsFlag
	if testing.Short() {
		steps /= 5
	}
	var (
		mu      sync.Mutex
		reasons = map[string]int{}
	)
	t.Run("seeds", func(t *testing.T) {
		for _, seed := range seeds {
			t.Run(fmt.Sprint(seed), func(t *testing.T) {
				t.Parallel()
				s := newSim(t, seed)
				defer func() {
					if t.Failed() {
						t.Logf("seed %d, limits %+v; reproduce with: go test ./internal/limiter -run 'TestProperties/seeds/^%d$' -limiter.seed=%d -limiter.steps=%d",
							seed, s.lim, seed, seed, steps)
					}
				}()
				s.run(steps)
				s.verify()
				s.coverage(steps)
				mu.Lock()
				for r, n := range s.reasons {
					reasons[r] += n
				}
				mu.Unlock()
			})
		}
	})
	if *seedFlag != 0 || t.Failed() {
		return
	}
	// Across the fixed seeds, every obstacle must have come up: a
	// simulation that never meets a limit proves nothing about it.
	for _, r := range []string{"rpm", "tpm", "rpd", "paced", "cooling", "exhausted", "disabled", "exceed"} {
		if reasons[r] == 0 {
			t.Errorf("no Check was refused for %q: %v", r, reasons)
		}
	}
	t.Logf("refusals by reason: %v", reasons)
}

// rec is the simulation's record of one grant.
type rec struct {
	id         string
	at         time.Time
	est, cur   int64 // the estimate granted; the count as it stands
	refunded   bool
	reconciled bool
	lim        limiter.Limits // in effect when granted
	epoch      int            // of the limits
}

type sim struct {
	t        *testing.T
	seed     uint64
	rng      *rand.Rand
	b        *limiter.Bucket
	lim      limiter.Limits
	epoch    int  // incremented by each limit change
	downOnly bool // Reconcile never raises a count (see verify)

	now   time.Time
	start time.Time
	recs  []*rec           // every grant, in the order made (the clock never steps back)
	days  map[string]int64 // model of the bucket's day count, per local day
	pace  pacer

	disabled     bool
	blockedUntil time.Time // the latest end returned by Cool, Backoff or Exhaust since the last Clear

	attempts, grants, refunds, reconciles, restarts, probes, changes int
	reasons                                                          map[string]int
}

func newSim(t *testing.T, seed uint64) *sim {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	s := &sim{t: t, seed: seed, rng: rng, days: map[string]int64{}, reasons: map[string]int{}}
	s.lim = s.randomLimits()
	s.downOnly = seed%2 == 0
	// Start up to a day before a DST change: the spring one for odd
	// seeds, the autumn one for even seeds.
	s.start = time.Date(2026, 3, 7, 0, 0, 0, 0, la)
	if seed%2 == 0 {
		s.start = time.Date(2026, 10, 31, 0, 0, 0, 0, la)
	}
	s.start = s.start.Add(time.Duration(rng.Int64N(int64(24 * time.Hour))))
	s.now = s.start
	s.b = limiter.New(s.lim, la)
	s.pace.set(s.lim, s.now, nil)
	return s
}

func (s *sim) randomLimits() limiter.Limits {
	r := s.rng
	l := limiter.Limits{RPM: 2 + r.Int64N(40)}
	l.TPM = l.RPM * (20 + r.Int64N(400))
	if r.IntN(5) > 0 {
		// About the grants of a busy day: some days reach it.
		l.RPD = 500 + r.Int64N(5000)
	}
	if r.IntN(2) == 0 {
		l.BurstCapacity = 1 + r.Int64N(l.RPM)
	}
	return l
}

func (s *sim) fatalf(format string, args ...any) {
	s.t.Helper()
	s.t.Fatalf("at %s (attempt %d, grant %d): %s", s.now.Format(time.RFC3339Nano), s.attempts, s.grants, fmt.Sprintf(format, args...))
}

func (s *sim) tokens() int64 {
	switch r := s.rng.IntN(100); {
	case r < 1:
		return s.lim.TPM + 1 + s.rng.Int64N(100) // never fits
	case r < 6:
		return s.lim.TPM/2 + s.rng.Int64N(s.lim.TPM/2+1)
	default:
		return 1 + s.rng.Int64N(2*s.lim.TPM/s.lim.RPM)
	}
}

// run makes n attempts.
func (s *sim) run(n int) {
	const (
		burst = iota
		steady
		slow
		waiters
	)
	var phase, left int
	var last limiter.Decision
	for s.attempts < n {
		if left == 0 {
			phase, left = s.rng.IntN(4), 50+s.rng.IntN(450)
			if s.rng.IntN(8) == 0 { // a quiet gap
				s.now = s.now.Add(time.Minute + time.Duration(s.rng.Int64N(int64(3*time.Hour))))
			}
		}
		left--
		var gap time.Duration
		switch phase {
		case burst:
			if s.rng.IntN(3) > 0 {
				gap = time.Duration(s.rng.Int64N(int64(200 * time.Millisecond)))
			}
		case steady:
			gap = time.Duration(s.rng.Int64N(int64(4 * time.Second)))
		case slow:
			gap = time.Duration(s.rng.Int64N(int64(20 * time.Second)))
		case waiters:
			// Come back exactly when Check said, as the daemon's waiters.
			switch {
			case last.Never:
				gap = time.Second
			case !last.OK && last.Wait <= 2*time.Minute:
				gap = last.Wait
			case !last.OK: // a long wait: some other request comes first
				gap = time.Duration(s.rng.Int64N(int64(2 * time.Minute)))
			}
		}
		s.now = s.now.Add(gap)
		s.events()
		tokens := s.tokens()
		last = s.attempt(tokens)
		if !last.OK && !last.Never && s.rng.IntN(4) == 0 {
			s.probe(last, tokens)
			last = limiter.Decision{OK: true}
		}
	}
}

// events applies the random events that happen between two attempts.
func (s *sim) events() {
	r := s.rng
	if r.IntN(100) < 3 {
		s.refund(false)
	}
	if r.IntN(200) == 0 {
		s.refund(true)
	}
	if r.IntN(100) < 10 {
		s.reconcile()
	}
	if r.IntN(500) == 0 {
		s.restart()
	}
	if r.IntN(2000) == 0 {
		s.changeLimits()
	}
	switch x := r.IntN(20000); {
	case x < 60:
		s.penalized(s.b.Cool(s.now, time.Duration(r.Int64N(int64(30*time.Second))), "429"))
	case x < 100:
		s.penalized(s.b.Backoff(s.now, time.Second+time.Duration(r.Int64N(int64(time.Minute))), "capacity"))
	case x < 101:
		s.penalized(s.b.Exhaust(s.now, "rpd 429"))
	case x < 102:
		s.b.Disable("billing")
		s.disabled = true
	case x < 200:
		s.b.Succeeded()
	}
	if s.disabled && r.IntN(200) == 0 {
		s.b.Clear()
		s.disabled, s.blockedUntil = false, time.Time{}
	}
}

func (s *sim) penalized(until time.Time) {
	if s.disabled {
		if !until.IsZero() {
			s.fatalf("a disabled bucket was given a penalty until %v", until)
		}
		return
	}
	if until.Before(s.blockedUntil) {
		s.fatalf("a penalty until %v shortened one until %v", until, s.blockedUntil)
	}
	s.blockedUntil = until
}

// recent returns a random grant among the last n that satisfies ok.
func (s *sim) recent(n int, ok func(*rec) bool) *rec {
	lo := max(0, len(s.recs)-n)
	for range 5 {
		if len(s.recs) == 0 {
			return nil
		}
		g := s.recs[lo+s.rng.IntN(len(s.recs)-lo)]
		if ok(g) {
			return g
		}
	}
	return nil
}

// refund refunds a recent grant, or, with again, one refunded already
// that is still inside the window: that must change nothing.
func (s *sim) refund(again bool) {
	if again {
		g := s.recent(20, func(g *rec) bool { return g.refunded && s.now.Sub(g.at) < limiter.Window })
		if g != nil {
			s.b.Refund(s.now, g.id, g.at)
		}
		return
	}
	g := s.recent(20, func(g *rec) bool { return !g.refunded && !g.reconciled })
	if g == nil {
		return
	}
	s.b.Refund(s.now, g.id, g.at)
	g.refunded = true
	s.refunds++
	if d := s.b.DayOf(g.at); d == s.b.DayOf(s.now) && s.days[d] > 0 {
		s.days[d]--
	}
}

func (s *sim) reconcile() {
	g := s.recent(30, func(g *rec) bool { return !g.refunded && !g.reconciled })
	if g == nil {
		return
	}
	if s.downOnly {
		g.cur = s.rng.Int64N(g.est + 1)
	} else {
		g.cur = s.rng.Int64N(2*g.est + 50)
	}
	g.reconciled = true
	s.reconciles++
	s.b.Reconcile(g.id, g.at, g.cur)
}

// restart rebuilds the bucket from what the store holds: the grants of
// the window (and some older ones the store still keeps, which Restore
// must ignore) with their current counts, the day count and the penalty.
func (s *sim) restart() {
	s.restarts++
	day, n := s.b.Day(s.now)
	p := s.b.Penalty(s.now)
	var stored []limiter.Grant
	for i := len(s.recs) - 1; i >= 0 && s.now.Sub(s.recs[i].at) < 2*limiter.Window; i-- {
		if g := s.recs[i]; !g.refunded {
			stored = append(stored, limiter.Grant{ID: g.id, At: g.at, Tokens: g.cur})
		}
	}
	s.rng.Shuffle(len(stored), func(i, j int) { stored[i], stored[j] = stored[j], stored[i] })
	b := limiter.New(s.lim, la)
	b.Restore(s.now, stored, day, n)
	b.SetPenalty(p)
	s.b = b
	s.pace.set(limiter.Limits{}, s.now, nil)
	s.pace.set(s.lim, s.now, s.window())
}

func (s *sim) changeLimits() {
	s.changes++
	l := s.randomLimits()
	s.b.SetLimits(l, s.now)
	s.pace.set(l, s.now, s.window())
	s.lim = l
	s.epoch++
}

// window returns the unrefunded grants of the window ending now, oldest
// first.
func (s *sim) window() []*rec {
	i := sort.Search(len(s.recs), func(i int) bool { return s.now.Sub(s.recs[i].at) < limiter.Window })
	var w []*rec
	for _, g := range s.recs[i:] {
		if !g.refunded {
			w = append(w, g)
		}
	}
	return w
}

// expect computes the decision for tokens at now from the simulation's
// own record. pace is the pacing part of wait.
func (s *sim) expect(tokens int64) (never bool, wait, pace time.Duration) {
	l := s.lim
	if s.disabled || tokens > l.TPM {
		return true, 0, 0
	}
	wait = max(0, s.blockedUntil.Sub(s.now))
	w := s.window()
	if n := int64(len(w)); n >= l.RPM {
		wait = max(wait, w[n-l.RPM].at.Add(limiter.Window).Sub(s.now))
	}
	var used int64
	for _, g := range w {
		used += g.cur
	}
	if excess := used + tokens - l.TPM; excess > 0 {
		for _, g := range w {
			if excess -= g.cur; excess <= 0 {
				wait = max(wait, g.at.Add(limiter.Window).Sub(s.now))
				break
			}
		}
	}
	if l.RPD > 0 && s.days[s.b.DayOf(s.now)] >= l.RPD {
		lt := s.now.In(la)
		midnight := time.Date(lt.Year(), lt.Month(), lt.Day()+1, 0, 0, 0, 0, la)
		wait = max(wait, midnight.Sub(s.now))
	}
	pace = s.pace.wait(s.now)
	return false, max(wait, pace), pace
}

// check makes a Check at now and compares it with the model.
func (s *sim) check(tokens int64) limiter.Decision {
	s.t.Helper()
	d := s.b.Check(s.now, tokens)
	if !d.OK {
		s.reasons[reasonKind(d.Reason)]++
	}
	never, wait, pace := s.expect(tokens)
	got := d.Wait
	if d.OK {
		got = 0
	}
	switch {
	case d.Never != never:
		s.fatalf("Check(%d) = %+v, want never %v", tokens, d, never)
	case never:
	case !d.OK && d.Wait <= 0:
		s.fatalf("Check(%d) = %+v: refused without a wait", tokens, d)
	case !d.OK && d.Reason == "":
		s.fatalf("Check(%d) = %+v: no reason", tokens, d)
	case got != wait && !(pace == wait && absDur(got-wait) <= paceSlack):
		// The integer model of the token bucket may differ from
		// x/time/rate's float arithmetic by a nanosecond; nothing else
		// may differ.
		s.fatalf("Check(%d) = %+v, want wait %v (pacing %v)", tokens, d, wait, pace)
	}
	// The bookkeeping agrees with the record too.
	w := s.window()
	var used int64
	for _, g := range w {
		used += g.cur
	}
	if u := s.b.Usage(s.now); u.Requests != int64(len(w)) || u.Tokens != used || u.Day != s.days[s.b.DayOf(s.now)] {
		s.fatalf("Usage = %+v, want %d requests, %d tokens, %d today", u, len(w), used, s.days[s.b.DayOf(s.now)])
	}
	return d
}

const paceSlack = 2 * time.Nanosecond

// reasonKind returns the limit or penalty a Decision's Reason names.
func reasonKind(reason string) string {
	for _, k := range []string{"rpm", "tpm", "rpd", "paced", "cooling", "exhausted", "disabled"} {
		if strings.HasPrefix(reason, k) {
			return k
		}
	}
	if strings.Contains(reason, "exceed") {
		return "exceed"
	}
	return "other: " + reason
}

func absDur(d time.Duration) time.Duration { return max(d, -d) }

// attempt is a request at now: Check, and Grant if OK.
func (s *sim) attempt(tokens int64) limiter.Decision {
	s.attempts++
	d := s.check(tokens)
	if d.OK {
		s.grant(tokens)
	}
	return d
}

func (s *sim) grant(tokens int64) {
	// The promises at the time of the grant, from the record alone.
	w := s.window()
	var used int64
	for _, g := range w {
		used += g.cur
	}
	day := s.b.DayOf(s.now)
	switch {
	case int64(len(w))+1 > s.lim.RPM:
		s.fatalf("grant %d in a window with %d: rpm %d", len(w)+1, len(w), s.lim.RPM)
	case used+tokens > s.lim.TPM:
		s.fatalf("grant of %d tokens in a window with %d: tpm %d", tokens, used, s.lim.TPM)
	case s.lim.RPD > 0 && s.days[day]+1 > s.lim.RPD:
		s.fatalf("grant %d of %s: rpd %d", s.days[day]+1, day, s.lim.RPD)
	case s.now.Before(s.blockedUntil) || s.disabled:
		s.fatalf("grant while penalized until %v (disabled %v)", s.blockedUntil, s.disabled)
	}
	if !s.pace.take(s.now) {
		s.fatalf("grant without a token: pacer at %v tokens", float64(s.pace.tokensAt(s.now))/unit)
	}
	s.grants++
	g := &rec{id: fmt.Sprintf("g%d", s.grants), at: s.now, est: tokens, cur: tokens, lim: s.lim, epoch: s.epoch}
	s.b.Grant(s.now, g.id, tokens)
	s.recs = append(s.recs, g)
	s.days[day]++
}

// probe checks that Wait is exact: after a refusal d at now, with nothing
// else happening, a Check at now+Wait-1ns is refused and one at now+Wait
// is granted.
func (s *sim) probe(d limiter.Decision, tokens int64) {
	s.probes++
	if d.Wait > 1 {
		s.now = s.now.Add(d.Wait - 1)
		if d1 := s.check(tokens); d1.OK {
			s.fatalf("refused with %+v, yet granted 1ns before the wait was over", d)
		}
		s.now = s.now.Add(1)
	} else {
		s.now = s.now.Add(d.Wait)
	}
	d2 := s.check(tokens)
	if !d2.OK {
		s.fatalf("refused with %+v, then %+v when the wait was over", d, d2)
	}
	s.grant(tokens)
}

// verify checks the promises over the whole record, after the fact.
func (s *sim) verify() {
	var live []*rec
	for _, g := range s.recs {
		if !g.refunded {
			live = append(live, g)
		}
	}
	perDay := map[string]int64{}
	lo := 0
	for i, g := range live {
		for g.at.Sub(live[lo].at) >= limiter.Window {
			lo++
		}
		// The window (g.at-60s, g.at]. Grants after g at the same
		// instant were checked with g in their window: they count when
		// their own window is checked.
		n := int64(i - lo + 1)
		var sum int64
		for _, h := range live[lo : i+1] {
			sum += h.cur
		}
		if n > g.lim.RPM {
			s.t.Errorf("%d grants in the 60 s up to %s: rpm %d", n, g.at.Format(time.RFC3339Nano), g.lim.RPM)
		}
		// Token counts as they stand now. Reconcile can raise a count
		// after the fact (the provider counted more than the estimate),
		// which legitimately puts a past window over tpm: check() holds
		// every grant to tpm with the counts as they stood at its Check,
		// and this after-the-fact check runs when counts only went down.
		if s.downOnly && sum > g.lim.TPM {
			s.t.Errorf("%d tokens in the 60 s up to %s: tpm %d", sum, g.at.Format(time.RFC3339Nano), g.lim.TPM)
		}
		day := g.at.In(la).Format(time.DateOnly)
		perDay[day]++
		if g.lim.RPD > 0 && perDay[day] > g.lim.RPD {
			s.t.Errorf("%d grants on %s by %s: rpd %d", perDay[day], day, g.at.Format(time.RFC3339Nano), g.lim.RPD)
		}
		// Pacing: a token bucket of b refilling at r admits at most
		// b + r·T grants in any T, restarts included.
		if b := g.lim.BurstCapacity; b > 0 {
			for j := i; j >= lo && live[j].epoch == g.epoch; j-- {
				if j > 0 && live[j-1].at.Equal(live[j].at) {
					continue // count from the first grant of the instant
				}
				n := int64(i - j + 1)
				d := g.at.Sub(live[j].at) + paceSlack
				if (n-b)*int64(unit) > g.lim.RPM*int64(d) {
					s.t.Errorf("%d grants from %s to %s: over burst_capacity %d at %d/min",
						n, live[j].at.Format(time.RFC3339Nano), g.at.Format(time.RFC3339Nano), b, g.lim.RPM)
				}
			}
		}
		if s.t.Failed() {
			s.t.FailNow()
		}
	}
}

// coverage fails a simulation that did not exercise what it is for.
func (s *sim) coverage(steps int) {
	dst := time.Date(2026, 3, 8, 3, 0, 0, 0, la)
	if s.seed%2 == 0 {
		dst = time.Date(2026, 11, 1, 3, 0, 0, 0, la)
	}
	s.t.Logf("%d attempts, %d grants, %d refunds, %d reconciles, %d restarts, %d limit changes, %d probes, %v simulated, refusals %v",
		s.attempts, s.grants, s.refunds, s.reconciles, s.restarts, s.changes, s.probes, s.now.Sub(s.start).Round(time.Minute), s.reasons)
	if steps < 20000 {
		return
	}
	if s.now.Before(dst.Add(24 * time.Hour)) {
		s.t.Errorf("the simulation ended at %v, before the day after the DST change", s.now)
	}
	if s.grants < steps/10 || s.restarts < 10 || s.refunds < 100 || s.reconciles < 500 || s.probes < 100 {
		s.t.Errorf("too little happened")
	}
}

// pacer is an exact model of the token bucket: tokens are counted in
// units of 1/(60·10⁹) token, so that a bucket refilling at rpm per minute
// gains exactly rpm units per nanosecond.
type pacer struct {
	on         bool
	rpm, burst int64
	tok        int64     // units at last
	last       time.Time // zero: full
}

const unit = 60_000_000_000

func (p *pacer) tokensAt(t time.Time) int64 {
	full := p.burst * unit
	if p.last.IsZero() {
		return full
	}
	el := int64(max(0, t.Sub(p.last)))
	if el >= (full-p.tok)/p.rpm+1 {
		return full
	}
	return min(full, p.tok+p.rpm*el)
}

func (p *pacer) wait(t time.Time) time.Duration {
	if !p.on {
		return 0
	}
	tk := p.tokensAt(t)
	if tk >= unit {
		return 0
	}
	return time.Duration((unit - tk + p.rpm - 1) / p.rpm)
}

// take charges a token for a grant at t and says whether there was one.
// It tolerates paceSlack of float rounding in x/time/rate.
func (p *pacer) take(t time.Time) bool {
	if !p.on {
		return true
	}
	tk := p.tokensAt(t)
	p.tok, p.last = tk-unit, t
	return tk >= unit-p.rpm*int64(paceSlack)
}

// set applies a limit change at t the way SetLimits does: a rate or burst
// change keeps the tokens; pacing turned on replays the window.
func (p *pacer) set(l limiter.Limits, t time.Time, window []*rec) {
	switch {
	case l.BurstCapacity <= 0:
		*p = pacer{}
	case !p.on:
		// Every grant of the window is charged, into debt if need be.
		*p = pacer{on: true, rpm: l.RPM, burst: l.BurstCapacity}
		for _, g := range window {
			p.take(g.at)
		}
	default:
		p.tok, p.last = p.tokensAt(t), t
		p.rpm, p.burst = l.RPM, l.BurstCapacity
	}
}
