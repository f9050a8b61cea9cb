// Package limiter enforces the provider limits of one quota bucket, a
// (Google Cloud project, model) pair, exactly:
//
//   - at most RPM grants in any sliding 60 s window;
//   - at most TPM input tokens in any sliding 60 s window, counting each
//     grant at its estimate until Reconcile replaces it with the real count;
//   - at most RPD grants per calendar day of a time zone (DST-aware);
//   - optionally, grants paced by a token bucket of BurstCapacity refilling
//     at RPM/60 per second (golang.org/x/time/rate), on top of the window.
//
// A token bucket alone admits RPM+burst in some 60 s window; the window
// cap is what keeps the promise, pacing only spreads grants out.
//
// Every method takes the current time as an argument, so tests drive a
// Bucket on a fake clock. A Bucket is not safe for concurrent use: the
// daemon guards all buckets with one mutex.
package limiter

import (
	"fmt"
	"math"
	"slices"
	"time"

	"golang.org/x/time/rate"
)

// Window is the length of the RPM and TPM windows.
const Window = 60 * time.Second

// Limits of one bucket. RPM and TPM must be positive; RPD 0 means no daily
// limit; BurstCapacity 0 means no pacing beyond the window.
type Limits struct {
	RPM, TPM, RPD, BurstCapacity int64
}

// Penalty states of a bucket. The zero value, Ready, means none.
type PenaltyState int

const (
	Ready     PenaltyState = iota
	Cooling                // until a time, after an upstream per-minute 429 or a capacity 429
	Exhausted              // until the next day reset, after an upstream per-day 429
	Disabled               // until reset by an admin (quota 0, billing)
)

func (s PenaltyState) String() string {
	switch s {
	case Cooling:
		return "cooling"
	case Exhausted:
		return "exhausted"
	case Disabled:
		return "disabled"
	}
	return "ready"
}

// Penalty is an upstream verdict that stops a bucket from granting.
type Penalty struct {
	State  PenaltyState
	Until  time.Time // zero for Disabled
	Reason string
	// Streak counts consecutive per-minute 429s; it doubles the cooldown
	// and is reset by a success.
	Streak int
}

// Grant is one granted request still inside the window.
type Grant struct {
	ID     string
	At     time.Time
	Tokens int64
}

// Decision is the answer of Check.
type Decision struct {
	OK bool
	// Wait is how long until a grant of the asked size could succeed, when
	// !OK. Never is true when no wait will do (disabled, tokens > TPM).
	Wait  time.Duration
	Never bool
	// Reason says which limit or penalty is in the way, e.g. "rpm 15/15".
	Reason string
}

// Bucket is the exact limiter of one (project, model). Create it with New.
type Bucket struct {
	limits Limits
	loc    *time.Location
	grants []Grant   // grants of the last Window, sorted by At
	tokSum int64     // sum of grants' Tokens
	day    string    // day of dayCnt, "2006-01-02" in loc
	dayEnd time.Time // start of the day after day; zero if unknown
	dayCnt int64
	pacer  *rate.Limiter // nil without BurstCapacity
	margin time.Duration // added to Window, see SetMargin
	// coolStart is when the current per-minute cooldown began (zero after
	// a restart: then every 429 counts).
	coolStart time.Time
	penalty   Penalty
}

// New returns a bucket with no history. loc is the day-reset time zone.
func New(l Limits, loc *time.Location) *Bucket {
	b := &Bucket{loc: loc}
	b.SetLimits(l, time.Time{})
	return b
}

// Limits returns the bucket's limits.
func (b *Bucket) Limits() Limits { return b.limits }

