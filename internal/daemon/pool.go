package daemon

import (
	"container/heap"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/config"
	"github.com/keyd/keyd/internal/limiter"
	"github.com/keyd/keyd/internal/store"
)

// leaseGrace is how long an unreported lease stays reportable after it
// expires (a late report is applied in full), and so how long keyd keeps
// its whole record, in memory and in the store.
const leaseGrace = time.Hour

// reportRetention is how long keyd remembers the answer to a report, so
// that a repeated report gets that answer again, with duplicate set,
// rather than 404 not_found: well beyond the 30 s for which the clients
// resend a report that got no answer while keyd restarts
// (client/gemini Options.ReportRetry). A reported lease keeps only that
// answer (reportedLeases), and the store drops its record after this long.
const reportRetention = 10 * time.Minute

// capacityBackoff is how long a bucket rests after a 429 without quota
// details (the upstream was short of capacity, not the bucket of quota).
const capacityBackoff = 5 * time.Second

// pool is the daemon's whole mutable state: configuration, keys, buckets,
// leases and waiters. mu guards every field below it; no method holds mu
// across I/O other than handing a batch to the store's writer queue, which
// keeps batches in the order their state changes happened.
type pool struct {
	st    store.Store
	now   func() time.Time
	log   *slog.Logger
	start time.Time
	// m are the counters of metrics.go: atomic, with the map that leads
	// to them guarded by mu.
	m metrics

	mu       sync.Mutex
	cfg      *config.Config
	loadedAt time.Time
	lastErr  string // last failed (re)load
	keys     map[string]*keyState
	order    []*keyState                         // keys of cfg, in file order
	byModel  map[string][]modelKey               // keys of cfg serving each model, with their buckets
	buckets  map[config.BucketID]*limiter.Bucket // of cfg
	retired  map[config.BucketID]*limiter.Bucket // buckets no longer in cfg
	learned  map[config.BucketID]learnedLimits   // limits Gemini reported lower than cfg's (learned.go)
	// learnedDirty are the buckets whose learned limits changed since
	// their record was last added to a batch (putBucket).
	learnedDirty map[config.BucketID]bool
	stamp        uint64                 // choose's current call, see bucketSlot
	leases       map[string]*leaseState // unreported leases: open, or lapsed and reportable
	expiries     leaseHeap              // open leases by expiry
	lapsed       []*leaseState          // leases that expired unreported, by expiry; see expire
	reported     reportedLeases         // the answers of the reports of the last reportRetention
	queues       map[string][]*waiter   // FIFO of waiting lease requests per model (queue.go)
	timer        *time.Timer            // runs a dispatch pass when a waiter's bucket frees; nil until needed
	timerAt      time.Time              // when timer fires; zero when stopped
	closing      bool

	// access is cfg.Access, readable without mu: every request checks
	// it, and taking mu for it would double the lock traffic of a lease.
	access atomic.Pointer[config.Access]
}

// keyState is one key: its configuration and what keyd learned about it.
type keyState struct {
	key      *config.Key
	removed  bool // no longer in the config; kept for its leases and state
	disabled *store.Key
	inFlight int64
	open     map[*leaseState]struct{}
	lastUsed time.Time
}

// leaseState is an unreported lease: open (granted, not expired) or
// lapsed (expired, still reportable for leaseGrace), with all that its
// report needs. Once reported, a lease is only its answer in
// pool.reported.
type leaseState struct {
	rec    store.Lease
	key    *keyState
	bucket *limiter.Bucket
	bid    config.BucketID
	open   bool // granted, not reported, not expired
	hidx   int  // index in pool.expiries, -1 when not there
}

// leaseHeap orders open leases by expiry.
type leaseHeap []*leaseState

