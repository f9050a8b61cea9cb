package daemon

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/config"
	"github.com/keyd/keyd/internal/gemini"
	"github.com/keyd/keyd/internal/limiter"
	"github.com/keyd/keyd/internal/store"
)

var errShuttingDown = api.Errorf(http.StatusServiceUnavailable, api.CodeShuttingDown, "keyd is shutting down: retry once it is back")

// newLeaseID returns a fresh lease ID that sorts by grant time: "l", the
// grant's Unix nanoseconds as 16 hex digits, then 16 random hex digits.
func newLeaseID(now time.Time) string {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], uint64(now.UnixNano()))
	rand.Read(b[8:])
	var id [1 + 32]byte
	id[0] = 'l'
	hex.Encode(id[1:], b[:])
	return string(id[:])
}

// lease grants a lease for req, waiting up to req.WaitMS for capacity in
// FIFO order per model. The grant is durable before lease returns.
func (p *pool) lease(ctx context.Context, req *api.LeaseRequest) (_ *api.Lease, aerr *api.Error) {
	p.mu.Lock()
	now := p.now()
	start := now
	mc := p.modelCounters(req.Model)
	var w *waiter
	var timer *time.Timer // w's deadline
	defer func() {
		if timer != nil {
			timer.Stop()
		}
		mc.leaseDone(aerr)
		if w != nil { // it waited
			p.m.leaseWait.observe(p.now().Sub(start))
		}
	}()
	if p.closing {
		p.mu.Unlock()
		return nil, errShuttingDown
	}
	tokens := req.Tokens
	if tokens == 0 {
		tokens = p.cfg.DefaultTokens
	}
	wait := time.Duration(req.WaitMS) * time.Millisecond
	deadline := now.Add(wait)
	// leave takes w out of the queue, if it is in, and lets the requests
	// behind it go first.
	leave := func() {
		if w != nil {
			p.dequeue(req.Model, w)
			p.kickModels(req.Model)
		}
	}
	for {
		if p.closeExpired(now) > 0 {
			p.kick() // slots freed: waiters ahead may go first
		}
		// FIFO: the requests ahead hold the buckets they would be granted
		// now or that they wait for (see queue.go); another bucket may
		// serve this one meanwhile. They can only hold capacity back, so
		// when no bucket could serve this request even alone, or nobody
		// is ahead, they need no look.
		sel := p.choose(now, req.Model, req.WorkloadType, tokens, false)
		if sel.key != nil && len(p.queues[req.Model]) > 0 && (w == nil || p.queues[req.Model][0] != w) {
			sel = p.chooseInTurn(now, req.Model, w, req.WorkloadType, tokens)
		}
		if sel.err != nil {
			leave()
			p.mu.Unlock()
			return nil, sel.err
		}
		if sel.key != nil {
			if w != nil {
				p.dequeue(req.Model, w) // grant runs the pass, once it has granted
			}
			return p.grant(ctx, now, req, tokens, sel) // unlocks
		}
		if !now.Before(deadline) {
			leave()
			msg := fmt.Sprintf("no key can serve %s now", req.Model)
			if wait > 0 {
				msg = fmt.Sprintf("no key could serve %s within %v", req.Model, wait)
			}
			if len(sel.why) > 0 {
				msg += ": " + joinWhy(sel.why)
			}
			p.mu.Unlock()
			return nil, noCapacity(msg, sel.retryAt, now)
		}
		if w == nil {
			w = &waiter{req: req, tokens: tokens, since: start, deadline: deadline, wake: make(chan struct{}, 1)}
			p.queues[req.Model] = append(p.queues[req.Model], w)
			timer = time.NewTimer(deadline.Sub(now))
		}
		p.passBy(now, sel.retryAt)
		p.mu.Unlock()
		select {
		case <-ctx.Done():
			p.mu.Lock()
			leave()
			p.mu.Unlock()
			return nil, api.Errorf(499, api.CodeBadRequest, "request canceled while waiting")
		case <-w.wake:
		case <-timer.C:
		}
		p.mu.Lock()
		now = p.now()
		if p.closing {
			leave()
			p.mu.Unlock()
			return nil, errShuttingDown
		}
	}
}