// SetLimits changes the limits in place: the window, the day count and
// the pacer's tokens are kept, so a reload never refills a bucket. Lower
// limits hold at once.
func (b *Bucket) SetLimits(l Limits, now time.Time) {
	b.limits = l
	switch {
	case l.BurstCapacity <= 0:
		b.pacer = nil
	case b.pacer == nil:
		// Pacing turned on: a full token bucket would refill a bucket
		// that just granted, so replay the window as Restore does.
		b.replayPacer(now)
	default:
		b.pacer.SetLimitAt(now, rate.Limit(float64(l.RPM)/60))
		b.pacer.SetBurstAt(now, int(l.BurstCapacity))
	}
}

// replayPacer sets a new pacer that has seen the grants of the window
// ending at now, starting full before the first one. Only the window
// matters: a 60 s window of grants within the token bucket's bound keeps
// every longer interval within it too, since the window cap, RPM, is what
// the bucket refills in 60 s. Every grant is charged, even one that the
// current limits would not have allowed (made before they were lowered):
// forgiving it would let the new pacer admit more than its bound.
func (b *Bucket) replayPacer(now time.Time) {
	b.pacer = rate.NewLimiter(rate.Limit(float64(b.limits.RPM)/60), int(b.limits.BurstCapacity))
	for _, g := range b.grants {
		if now.Sub(g.At) < b.span() {
			b.pacer.ReserveN(g.At, 1)
		}
	}
}

// SetMargin makes a grant hold its place in the RPM and TPM windows for
// Window+d instead of Window. keyd counts a grant from the moment it makes
// it; the provider counts the request when it arrives, a little later (the
// grant's commit, the answer, the caller's own work). Without a margin, a
// slot keyd sees free at grant+60 s can still be taken at the provider,
// and the request that takes it is refused with a 429.
func (b *Bucket) SetMargin(d time.Duration) { b.margin = d }

func (b *Bucket) span() time.Duration { return Window + b.margin }

// DayOf returns the day of t in the bucket's time zone.
func (b *Bucket) DayOf(t time.Time) string { return t.In(b.loc).Format(time.DateOnly) }

// NextReset returns the start of the day after the one holding t.
func NextReset(t time.Time, loc *time.Location) time.Time {
	l := t.In(loc)
	return time.Date(l.Year(), l.Month(), l.Day()+1, 0, 0, 0, 0, loc)
}

func (b *Bucket) advance(now time.Time) {
	cut := 0
	for cut < len(b.grants) && now.Sub(b.grants[cut].At) >= b.span() {
		b.tokSum -= b.grants[cut].Tokens
		cut++
	}
	if cut > 0 {
		// Reslice instead of copying: append reuses the array's tail, and
		// the garbage collector frees the head once the array is regrown.
		clear(b.grants[:cut])
		b.grants = b.grants[cut:]
	}
	// The count resets only once day is over: a wall clock stepped back
	// across midnight keeps counting the day it came from, which the
	// grants stamped before the step are in.
	if !now.Before(b.dayEnd) {
		b.day, b.dayEnd, b.dayCnt = b.DayOf(now), NextReset(now, b.loc), 0
	}
	if p := &b.penalty; (p.State == Cooling || p.State == Exhausted) && !now.Before(p.Until) {
		streak := p.Streak
		*p = Penalty{Streak: streak}
	}
}

// Check says whether a grant of tokens input tokens could be made now,
// and if not, how long until it could.
func (b *Bucket) Check(now time.Time, tokens int64) Decision {
	return b.check(now, tokens, -1)
}

// CheckBehind is Check as it would answer had one more grant, of extra
// tokens, been made at now: how long a request of tokens would wait
// behind it. It changes nothing. keyd uses it to keep a later request from
// delaying one that waits longer. extra must be at least 0, and
// Check(now, extra) OK, or the answer means nothing. The pacer's part of
// the wait is computed, not asked of the pacer, and may be a nanosecond
// off Check's.
func (b *Bucket) CheckBehind(now time.Time, tokens, extra int64) Decision {
	return b.check(now, tokens, max(extra, 0))
}