func (h leaseHeap) Len() int           { return len(h) }
func (h leaseHeap) Less(i, j int) bool { return h[i].rec.ExpiresAt.Before(h[j].rec.ExpiresAt) }
func (h leaseHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].hidx, h[j].hidx = i, j
}
func (h *leaseHeap) Push(x any) {
	l := x.(*leaseState)
	l.hidx = len(*h)
	*h = append(*h, l)
}
func (h *leaseHeap) Pop() any {
	old := *h
	l := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	l.hidx = -1
	return l
}

func newPool(st store.Store, now func() time.Time, log *slog.Logger) *pool {
	return &pool{
		st: st, now: now, log: log, start: now(), m: newMetrics(),
		keys:         map[string]*keyState{},
		buckets:      map[config.BucketID]*limiter.Bucket{},
		retired:      map[config.BucketID]*limiter.Bucket{},
		learned:      map[config.BucketID]learnedLimits{},
		learnedDirty: map[config.BucketID]bool{},
		leases:       map[string]*leaseState{},
		queues:       map[string][]*waiter{},
	}
}

func secretHash(s string) string {
	if s == "" {
		return ""
	}
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:8])
}

// apply installs cfg as the configuration in effect, keeping the state of
// every key and bucket that still exists. Records it makes obsolete (a key
// disabled upstream whose secret changed) are added to batch. Callers hold mu.
func (p *pool) apply(cfg *config.Config, now time.Time, batch *store.Batch) {
	p.cfg, p.loadedAt, p.lastErr = cfg, now, ""
	p.access.Store(&cfg.Access)
	seen := map[string]bool{}
	p.order = p.order[:0]
	p.byModel = map[string][]modelKey{}
	for _, k := range cfg.Keys {
		ks := p.keys[k.ID]
		if ks == nil {
			ks = &keyState{open: map[*leaseState]struct{}{}}
			p.keys[k.ID] = ks
		}
		ks.key, ks.removed = k, false
		if secretChanged(ks.disabled, k) {
			p.log.Info("key re-enabled: its secret changed", "key", k.ID, "was", ks.disabled.Reason)
			ks.disabled = nil
			batch.DeleteKeys = append(batch.DeleteKeys, k.ID)
		}
		seen[k.ID] = true
		p.order = append(p.order, ks)
	}
	// A removed key or bucket is kept, out of the configuration, so that
	// one removed and added back (an edit in two steps) keeps its state.
	for id, ks := range p.keys {
		if !seen[id] {
			ks.removed = true
		}
	}
	for bid, l := range cfg.Buckets {
		lim := p.limitsFor(bid, l) // keys.json's, or lower ones Gemini reported
		b := p.buckets[bid]
		if b == nil {
			b = p.retired[bid]
			delete(p.retired, bid)
		}
		if b != nil {
			b.SetLimits(lim, now)
		} else {
			b = limiter.New(lim, cfg.DayResetLocation)
		}
		b.SetMargin(cfg.WindowMargin)
		p.buckets[bid] = b
	}
	for bid, b := range p.buckets {
		if _, ok := cfg.Buckets[bid]; !ok {
			delete(p.buckets, bid)
			p.retired[bid] = b
			// Its learned limits go: keys.json has no limit left to fix,
			// and the bucket added back starts from keys.json's.
			p.forget(bid, config.Limits{}, "the bucket is no longer in keys.json")
		}
	}
	for bid := range p.learnedDirty { // a reload changed a limit keyd had learned
		b := p.buckets[bid]
		if b == nil {
			b = p.retired[bid]
		}
		if b != nil {
			p.putBucket(batch, bid, b.Penalty(now))
		}
		delete(p.learnedDirty, bid)
	}
	slots := map[config.BucketID]*bucketSlot{}
	for _, ks := range p.order {
		for m := range ks.key.Models {
			bid := config.BucketID{Project: ks.key.Project, Model: m}
			slot := slots[bid]
			if slot == nil {
				slot = &bucketSlot{b: p.buckets[bid]}
				slots[bid] = slot
			}
			p.byModel[m] = append(p.byModel[m], modelKey{ks: ks, bid: bid, slot: slot})
		}
	}
	p.kick()
}