func joinWhy(why []string) string {
	const most = 8
	s := ""
	for i, w := range why {
		if i == most {
			s += fmt.Sprintf("; and %d more", len(why)-most)
			break
		}
		if i > 0 {
			s += "; "
		}
		s += w
	}
	return s
}

// grant records a grant on sel, hands the batch to the store in order,
// unlocks mu and waits for the commit.
func (p *pool) grant(ctx context.Context, now time.Time, req *api.LeaseRequest, tokens int64, sel selection) (*api.Lease, *api.Error) {
	k := sel.key.key
	id := newLeaseID(now)
	b := sel.bucket
	b.Grant(now, id, tokens)
	day, count := b.Day(now)
	var dayEnd time.Time // set when this grant used up the day's rpd
	rpd := b.Limits().RPD
	if count == rpd && rpd > 0 {
		_, dayEnd = b.DayFull(now)
	}
	ls := &leaseState{
		rec: store.Lease{
			ID: id, KeyID: k.ID, Project: k.Project, Model: req.Model, Client: req.Client,
			Tokens: tokens, GrantedAt: now, ExpiresAt: now.Add(p.cfg.LeaseTTL), Day: day,
		},
		key: sel.key, bucket: b, bid: sel.bid, hidx: -1,
	}
	p.leases[id] = ls
	p.openLease(ls)
	sel.key.lastUsed = now
	g := &grantRecord{
		lease: [1]store.Lease{ls.rec},
		day:   [1]store.Day{{Project: k.Project, Model: req.Model, Day: day, Count: count}},
		usage: [1]store.UsageDelta{{Hour: hour(now), Project: k.Project, Model: req.Model, KeyID: k.ID,
			Requests: 1, PromptTokens: tokens}},
	}
	g.batch = store.Batch{Leases: g.lease[:], Days: g.day[:], Usage: g.usage[:]}
	pending := p.st.Submit(&g.batch)
	lease := &api.Lease{LeaseID: id, KeyID: k.ID, Project: k.Project, Model: req.Model,
		Secret: k.Secret, Tokens: tokens, ExpiresAt: ls.rec.ExpiresAt}
	p.kickModels(req.Model) // the queue's head changed
	p.mu.Unlock()
	// The wait is not canceled with the request: the grant is recorded
	// either way, and an answer that it failed must be true.
	if err := pending.Wait(context.Background()); err != nil {
		p.log.Error("store commit failed; lease withdrawn", "lease", id, "key", k.ID, "err", err)
		p.mu.Lock()
		b.Refund(p.now(), id, now)
		p.closeLease(ls)
		delete(p.leases, id)
		p.kickKey(ls.key)
		p.mu.Unlock()
		return nil, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "recording the lease failed: %v", err)
	}
	if p.log.Enabled(ctx, slog.LevelDebug) { // the arguments alone cost allocations
		p.log.Debug("lease granted", "lease", id, "key", k.ID, "model", req.Model, "tokens", tokens, "client", req.Client)
	}
	if !dayEnd.IsZero() {
		p.log.Info("bucket exhausted", "bucket", sel.bid.String(), "until", dayEnd, "reason", fmt.Sprintf("rpd %d/%d used until the day resets", count, rpd))
	}
	return lease, nil
}

// grantRecord is the batch of a grant with its records, in one allocation.
type grantRecord struct {
	batch store.Batch
	lease [1]store.Lease
	day   [1]store.Day
	usage [1]store.UsageDelta
}

// reportRecord is the batch of a report, with room for its usual records.
type reportRecord struct {
	batch store.Batch
	lease [1]store.Lease
	usage [1]store.UsageDelta
}

func hour(t time.Time) time.Time { return t.UTC().Truncate(time.Hour) }

