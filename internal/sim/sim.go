// Package sim is keyd's policy simulator: a deterministic discrete-event
// simulation that runs hours of Gemini traffic in seconds through a
// provider model enforcing, per (project, model), sliding-window RPM,
// input TPM and Pacific-day RPD (Provider), and compares keyd's real lease
// code (daemon.Engine: its key choice, limiter and report handling) with
// the key-rotation policies people use today (Policies).
//
// Every policy runs the same trace of a Scenario: clients with Poisson
// arrivals and bursts, skewed prompt sizes, a bounded number of requests
// in progress each, retries as the policy says, give-up after a deadline,
// and crashes that never report. Run returns per-policy metrics: the
// provider's 429s, the share of the quota used, waits until grant and
// fairness between clients. Suite lists the scenarios, RunSuite runs
// them, and Outcome.Write renders docs/bench/policies.md and its SVG plots
// (keyd-bench sim, make bench-sim).
//
// Everything is a function of the scenario's seed: two runs give the same
// numbers, whatever the machine or the number of goroutines.
package sim

import (
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/keyd/keyd/internal/fakegemini"
)

// BinWidth is the width of the time series' bins.
const BinWidth = 5 * time.Minute

// Result is what one policy did with one scenario's trace.
type Result struct {
	Scenario, Policy string

	Offered  int // requests issued
	Served   int // sent and answered 200 to a client still alive
	GaveUp   int // abandoned at the deadline
	Failed   int // refused for good by the policy (no key can ever serve)
	Crashed  int // the client died holding a key
	Asks     int // Acquire calls
	Sent     int // calls that reached the provider
	Admitted int // calls the provider admitted (crashed ones included)

	Provider429 int            // 429 answers
	ByKind      map[string]int // 429s naming each limit (rpm, tpm, rpd)
	Invalid400  int            // 400 API_KEY_INVALID answers

	// QuotaUsed is the share of the quota the provider would have allowed
	// that was used: per bucket, the larger of requests/available requests
	// (RPM over the run, capped by RPD per Pacific day) and input
	// tokens/available tokens (TPM over the run), weighted by available
	// requests; a bucket counts only while one of its keys is valid.
	QuotaUsed float64
	// WaitP50 and WaitP99: for served requests, from the first attempt
	// (the request leaving its client's queue) to the send that succeeded.
	WaitP50, WaitP99 time.Duration
	// HeavyWaitP50 and HeavyWaitP99 are the same for the heavy-prompt
	// clients alone.
	HeavyWaitP50, HeavyWaitP99 time.Duration
	// Jain is Jain's fairness index over clients of served/offered.
	Jain float64
	// HeavyServed and LightServed are served/offered of the heavy-prompt
	// clients and of the others.
	HeavyServed, LightServed float64

	// Violations is the provider's independent recheck of its own
	// admissions (Provider.Check); always empty unless the model is broken.
	Violations []string

	// Bins: per BinWidth of the run, the quota used (as QuotaUsed, but
	// counting RPM and TPM only, not RPD) and the 429s answered.
	Bins []Bin
}

// Bin is one BinWidth of a run.
type Bin struct {
	QuotaUsed float64
	Errors429 int
}

// event kinds.
const (
	evArrive = iota
	evAttempt
	evDone
)

type event struct {
	at   time.Duration
	seq  uint64
	kind uint8
	req  int32
}

// eventQueue is a binary min-heap of events by (at, seq): events at the
// same instant run in the order they were scheduled.
type eventQueue []event

func (q eventQueue) less(i, j int) bool {
	return q[i].at < q[j].at || (q[i].at == q[j].at && q[i].seq < q[j].seq)
}

func (q *eventQueue) push(e event) {
	*q = append(*q, e)
	h := *q
	for i := len(h) - 1; i > 0; {
		p := (i - 1) / 2
		if !h.less(i, p) {
			break
		}
		h[i], h[p] = h[p], h[i]
		i = p
	}
}