// modelKey is a key of the configuration serving one model, with the
// bucket it draws on for that model.
type modelKey struct {
	ks   *keyState
	bid  config.BucketID
	slot *bucketSlot
}

// bucketSlot is a bucket of the configuration, shared by the modelKeys
// that draw on it, with what the current choose call learned of it: check
// is valid only while stamp is the pool's stamp (one call; a new call
// takes a new stamp). It saves choose a map per call. Guarded by mu.
type bucketSlot struct {
	b     *limiter.Bucket
	stamp uint64
	check bucketCheck
}

// secretChanged reports whether d, an upstream verdict on key k, was about
// another secret than the one k has now.
func secretChanged(d *store.Key, k *config.Key) bool {
	return d != nil && d.By == "upstream" && k.Secret != "" && d.SecretHash != secretHash(k.Secret)
}

// restore rebuilds the state saved in the store, after apply of the first
// configuration; obsolete records are added to batch. Callers hold mu.
func (p *pool) restore(s *store.State, now time.Time, batch *store.Batch) {
	for _, k := range s.Keys {
		ks := p.keys[k.KeyID]
		if ks == nil {
			continue
		}
		kk := k
		if secretChanged(&kk, ks.key) {
			p.log.Info("key re-enabled: its secret changed while keyd was stopped", "key", k.KeyID, "was", k.Reason)
			batch.DeleteKeys = append(batch.DeleteKeys, k.KeyID)
			continue
		}
		ks.disabled = &kk
	}
	for _, b := range s.Buckets {
		bk := p.buckets[config.BucketID{Project: b.Project, Model: b.Model}]
		if bk == nil {
			if len(b.Learned) > 0 { // the bucket left keys.json: its learned limits go
				p.log.Info("learned limits forgotten at start: the bucket is no longer in keys.json",
					"bucket", config.BucketID{Project: b.Project, Model: b.Model}.String(), "forgotten", len(b.Learned))
				rec := b
				rec.Learned = nil
				if rec.State == api.StateReady && rec.Streak == 0 {
					batch.DeleteBuckets = append(batch.DeleteBuckets, store.BucketKey{Project: b.Project, Model: b.Model})
				} else {
					batch.Buckets = append(batch.Buckets, rec)
				}
			}
			continue
		}
		pen := limiter.Penalty{Until: b.Until, Reason: b.Reason, Streak: b.Streak}
		switch b.State {
		case api.StateCooling:
			pen.State = limiter.Cooling
		case api.StateExhausted:
			pen.State = limiter.Exhausted
		case api.StateDisabled:
			pen.State = limiter.Disabled
		}
		bk.SetPenalty(pen)
		p.restoreLearned(config.BucketID{Project: b.Project, Model: b.Model}, bk, b.Learned, now, batch)
	}
	days := map[config.BucketID]store.Day{}
	for _, d := range s.Days {
		days[config.BucketID{Project: d.Project, Model: d.Model}] = d
	}
	grants := map[config.BucketID][]limiter.Grant{}
	for _, rec := range s.Leases {
		bid := config.BucketID{Project: rec.Project, Model: rec.Model}
		if !refunded(rec.Classification) {
			tokens := rec.Tokens
			if rec.Reported && rec.PromptTokens >= 0 && rec.Classification == api.ClassSuccess {
				tokens = rec.PromptTokens
			}
			grants[bid] = append(grants[bid], limiter.Grant{ID: rec.ID, At: rec.GrantedAt, Tokens: tokens})
		}
		if rec.Reported {
			// Only the answer stays, as for a lease reported since start.
			if !now.After(rec.ReportedAt.Add(reportRetention)) {
				p.reported.add(rec.ID, rec.ReportedAt, rec.KeyID, rec.Classification, rec.Action)
			}
			continue
		}
		ls := &leaseState{rec: rec, bid: bid, bucket: p.buckets[bid], key: p.keys[rec.KeyID], hidx: -1}
		p.adopt(ls)
		p.leases[rec.ID] = ls
		if now.Before(rec.ExpiresAt) {
			p.openLease(ls)
		} else {
			// Load returns leases in grant order, which is expiry order
			// while lease_ttl is unchanged; after a change, expire forgets
			// some lapsed leases later than leaseGrace, never earlier.
			p.lapsed = append(p.lapsed, ls)
		}
	}
	for bid, b := range p.buckets {
		today := b.DayOf(now)
		var n int64
		if d, ok := days[bid]; ok && d.Day == today {
			n = d.Count
		}
		pen := b.Penalty(now)
		b.Restore(now, grants[bid], today, n)
		b.SetPenalty(pen)
	}
}