// report applies the outcome of a lease's call. A repeated report, up to
// reportRetention after the first, gets the first one's answer with
// Duplicate set and changes nothing.
func (p *pool) report(ctx context.Context, id string, rep *api.ReportRequest) (*api.ReportResponse, *api.Error) {
	p.mu.Lock()
	now := p.now()
	ls := p.leases[id]
	if ls == nil {
		resp, ok := p.reported.find(id, now)
		p.mu.Unlock()
		if ok {
			return resp, nil
		}
		return nil, api.Errorf(http.StatusNotFound, api.CodeNotFound,
			"lease %s is unknown: it was never granted, expired unreported over %v ago, or was reported over %v ago",
			id, leaseGrace, reportRetention)
	}
	r := &ls.rec
	rr := &reportRecord{}
	batch := &rr.batch
	batch.Leases, batch.Usage = rr.lease[:0], rr.usage[:0]
	usage := store.UsageDelta{Hour: hour(r.GrantedAt), Project: r.Project, Model: r.Model, KeyID: r.KeyID}
	var class, action string
	// refund gives the grant's place in the bucket back: the provider
	// never counted the request against the project's quota.
	refund := func() {
		ls.bucket.Refund(now, id, r.GrantedAt)
		if day, count := ls.bucket.Day(now); day == r.Day {
			batch.Days = append(batch.Days, store.Day{Project: r.Project, Model: r.Model, Day: day, Count: count})
		}
	}
	if rep.Outcome == api.OutcomeUnused {
		class, action = api.ClassUnused, "reservation refunded"
		refund()
		usage.Requests, usage.PromptTokens, usage.Unused = -1, -r.Tokens, 1
	} else {
		v := gemini.Classify(rep.Status, rep.Error)
		class = v.Class
		action = p.penalize(now, ls, v, batch)
		if class == api.ClassKeyInvalid || class == api.ClassKeyDenied {
			// A key Gemini rejects is not the project's: the request
			// used none of its quota.
			refund()
			action += "; its grant refunded"
		}
		switch class {
		case api.ClassSuccess:
			r.PromptTokens = -1
			if u := rep.Usage; u != nil {
				r.PromptTokens, r.OutputTokens = u.PromptTokens, u.OutputTokens
				ls.bucket.Reconcile(id, r.GrantedAt, u.PromptTokens)
				usage.PromptTokens = u.PromptTokens - r.Tokens
				usage.OutputTokens = u.OutputTokens
			}
		case api.ClassRateMinute:
			usage.RateMinute = 1
		case api.ClassRateDay:
			usage.RateDay = 1
		case api.ClassQuotaZero, api.ClassCapacity, api.ClassBilling:
			usage.Other429 = 1
		default:
			usage.Errors = 1
		}
	}
	r.Reported, r.ReportedAt, r.Classification, r.Action = true, now, class, action
	p.m.reported(class)
	p.closeLease(ls)
	delete(p.leases, id)
	p.reported.add(id, now, r.KeyID, class, action)
	batch.Leases = append(batch.Leases, *r)
	batch.Usage = append(batch.Usage, usage)
	pending := p.st.Submit(batch)
	p.kickKey(ls.key) // its bucket, slot, penalties or learned limits changed
	resp := &api.ReportResponse{LeaseID: id, KeyID: r.KeyID, Classification: class, Action: action}
	p.mu.Unlock()
	if err := pending.Wait(context.Background()); err != nil { // not canceled with the request, as in grant
		p.log.Error("store commit failed for a report", "lease", id, "err", err)
		return nil, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "recording the report failed: %v", err)
	}
	if p.log.Enabled(ctx, slog.LevelDebug) {
		p.log.Debug("lease reported", "lease", id, "key", r.KeyID, "class", class, "action", action)
	}
	return resp, nil
}