// check is Check, after a hypothetical grant of extra tokens at now when
// extra >= 0.
func (b *Bucket) check(now time.Time, tokens, extra int64) Decision {
	b.advance(now)
	behind := extra >= 0
	grants, used, dayCnt := int64(len(b.grants)), b.tokens(), b.dayCnt
	if behind {
		grants, used, dayCnt = grants+1, used+extra, dayCnt+1
	}
	// at is when the i-th oldest grant of the window was made, the
	// hypothetical one (the newest) included.
	at := func(i int64) time.Time {
		if i < int64(len(b.grants)) {
			return b.grants[i].At
		}
		return now
	}
	l := b.limits
	if p := b.penalty; p.State == Disabled {
		return Decision{Never: true, Reason: "disabled: " + p.Reason}
	}
	if tokens > l.TPM {
		return Decision{Never: true, Reason: fmt.Sprintf("%d tokens exceed tpm %d", tokens, l.TPM)}
	}
	// Wait is the longest of the waits of every obstacle, a penalty
	// included: at now+Wait all are gone, and the one named is the last
	// to go (the first found on a tie).
	var d Decision
	wait := func(w time.Duration, why string) {
		if w > d.Wait || d.Reason == "" {
			d.Wait, d.Reason = w, why
		}
	}
	if p := b.penalty; p.State == Cooling || p.State == Exhausted {
		wait(p.Until.Sub(now), p.State.String()+": "+p.Reason)
	}
	if l.RPD > 0 && dayCnt >= l.RPD {
		wait(b.dayEnd.Sub(now), fmt.Sprintf("rpd %d/%d", dayCnt, l.RPD))
	}
	if n := grants; n >= l.RPM {
		// The (n-RPM+1)-th oldest grant must leave the window.
		wait(at(n-l.RPM).Add(b.span()).Sub(now), fmt.Sprintf("rpm %d/%d", n, l.RPM))
	}
	if used+tokens > l.TPM {
		excess := used + tokens - l.TPM
		// Past every real grant, only the hypothetical one (made at now)
		// is left to leave; tokens <= TPM, so it is enough.
		w := b.span()
		for _, g := range b.grants {
			excess -= g.Tokens
			if excess <= 0 {
				w = g.At.Add(b.span()).Sub(now)
				break
			}
		}
		wait(w, fmt.Sprintf("tpm %d+%d/%d", used, tokens, l.TPM))
	}
	if b.pacer != nil && behind {
		// The hypothetical grant took a token the pacer still counts:
		// the pacer holds min(burst, t-1 + rate·w) at now+w, and burst is
		// at least 1, so a token is back once t-1 + rate·w reaches 1.
		if t := b.pacer.TokensAt(now) - 1; t < 1 {
			w := time.Duration(math.Ceil((1 - t) / float64(b.pacer.Limit()) * float64(time.Second)))
			wait(w, fmt.Sprintf("paced: burst_capacity %d at %d/min", l.BurstCapacity, l.RPM))
		}
	} else if b.pacer != nil {
		if t := b.pacer.TokensAt(now); t < 1 {
			w := time.Duration(math.Ceil((1 - t) / float64(b.pacer.Limit()) * float64(time.Second)))
			// Make w the first instant the pacer itself finds a token at:
			// float rounding can put the estimate a nanosecond off either
			// way. TokensAt grows with time, so this takes a step or two.
			for w > 1 && b.pacer.TokensAt(now.Add(w-1)) >= 1 {
				w--
			}
			for b.pacer.TokensAt(now.Add(w)) < 1 {
				w++
			}
			wait(w, fmt.Sprintf("paced: burst_capacity %d at %d/min", l.BurstCapacity, l.RPM))
		}
	}
	d.OK = d.Reason == ""
	return d
}

