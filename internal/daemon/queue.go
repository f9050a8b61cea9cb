package daemon

import (
	"slices"
	"strings"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/limiter"
)

// Waiting for capacity.
//
// A lease request that cannot be granted now, and may wait (wait_ms),
// joins its model's queue. The queue is FIFO in this sense: a request is
// granted a bucket only if no request ahead of it holds that bucket (see
// inTurn), and a request ahead holds
//
//   - the bucket it would be granted now, if it can be granted now;
//   - the bucket it waits for (its soonest bucket, when that frees within
//     its wait) against any grant that would make it wait longer. Without
//     this a large request would wait for ever behind a stream of small
//     ones, each fitting in what the window frees before the large one
//     does.
//
// A request that no request ahead holds back (another workload_type,
// another bucket, a grant that delays no one) is granted at once.
//
// Waiters do not poll. Whenever capacity may have freed or a queue has
// changed (a grant, report, refund, expiry, reload, key action, a waiter
// leaving) the pool runs a dispatch pass under mu: one walk, in order, of
// the queue of each model the change concerns, that wakes the waiters
// that can be granted now, each holding its bucket from the waiters
// behind it for the rest of the walk. When nothing changes but time, the
// pool's timer runs the pass when the first bucket or key a waiter waits
// for frees. A pass costs one choose per waiter and wakes at most one
// waiter per bucket: the grant it makes runs the next pass. Waking every
// waiter on every change instead, each comparing itself with those ahead,
// costs the square of the waiters.

// waiter is a lease request waiting in its model's queue. Its fields are
// guarded by the pool's mu, except wake.
type waiter struct {
	req      *api.LeaseRequest
	tokens   int64
	since    time.Time // when it started waiting
	deadline time.Time // when it stops waiting
	// wake (capacity 1) is signaled when a pass finds that the waiter can
	// be granted now, or that it must look again (an error, shutdown). It
	// then takes mu and decides for itself; a signal is a hint, never a
	// promise.
	wake chan struct{}
}

// signal wakes w without blocking; a waiter already signaled stays so.
func (w *waiter) signal() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// claim is a waiting request's hold on the bucket it waits for: no grant
// on b may move its grant past at.
type claim struct {
	b      *limiter.Bucket
	tokens int64
	at     time.Time
}

// turn is what the requests ahead of one in a queue hold: the buckets
// they would be granted now, and the claims of those that wait.
type turn struct {
	held   []*limiter.Bucket
	claims []claim
}

// add records what request x, whose selection in its turn is sel, holds
// from the requests behind it.
func (t *turn) add(x *waiter, sel selection) {
	switch {
	case sel.key != nil:
		t.held = append(t.held, sel.bucket)
	case sel.err == nil && sel.soonest != nil && !sel.soonestAt.After(x.deadline):
		t.claims = append(t.claims, claim{sel.soonest, x.tokens, sel.soonestAt})
	}
}

// delayTolerance absorbs CheckBehind's computed pacer wait, which may be
// a nanosecond off Check's.
const delayTolerance = time.Microsecond

// delays reports whether a grant of tokens on b now would move the grant
// of a request ahead that claims b.
func (t *turn) delays(now time.Time, b *limiter.Bucket, tokens int64) bool {
	for _, c := range t.claims {
		if c.b != b {
			continue
		}
		if d := b.CheckBehind(now, c.tokens, tokens); d.Never || now.Add(d.Wait).After(c.at.Add(delayTolerance)) {
			return true
		}
	}
	return false
}

// inTurn is choose for a request behind t: it skips the buckets t holds,
// and a bucket whose grant t's claims forbid, taking the next best one.
// quiet is choose's. Callers hold mu.
func (p *pool) inTurn(now time.Time, model, workload string, tokens int64, t *turn, quiet bool) selection {
	held := t.held
	sel := p.choose(now, model, workload, tokens, quiet, held...)
	for sel.key != nil && t.delays(now, sel.bucket, tokens) {
		held = append(held[:len(held):len(held)], sel.bucket) // a copy: t.held stays
		sel = p.choose(now, model, workload, tokens, quiet, held...)
	}
	return sel
}

// chooseInTurn is choose for request w (nil: one not queued yet) of
// workload and tokens, behind the requests ahead of it in model's queue.
// The walk stops early once nothing is left for w. Callers hold mu.
func (p *pool) chooseInTurn(now time.Time, model string, w *waiter, workload string, tokens int64) selection {
	var t turn
	for _, x := range p.queues[model] {
		if x == w {
			break
		}
		xs := p.inTurn(now, model, x.req.WorkloadType, x.tokens, &t, true)
		t.add(x, xs)
		if xs.key != nil && p.inTurn(now, model, workload, tokens, &t, true).key == nil {
			break // x took the last bucket w could have had
		}
	}
	return p.inTurn(now, model, workload, tokens, &t, false)
}