func (q *eventQueue) pop() event {
	h := *q
	top := h[0]
	n := len(h) - 1
	h[0] = h[n]
	h = h[:n]
	for i := 0; ; {
		l, r, m := 2*i+1, 2*i+2, i
		if l < n && h.less(l, m) {
			m = l
		}
		if r < n && h.less(r, m) {
			m = r
		}
		if m == i {
			break
		}
		h[i], h[m] = h[m], h[i]
		i = m
	}
	*q = h
	return top
}

// reqState is a request's progress in one run.
type reqState struct {
	ask     Ask
	first   time.Duration // first attempt; -1 before
	sentAt  time.Duration
	ticket  Ticket
	resp    Response
	done    bool
	working bool // holds one of its client's workers
}

// client is a client's progress in one run.
type client struct {
	queue   []int32 // waiting requests, FIFO
	busy    int
	offered int
	served  int
}

// runner is one run of one policy on one trace.
type runner struct {
	s      *Scenario
	tr     *Trace
	pol    Policy
	prov   *Provider
	now    time.Duration
	seq    uint64
	q      eventQueue
	reqs   []reqState
	cls    []client
	res    *Result
	waits  []time.Duration
	hwaits []time.Duration
	bins   []binCount
}

type binCount struct {
	reqs, toks map[string]int64
	errors     int
}

// Run runs one policy on a scenario's trace.
func Run(s *Scenario, tr *Trace, def PolicyDef) (*Result, error) {
	keys := map[string]string{}
	for _, k := range s.Keys {
		keys[k.ID] = k.Project
	}
	r := &runner{s: s, tr: tr,
		prov: NewProvider(s.Model, fakegemini.Paid, s.Projects, keys),
		reqs: make([]reqState, len(tr.Requests)),
		cls:  make([]client, len(s.Clients)),
		res:  &Result{Scenario: s.Name, Policy: def.Name, ByKind: map[string]int{}},
		bins: make([]binCount, int((s.Duration+BinWidth-1)/BinWidth)),
	}
	for _, k := range s.Keys {
		if k.InvalidAfter > 0 {
			r.prov.Invalidate(k.ID, s.Start.Add(k.InvalidAfter))
		}
	}
	configured := s.Projects
	if s.Configured != nil {
		configured = s.Configured
	}
	w := &World{Model: s.Model, Keys: s.Keys, Projects: configured, LeaseTTL: s.LeaseTTL,
		Now: func() time.Time { return s.Start.Add(r.now) }}
	pol, err := def.New(w)
	if err != nil {
		return nil, err
	}
	r.pol = pol
	for i := range r.bins {
		r.bins[i] = binCount{reqs: map[string]int64{}, toks: map[string]int64{}}
	}
	for i := range tr.Requests {
		q := &tr.Requests[i]
		r.reqs[i] = reqState{first: -1, ask: Ask{ID: q.ID, Client: s.Clients[q.Client].Name, Model: s.Model, Tokens: q.Tokens}}
		r.schedule(q.Arrive, evArrive, i)
	}
	for len(r.q) > 0 {
		e := r.q.pop()
		r.now = e.at
		switch e.kind {
		case evArrive:
			r.arrive(int(e.req))
		case evAttempt:
			r.attempt(int(e.req))
		case evDone:
			r.finish(int(e.req))
		}
	}
	r.summarize()
	return r.res, nil
}

func (r *runner) schedule(at time.Duration, kind uint8, req int) {
	r.seq++
	r.q.push(event{at: at, seq: r.seq, kind: kind, req: int32(req)})
}

func (r *runner) arrive(i int) {
	q := &r.tr.Requests[i]
	c := &r.cls[q.Client]
	c.offered++
	r.res.Offered++
	c.queue = append(c.queue, int32(i))
	r.startNext(q.Client)
}

// startNext gives free workers of client ci to its queued requests.
func (r *runner) startNext(ci int) {
	c := &r.cls[ci]
	for c.busy < r.s.Workers && len(c.queue) > 0 {
		i := int(c.queue[0])
		c.queue = c.queue[1:]
		if r.now-r.tr.Requests[i].Arrive >= r.s.GiveUp {
			r.reqs[i].done = true
			r.res.GaveUp++
			continue
		}
		c.busy++
		st := &r.reqs[i]
		st.working, st.first = true, r.now
		r.attempt(i)
	}
}