// penalize applies the consequences of an upstream verdict to the lease's
// bucket or key, adds their durable records to batch, and says what it
// did. Callers hold mu.
func (p *pool) penalize(now time.Time, ls *leaseState, v gemini.Verdict, batch *store.Batch) string {
	b, bid := ls.bucket, ls.bid
	if v.Class == api.ClassSuccess { // the common case, with nothing to summarize
		if b.Penalty(now).Streak > 0 {
			b.Succeeded()
			p.putBucket(batch, bid, b.Penalty(now))
		}
		return ""
	}
	reason := v.Summary()
	before := b.Penalty(now)
	var action string
	switch v.Class {
	case api.ClassRateMinute:
		action = penaltyAction(bid, b.CoolAfter(now, ls.rec.GrantedAt, v.RetryDelay, reason), now, "cooling for %[1]v")
	case api.ClassRateDay:
		action = penaltyAction(bid, b.Exhaust(now, reason), now, "exhausted until %[2]s")
	case api.ClassQuotaZero:
		b.Disable(reason + ": the model is not available to this project's tier")
		action = fmt.Sprintf("bucket %s disabled", bid)
	case api.ClassCapacity:
		action = penaltyAction(bid, b.Backoff(now, capacityBackoff, reason), now, "backing off for %[1]v (upstream capacity; key not blamed)")
	case api.ClassBilling:
		changed := false
		for obid, ob := range p.buckets {
			if obid.Project == bid.Project {
				changed = changed || ob.Penalty(now).State != limiter.Disabled
				ob.Disable(reason)
				p.putBucket(batch, obid, ob.Penalty(now))
			}
		}
		if p.buckets[bid] != b { // a bucket removed by a reload still takes the verdict
			b.Disable(reason)
			p.putBucket(batch, bid, b.Penalty(now))
		}
		action = fmt.Sprintf("every bucket of project %s disabled (billing)", bid.Project)
		if changed {
			p.log.Info("project disabled", "project", bid.Project, "reason", reason)
		}
		return action
	case api.ClassKeyInvalid, api.ClassKeyDenied:
		ks := ls.key
		if ks.disabled == nil {
			ks.disabled = &store.Key{KeyID: ls.rec.KeyID, Reason: reason, By: "upstream", At: now, SecretHash: secretHash(ks.key.Secret)}
			batch.Keys = append(batch.Keys, *ks.disabled)
			p.log.Info("key disabled", "key", ls.rec.KeyID, "reason", reason)
		}
		return fmt.Sprintf("key %s disabled", ls.rec.KeyID)
	default:
		return ""
	}
	action += p.learnQuotas(now, ls, v)
	pen := b.Penalty(now)
	p.putBucket(batch, bid, pen)
	switch {
	case pen.State == before.State && pen.Until.Equal(before.Until):
		// no change, as for a 429 on a bucket already disabled
	case pen.Until.IsZero():
		p.log.Info("bucket "+pen.State.String(), "bucket", bid.String(), "reason", pen.Reason)
	default:
		p.log.Info("bucket "+pen.State.String(), "bucket", bid.String(), "until", pen.Until, "reason", reason)
	}
	return action
}

// penaltyAction says what a penalty did. until is the end of the bucket's
// penalty, zero when it is disabled (which no 429 lifts or shortens);
// format gets the time left (%[1]v) and the end (%[2]s).
func penaltyAction(bid config.BucketID, until, now time.Time, format string) string {
	if until.IsZero() {
		return fmt.Sprintf("bucket %s stays disabled", bid)
	}
	return "bucket " + bid.String() + " " + fmt.Sprintf(format, until.Sub(now).Round(time.Millisecond), until.Format(time.RFC3339))
}

// putBucket adds the durable form of bucket bid to batch: its penalty pen
// and its learned limits in a record, or the record's deletion once
// nothing is left to remember. Callers hold mu.
func (p *pool) putBucket(batch *store.Batch, bid config.BucketID, pen limiter.Penalty) {
	learned := p.learnedRecord(bid)
	delete(p.learnedDirty, bid)
	if pen.State == limiter.Ready && pen.Streak == 0 && len(learned) == 0 {
		batch.DeleteBuckets = append(batch.DeleteBuckets, store.BucketKey{Project: bid.Project, Model: bid.Model})
		return
	}
	batch.Buckets = append(batch.Buckets, store.Bucket{Project: bid.Project, Model: bid.Model,
		State: pen.State.String(), Until: pen.Until, Reason: pen.Reason, Streak: pen.Streak, Learned: learned})
}