// kick runs a dispatch pass over every queue: capacity may have freed,
// or the configuration or a key changed. With no waiter (the common case)
// it costs nothing. Callers hold mu.
func (p *pool) kick() {
	if len(p.queues) == 0 {
		p.setTimer(time.Time{}, time.Time{})
		return
	}
	if p.closing {
		// Every waiter leaves with shutting_down; a pass per leaver
		// would cost the square of the waiters.
		for _, q := range p.queues {
			for _, x := range q {
				x.signal()
			}
		}
		p.setTimer(time.Time{}, time.Time{})
		return
	}
	now := p.now()
	var next time.Time
	for model := range p.queues {
		next = earliest(next, p.pass(now, model))
	}
	p.setTimer(now, next)
}

// kickModels runs the dispatch pass of the given models' queues only: a
// grant, report or leaver changes the buckets of one model and the slot
// of one key, which may serve several models. Callers hold mu.
func (p *pool) kickModels(models ...string) {
	if len(p.queues) == 0 || p.closing {
		p.kick()
		return
	}
	now := p.now()
	for _, m := range models {
		if _, ok := p.queues[m]; ok {
			p.passBy(now, p.pass(now, m))
		}
	}
}

// kickKey is kickModels for the models ks serves. Callers hold mu.
func (p *pool) kickKey(ks *keyState) {
	if len(p.queues) == 0 {
		return
	}
	if len(ks.key.Models) == 1 {
		for m := range ks.key.Models {
			p.kickModels(m)
		}
		return
	}
	models := make([]string, 0, len(ks.key.Models))
	for m := range ks.key.Models {
		models = append(models, m)
	}
	p.kickModels(models...)
}

// pass walks model's queue in order and signals the waiters that can be
// granted now (or must look again: an error), each holding its bucket
// from those behind it. It returns when the first bucket a waiter waits
// for frees (zero: none will by itself). Callers hold mu.
func (p *pool) pass(now time.Time, model string) (next time.Time) {
	var t turn
	for _, x := range p.queues[model] {
		sel := p.inTurn(now, model, x.req.WorkloadType, x.tokens, &t, true)
		if sel.key != nil || sel.err != nil {
			x.signal()
		} else {
			next = earliest(next, sel.retryAt)
		}
		t.add(x, sel)
	}
	return next
}

// setTimer makes the pool's timer run a pass at `at`, or stops it when at
// is zero. Callers hold mu.
func (p *pool) setTimer(now, at time.Time) {
	if at.Equal(p.timerAt) {
		return
	}
	p.timerAt = at
	if at.IsZero() {
		if p.timer != nil {
			p.timer.Stop()
		}
		return
	}
	if p.timer == nil {
		p.timer = time.AfterFunc(at.Sub(now), p.onTimer)
		return
	}
	p.timer.Reset(at.Sub(now))
}

// onTimer runs the pass that the timer was set for. It expires leases
// first: a waiter for a key at max_in_flight waits for the key's first
// open lease to expire, which the janitor would see only up to a second
// later, and a pass before that would set the timer in the past again.
func (p *pool) onTimer() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.timerAt = time.Time{}
	p.expire(p.now())
	p.kick()
}

// passBy makes sure a pass runs by retryAt, when the bucket a waiter
// waits for frees (zero: nothing to wait for). Callers hold mu.
func (p *pool) passBy(now, retryAt time.Time) {
	if !retryAt.IsZero() && (p.timerAt.IsZero() || retryAt.Before(p.timerAt)) {
		p.setTimer(now, retryAt)
	}
}

// dequeue removes w from its model's queue. The caller runs a pass (kick)
// when the requests behind w may now be granted: at once if w leaves
// without a grant, after the grant's own bookkeeping if it leaves with
// one. Callers hold mu.
func (p *pool) dequeue(model string, w *waiter) {
	q := p.queues[model]
	for i, x := range q {
		if x == w {
			q = append(q[:i:i], q[i+1:]...)
			break
		}
	}
	if len(q) == 0 {
		delete(p.queues, model)
	} else {
		p.queues[model] = q
	}
}

// waiting summarizes the queues for GET /v1/status, by model name.
// Callers hold mu.
func (p *pool) waiting(now time.Time) []api.ModelWaiting {
	var out []api.ModelWaiting
	for model, q := range p.queues {
		out = append(out, api.ModelWaiting{Model: model, Requests: len(q), OldestMS: now.Sub(q[0].since).Milliseconds()})
	}
	slices.SortFunc(out, func(a, b api.ModelWaiting) int { return strings.Compare(a.Model, b.Model) })
	return out
}