// adopt gives a lease restored from the store a key and a bucket when its
// own are gone from the configuration, so that it stays reportable: a
// detached key that is never leased, and a detached bucket whose verdicts
// concern nobody. Callers hold mu.
func (p *pool) adopt(ls *leaseState) {
	if ls.key == nil {
		ls.key = &keyState{removed: true, open: map[*leaseState]struct{}{},
			key: &config.Key{ID: ls.rec.KeyID, Project: ls.rec.Project}}
		p.keys[ls.rec.KeyID] = ls.key
	}
	if ls.bucket == nil {
		if ls.bucket = p.retired[ls.bid]; ls.bucket == nil {
			ls.bucket = limiter.New(limiter.Limits{RPM: math.MaxInt32, TPM: math.MaxInt64 / 2}, p.cfg.DayResetLocation)
			p.retired[ls.bid] = ls.bucket
		}
	}
}

// refunded reports whether a report of this class gave the grant's place
// in its bucket back.
func refunded(class string) bool {
	return class == api.ClassUnused || class == api.ClassKeyInvalid || class == api.ClassKeyDenied
}

func (p *pool) openLease(ls *leaseState) {
	ls.open = true
	ls.key.inFlight++
	ls.key.open[ls] = struct{}{}
	heap.Push(&p.expiries, ls)
}

func (p *pool) closeLease(ls *leaseState) {
	if !ls.open {
		return
	}
	ls.open = false
	ls.key.inFlight--
	delete(ls.key.open, ls)
	if ls.hidx >= 0 {
		heap.Remove(&p.expiries, ls.hidx)
	}
}

// expire closes leases past their expiry (they lapse), forgets lapsed
// leases leaseGrace after their expiry and the answers of reports older
// than reportRetention. It returns the time of the next expiry (zero if
// none). Callers hold mu.
func (p *pool) expire(now time.Time) time.Time {
	n := p.closeExpired(now)
	cut := 0
	for cut < len(p.lapsed) {
		ls := p.lapsed[cut]
		if !now.After(ls.rec.ExpiresAt.Add(leaseGrace)) {
			break
		}
		// One reported late is already out of leases (only its answer
		// stays), and here only until its turn.
		if !ls.rec.Reported {
			delete(p.leases, ls.rec.ID)
		}
		cut++
	}
	if cut > 0 {
		clear(p.lapsed[:cut])
		p.lapsed = p.lapsed[cut:]
	}
	p.reported.forget(now)
	if n > 0 {
		p.kick()
	}
	if len(p.expiries) > 0 {
		return p.expiries[0].rec.ExpiresAt
	}
	return time.Time{}
}

// closeExpired closes the open leases whose expires_at has come, so that
// they no longer hold a max_in_flight slot, and returns how many it
// closed. Without waiters to tell, it costs a look at the heap's top, so
// lease calls it first: the janitor's expire comes up to a second late.
// Callers hold mu.
func (p *pool) closeExpired(now time.Time) int {
	n := 0
	for len(p.expiries) > 0 && !now.Before(p.expiries[0].rec.ExpiresAt) {
		ls := p.expiries[0]
		p.closeLease(ls)
		p.lapsed = append(p.lapsed, ls)
		p.log.Debug("lease expired unreported; it counts at its estimate", "lease", ls.rec.ID, "key", ls.rec.KeyID, "tokens", ls.rec.Tokens)
		n++
	}
	return n
}