// Grant records a grant made at now. The caller must have had an OK Check
// at the same now.
func (b *Bucket) Grant(now time.Time, id string, tokens int64) {
	b.advance(now)
	g := Grant{ID: id, At: now, Tokens: tokens}
	if n := len(b.grants); n == 0 || !now.Before(b.grants[n-1].At) {
		b.grants = append(b.grants, g)
	} else { // the wall clock stepped back: keep the window sorted
		i, _ := slices.BinarySearchFunc(b.grants, now, func(g Grant, t time.Time) int { return g.At.Compare(t) })
		b.grants = slices.Insert(b.grants, i, g)
	}
	b.tokSum += tokens
	b.dayCnt++
	if b.pacer != nil {
		// ReserveN, not AllowN: a grant is charged even if the pacer
		// would have refused it, never silently forgotten.
		b.pacer.ReserveN(now, 1)
	}
}

func (b *Bucket) find(id string, at time.Time) int {
	i, _ := slices.BinarySearchFunc(b.grants, at, func(g Grant, t time.Time) int { return g.At.Compare(t) })
	for ; i < len(b.grants) && !b.grants[i].At.After(at); i++ {
		if b.grants[i].ID == id {
			return i
		}
	}
	return -1
}

// Refund undoes the grant id made at `at`, whose request was never sent:
// it leaves the window and, on the same day, the day count. A grant of
// the window that is not in it was refunded already (or never made) and
// changes nothing; one older than the window can only be taken on trust.
func (b *Bucket) Refund(now time.Time, id string, at time.Time) {
	b.advance(now)
	i := b.find(id, at)
	if i >= 0 {
		b.tokSum -= b.grants[i].Tokens
		b.grants = slices.Delete(b.grants, i, i+1)
	} else if now.Sub(at) < b.span() {
		return
	}
	if b.DayOf(at) == b.day && b.dayCnt > 0 {
		b.dayCnt--
	}
}

// Reconcile replaces the estimate of grant id made at `at` with the real
// input token count, while it is still inside the window.
func (b *Bucket) Reconcile(id string, at time.Time, tokens int64) {
	if i := b.find(id, at); i >= 0 {
		b.tokSum += tokens - b.grants[i].Tokens
		b.grants[i].Tokens = tokens
	}
}

func (b *Bucket) tokens() int64 { return b.tokSum }

// Usage is a bucket's use against its limits at one instant.
type Usage struct {
	Requests, Tokens, Day int64
}

// Usage returns the requests and tokens in the window ending now and the
// grants of today.
func (b *Bucket) Usage(now time.Time) Usage {
	b.advance(now)
	return Usage{Requests: int64(len(b.grants)), Tokens: b.tokens(), Day: b.dayCnt}
}

// Day returns the current day and its grant count.
func (b *Bucket) Day(now time.Time) (string, int64) {
	b.advance(now)
	return b.day, b.dayCnt
}

// DayFull reports whether the day's RPD is used up, and when the day ends.
func (b *Bucket) DayFull(now time.Time) (bool, time.Time) {
	b.advance(now)
	return b.limits.RPD > 0 && b.dayCnt >= b.limits.RPD, b.dayEnd
}

// Restore rebuilds the bucket after a restart from the grants of the last
// window (any order; older ones are ignored) and the count of the day
// `day`. The pacer is replayed over the same grants.
func (b *Bucket) Restore(now time.Time, grants []Grant, day string, count int64) {
	b.grants, b.tokSum = nil, 0
	for _, g := range grants {
		if now.Sub(g.At) < b.span() {
			b.grants = append(b.grants, g)
			b.tokSum += g.Tokens
		}
	}
	slices.SortStableFunc(b.grants, func(x, y Grant) int { return x.At.Compare(y.At) })
	if b.pacer != nil {
		b.replayPacer(now)
	}
	b.day, b.dayCnt, b.dayEnd = day, count, time.Time{}
	if t, err := time.ParseInLocation(time.DateOnly, day, b.loc); err == nil {
		b.dayEnd = NextReset(t, b.loc)
	}
	b.advance(now)
}