// end finishes request i and frees its worker.
func (r *runner) end(i int) {
	st := &r.reqs[i]
	st.done = true
	if st.working {
		st.working = false
		ci := r.tr.Requests[i].Client
		r.cls[ci].busy--
		r.startNext(ci)
	}
}

func (r *runner) attempt(i int) {
	q, st := &r.tr.Requests[i], &r.reqs[i]
	deadline := q.Arrive + r.s.GiveUp
	if r.now >= deadline {
		r.res.GaveUp++
		r.end(i)
		return
	}
	r.res.Asks++
	now := r.s.Start.Add(r.now)
	t, ok, retry := r.pol.Acquire(now, &st.ask)
	if !ok {
		if retry.IsZero() {
			r.res.Failed++
			r.end(i)
			return
		}
		r.schedule(min(max(retry.Sub(r.s.Start), r.now), deadline), evAttempt, i)
		return
	}
	st.ticket = t
	if q.Crash && q.CrashBeforeSend {
		r.res.Crashed++
		r.end(i)
		return
	}
	st.sentAt = r.now
	st.resp = r.prov.Call(now, t.Key, q.Tokens)
	r.res.Sent++
	b := &binCount{reqs: map[string]int64{}, toks: map[string]int64{}} // after the run: not plotted
	if r.now < r.s.Duration {
		b = &r.bins[int(r.now/BinWidth)]
	}
	switch st.resp.Status {
	case 200:
		r.res.Admitted++
		proj := r.prov.keys[t.Key].project
		b.reqs[proj]++
		b.toks[proj] += q.Tokens
	case 429:
		r.res.Provider429++
		b.errors++
		for _, k := range st.resp.Kinds {
			r.res.ByKind[string(k)]++
		}
	case 400:
		r.res.Invalid400++
	}
	if q.Crash {
		r.res.Crashed++
		r.end(i)
		return
	}
	lat := 300 * time.Millisecond // an error answers fast
	if st.resp.Status == 200 {
		lat = q.Latency
	}
	r.schedule(r.now+lat, evDone, i)
}

func (r *runner) finish(i int) {
	q, st := &r.tr.Requests[i], &r.reqs[i]
	retry := r.pol.Report(r.s.Start.Add(r.now), &st.ask, st.ticket, &st.resp)
	if st.resp.Status == 200 {
		r.res.Served++
		r.cls[q.Client].served++
		r.waits = append(r.waits, st.sentAt-st.first)
		if r.s.Clients[q.Client].Heavy {
			r.hwaits = append(r.hwaits, st.sentAt-st.first)
		}
		r.end(i)
		return
	}
	if retry.IsZero() {
		r.res.Failed++
		r.end(i)
		return
	}
	r.schedule(max(retry.Sub(r.s.Start), r.now), evAttempt, i)
}

// window is a stretch of time a bucket could be used in.
type window struct{ from, to time.Duration }

// capacity returns, for project proj, the requests and input tokens the
// provider would have allowed within [from, to) of the run: RPM and TPM
// pro rata, requests capped (when rpd) by RPD on each Pacific day, and
// nothing once every key of the project is invalid.
func (r *runner) capacity(proj string, from, to time.Duration, rpd bool) (reqs, toks float64) {
	l := r.s.Projects[proj]
	var end time.Duration = -1 // the last instant one of its keys is valid
	for _, k := range r.s.Keys {
		if k.Project != proj {
			continue
		}
		if k.InvalidAfter <= 0 {
			end = r.s.Duration
		} else {
			end = max(end, k.InvalidAfter)
		}
	}
	to = min(to, end)
	if to <= from {
		return 0, 0
	}
	for _, d := range r.days(from, to) {
		mins := (d.to - d.from).Minutes()
		n := float64(l.RPM) * mins
		if rpd && l.RPD > 0 {
			n = min(n, float64(l.RPD))
		}
		reqs += n
		toks += float64(l.TPM) * mins
	}
	return reqs, toks
}