// grantErr is a refusal of a lease request.
func noCapacity(msg string, retryAt, now time.Time) *api.Error {
	e := api.Errorf(http.StatusTooManyRequests, api.CodeNoCapacity, "%s", msg)
	if !retryAt.IsZero() {
		ms := max(retryAt.Sub(now).Milliseconds(), 1)
		if retryAt.Sub(now)%time.Millisecond != 0 {
			ms = max(int64((retryAt.Sub(now)+time.Millisecond-1)/time.Millisecond), 1)
		}
		e.RetryAfterMS = &ms
	}
	return e
}

// selection is the outcome of one attempt to pick a key.
type selection struct {
	key     *keyState
	bid     config.BucketID
	bucket  *limiter.Bucket
	retryAt time.Time  // when some eligible bucket frees; zero if none will
	err     *api.Error // a refusal that waiting cannot change
	why     []string   // why each key could not be used now
	// soonest is, when no key can be used now, the eligible bucket whose
	// limits free first (at soonestAt), if one does: where the request
	// will be granted if nothing else takes the capacity meanwhile.
	soonest   *limiter.Bucket
	soonestAt time.Time
}

// heldRetry is the retry_after keyd gives a request refused because the
// free capacity is held for requests that wait ahead of it: they may
// still give it up (their wait ends, or they are canceled).
const heldRetry = time.Second

// choose picks the key for a request, or says why none can serve it now
// (sel.why; left empty when quiet, for the passes over waiting requests
// that need only the choice). The buckets in held are not used: their
// free capacity is held for requests waiting ahead (see queue.go).
// Callers hold mu.
func (p *pool) choose(now time.Time, model, workload string, tokens int64, quiet bool, held ...*limiter.Bucket) selection {
	var sel selection
	keys, ok := p.byModel[model]
	if !ok {
		return selection{err: unknownModel(model, p.cfg.Models())}
	}
	var best candidate // best.ks is nil until a candidate is found
	// Each bucket's slot holds its Check and, once needed, its remaining
	// share for this call: keys sharing a bucket share them.
	p.stamp++
	checked := false
	why := func(reason func() string) {
		if !quiet {
			sel.why = append(sel.why, reason())
		}
	}
	fits, matches := false, false
	for _, mk := range keys {
		ks, k := mk.ks, mk.ks.key
		if workload != "" && k.WorkloadType != workload {
			continue
		}
		matches = true
		switch {
		case !k.Enabled:
			why(func() string { return k.ID + ": enabled is false in keys.json" })
			continue
		case k.Secret == "":
			why(func() string { return k.ID + ": no secret" })
			continue
		case ks.disabled != nil:
			why(func() string { return k.ID + ": disabled: " + ks.disabled.Reason })
			continue
		}
		bid, slot := mk.bid, mk.slot
		b := slot.b
		if tokens <= b.Limits().TPM {
			fits = true
		}
		if slot.stamp != p.stamp {
			slot.stamp, slot.check = p.stamp, bucketCheck{d: b.Check(now, tokens)}
			checked = true
		}
		bc := &slot.check
		d := bc.d
		// keyFree is when the key has a slot again, while max_in_flight
		// holds it (zero otherwise): its first open lease's expiry.
		var keyFree time.Time
		if k.MaxInFlight > 0 && ks.inFlight >= k.MaxInFlight {
			for ls := range ks.open {
				keyFree = earliest(keyFree, ls.rec.ExpiresAt)
			}
		}
		// waitsFor notes that the key can serve the request at `at` on b.
		waitsFor := func(at time.Time) {
			sel.retryAt = earliest(sel.retryAt, at)
			if sel.soonest == nil || at.Before(sel.soonestAt) {
				sel.soonest, sel.soonestAt = b, at
			}
		}
		if !d.OK {
			why(func() string { return k.ID + ": " + d.Reason })
			if !d.Never {
				at := now.Add(d.Wait)
				if keyFree.After(at) {
					at = keyFree
				}
				waitsFor(at)
			}
			continue
		}
		if slices.Contains(held, b) {
			why(func() string { return k.ID + ": its free capacity is held for earlier requests waiting for it" })
			sel.retryAt = earliest(sel.retryAt, now.Add(heldRetry))
			continue
		}
		if !keyFree.IsZero() {
			why(func() string { return fmt.Sprintf("%s: max_in_flight %d reached", k.ID, k.MaxInFlight) })
			waitsFor(keyFree)
			continue
		}
		if !bc.counted {
			bc.remain, bc.counted = remaining(b, now), true
		}
		c := candidate{ks: ks, bid: bid, b: b, remain: bc.remain}
		if best.ks == nil || better(&c, &best) {
			best = c
		}
	}
	switch {
	case best.ks != nil:
		sel.key, sel.bid, sel.bucket = best.ks, best.bid, best.b
	case !matches:
		sel.err = api.Errorf(http.StatusServiceUnavailable, api.CodeNoKeys,
			"no key of workload_type %q serves model %s (workload types: %s)", workload, model, strings.Join(workloads(keys), ", "))
	case !fits && checked:
		sel.err = api.Errorf(http.StatusUnprocessableEntity, api.CodeTokensExceedTPM,
			"a request of %d tokens exceeds the tpm limit of every bucket serving %s: it could never be sent; split it", tokens, model)
	case sel.retryAt.IsZero():
		sel.err = api.Errorf(http.StatusServiceUnavailable, api.CodeNoKeys,
			"no key can serve %s: %s", model, strings.Join(sel.why, "; "))
	}
	return sel
}