// Penalty returns the bucket's current penalty (Ready when none).
func (b *Bucket) Penalty(now time.Time) Penalty {
	b.advance(now)
	return b.penalty
}

// SetPenalty replaces the bucket's penalty, e.g. when restoring it.
func (b *Bucket) SetPenalty(p Penalty) { b.penalty = p }

// Cooldown bounds for per-minute 429s.
const (
	MinCooldown = time.Second
	MaxCooldown = 10 * time.Minute
)

// Cool puts the bucket in Cooling after an upstream per-minute 429: for
// max(retry, the time until the local window has room for one more
// request), doubled for each earlier 429 in a row, capped at MaxCooldown.
// It returns the end of the bucket's penalty: a longer one already in
// place is kept, and a disabled bucket stays so (zero time).
func (b *Bucket) Cool(now time.Time, retry time.Duration, reason string) time.Time {
	b.advance(now)
	d := max(retry, MinCooldown)
	if n := int64(len(b.grants)); n > 0 {
		// Upstream says the minute is full: the window frees when the
		// oldest grant in it leaves.
		d = max(d, b.grants[0].At.Add(b.span()).Sub(now))
	}
	streak := b.penalty.Streak
	for range min(streak, 10) {
		d *= 2
	}
	d = min(d, MaxCooldown)
	b.penalty.Streak = streak + 1
	until := b.impose(Cooling, now.Add(d), reason)
	if until.Equal(now.Add(d)) {
		b.coolStart = now
	}
	return until
}

// CoolAfter is Cool for a 429 on a request granted at grantedAt. A 429 on
// a request granted before the current cooldown began is from the burst
// that caused it: it does not escalate the cooldown again, so a burst of
// N refused requests costs one cooldown, not 2^N of them.
func (b *Bucket) CoolAfter(now, grantedAt time.Time, retry time.Duration, reason string) time.Time {
	b.advance(now)
	if b.penalty.State == Cooling && grantedAt.Before(b.coolStart) {
		return b.penalty.Until
	}
	return b.Cool(now, retry, reason)
}

// impose stops the bucket until `until`, unless it is disabled or
// already stopped for longer: a verdict on a request that was in flight
// must not lift or shorten a penalty. It returns the penalty's end, zero
// when disabled.
func (b *Bucket) impose(s PenaltyState, until time.Time, reason string) time.Time {
	p := &b.penalty
	switch p.State {
	case Disabled:
		return time.Time{}
	case Cooling, Exhausted:
		if p.Until.After(until) {
			return p.Until
		}
	}
	*p = Penalty{State: s, Until: until, Reason: reason, Streak: p.Streak}
	return until
}

// Backoff puts the bucket in Cooling for d without counting a streak:
// the upstream was short of capacity, not the bucket of quota. It returns
// the end of the bucket's penalty, as Cool does.
func (b *Bucket) Backoff(now time.Time, d time.Duration, reason string) time.Time {
	b.advance(now)
	return b.impose(Cooling, now.Add(d), reason)
}

// Exhaust marks the day's quota used up until the next day reset. The
// day's count stays what keyd granted: the penalty is what blocks (the
// daemon stores it, so a restart keeps it), and Clear lifts it, as an
// admin who knows better may. It returns the end of the bucket's penalty,
// as Cool does.
func (b *Bucket) Exhaust(now time.Time, reason string) time.Time {
	b.advance(now)
	return b.impose(Exhausted, b.dayEnd, reason)
}

// Disable stops the bucket until Clear.
func (b *Bucket) Disable(reason string) {
	b.penalty = Penalty{State: Disabled, Reason: reason}
}

// Succeeded records an upstream success: the 429 streak ends.
func (b *Bucket) Succeeded() { b.penalty.Streak = 0 }

// Clear removes any penalty (admin reset).
func (b *Bucket) Clear() { b.penalty = Penalty{} }