// days splits [from, to) at Pacific midnights.
func (r *runner) days(from, to time.Duration) []window {
	var out []window
	for from < to {
		t := r.s.Start.Add(from)
		l := t.In(fakegemini.Pacific)
		next := time.Date(l.Year(), l.Month(), l.Day()+1, 0, 0, 0, 0, fakegemini.Pacific).Sub(r.s.Start)
		out = append(out, window{from, min(next, to)})
		from = min(next, to)
	}
	return out
}

// used is the quota used within [from, to) given the requests and tokens
// each project admitted in it, weighted by available requests; rpd says
// whether to cap the requests available by RPD (for the whole run, not
// for a bin).
func (r *runner) used(from, to time.Duration, reqs, toks map[string]int64, rpd bool) float64 {
	var sum, weight float64
	for proj := range r.s.Projects {
		cr, ct := r.capacity(proj, from, to, rpd)
		if cr == 0 {
			continue
		}
		u := max(float64(reqs[proj])/cr, float64(toks[proj])/ct)
		sum += u * cr
		weight += cr
	}
	if weight == 0 {
		return 0
	}
	return sum / weight
}

func (r *runner) summarize() {
	res := r.res
	reqs, toks := map[string]int64{}, map[string]int64{}
	for _, a := range r.prov.Admitted {
		if a.At.Sub(r.s.Start) < r.s.Duration {
			reqs[a.Project]++
			toks[a.Project] += a.Tokens
		}
	}
	res.QuotaUsed = r.used(0, r.s.Duration, reqs, toks, true)
	for i, b := range r.bins {
		from := time.Duration(i) * BinWidth
		res.Bins = append(res.Bins, Bin{QuotaUsed: r.used(from, min(from+BinWidth, r.s.Duration), b.reqs, b.toks, false), Errors429: b.errors})
	}
	slices.Sort(r.waits)
	res.WaitP50, res.WaitP99 = percentile(r.waits, 0.50), percentile(r.waits, 0.99)
	slices.Sort(r.hwaits)
	res.HeavyWaitP50, res.HeavyWaitP99 = percentile(r.hwaits, 0.50), percentile(r.hwaits, 0.99)
	var xs []float64
	var hs, ho, ls, lo int
	for i, c := range r.cls {
		if c.offered == 0 {
			continue
		}
		xs = append(xs, float64(c.served)/float64(c.offered))
		if r.s.Clients[i].Heavy {
			hs, ho = hs+c.served, ho+c.offered
		} else {
			ls, lo = ls+c.served, lo+c.offered
		}
	}
	res.Jain = jain(xs)
	res.HeavyServed, res.LightServed = ratio(hs, ho), ratio(ls, lo)
	res.Violations = r.prov.Check()
}

func ratio(a, b int) float64 {
	if b == 0 {
		return math.NaN()
	}
	return float64(a) / float64(b)
}

// percentile of sorted xs by the nearest-rank method; 0 if empty.
func percentile(xs []time.Duration, p float64) time.Duration {
	if len(xs) == 0 {
		return 0
	}
	i := int(math.Ceil(p*float64(len(xs)))) - 1
	return xs[min(max(i, 0), len(xs)-1)]
}

// jain is Jain's fairness index (Σx)²/(n·Σx²): 1 when all are equal, 1/n
// when one takes everything.
func jain(xs []float64) float64 {
	var s, s2 float64
	for _, x := range xs {
		s += x
		s2 += x * x
	}
	if s2 == 0 {
		return 1
	}
	return s * s / (float64(len(xs)) * s2)
}

// String summarizes r on one line.
func (r *Result) String() string {
	return fmt.Sprintf("%-16s %-16s served %5.1f%% quota %5.1f%% 429s %6d (rpm %d tpm %d rpd %d) 400s %d wait p50 %v p99 %v jain %.3f heavy %.1f%% light %.1f%% asks/req %.1f",
		r.Scenario, r.Policy, 100*ratio(r.Served, r.Offered), 100*r.QuotaUsed, r.Provider429,
		r.ByKind["rpm"], r.ByKind["tpm"], r.ByKind["rpd"], r.Invalid400,
		r.WaitP50.Round(time.Millisecond), r.WaitP99.Round(time.Millisecond), r.Jain,
		100*r.HeavyServed, 100*r.LightServed, float64(r.Asks)/float64(max(r.Offered, 1)))
}