// bucketCheck is what choose learned about one bucket.
type bucketCheck struct {
	d       limiter.Decision
	remain  float64 // remaining(bucket), once counted
	counted bool
}

// candidate is a key whose bucket can grant now.
type candidate struct {
	ks     *keyState
	bid    config.BucketID
	b      *limiter.Bucket
	remain float64
}

// better orders candidates: higher priority, then more remaining capacity,
// then the key used least recently.
func better(x, y *candidate) bool {
	if x.ks.key.Priority != y.ks.key.Priority {
		return x.ks.key.Priority > y.ks.key.Priority
	}
	if x.remain != y.remain {
		return x.remain > y.remain
	}
	return x.ks.lastUsed.Before(y.ks.lastUsed)
}

// remaining is the bucket's tightest remaining share of its limits.
func remaining(b *limiter.Bucket, now time.Time) float64 {
	l, u := b.Limits(), b.Usage(now)
	r := min(1-float64(u.Requests)/float64(l.RPM), 1-float64(u.Tokens)/float64(l.TPM))
	if l.RPD > 0 {
		r = min(r, 1-float64(u.Day)/float64(l.RPD))
	}
	return r
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || (!b.IsZero() && b.Before(a)) {
		return b
	}
	return a
}

func workloads(keys []modelKey) []string {
	var out []string
	for _, mk := range keys {
		if w := mk.ks.key.WorkloadType; w != "" && !slices.Contains(out, w) {
			out = append(out, w)
		}
	}
	slices.Sort(out)
	if len(out) == 0 {
		return []string{"none set"}
	}
	return out
}

func unknownModel(model string, models []string) *api.Error {
	msg := fmt.Sprintf("model %s is not configured; configured: %s", model, strings.Join(models, ", "))
	if n := config.Nearest(model, models); n != "" {
		msg += fmt.Sprintf(" (did you mean %s?)", n)
	}
	return api.Errorf(http.StatusNotFound, api.CodeUnknownModel, "%s", msg)
}
