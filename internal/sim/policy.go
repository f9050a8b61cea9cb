package sim

import (
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"time"

	"golang.org/x/time/rate"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/config"
	"github.com/keyd/keyd/internal/daemon"
)

// Policy decides which key each request is sent with. The simulator calls
// it from one goroutine, in virtual time.
type Policy interface {
	// Acquire asks for a key for a at now. It returns the key, or when
	// to ask again; a zero time means never (the request fails).
	Acquire(now time.Time, a *Ask) (t Ticket, ok bool, retry time.Time)
	// Report says what the provider answered the call sent with t, and
	// returns when the request, if it failed, should be tried again
	// (zero: never). Not called for a client that crashed.
	Report(now time.Time, a *Ask, t Ticket, resp *Response) time.Time
}

// Ask is one request as the policy sees it. Tries and Backoffs are the
// policy's own counters for the request.
type Ask struct {
	ID       int
	Client   string
	Model    string
	Tokens   int64
	Tries    int // failed calls since the last client back-off
	Backoffs int // client back-offs so far
}

// Ticket is a granted key.
type Ticket struct {
	Key   string
	Lease string // keyd's lease ID
}

// World is what a policy is configured with: the keys, their projects and
// the per-project limits, as an operator would write them down.
type World struct {
	Model    string
	Keys     []KeySpec
	Projects map[string]Limits
	LeaseTTL time.Duration
	Now      func() time.Time // the simulation's clock
}

// PolicyDef names a policy and builds one per run.
type PolicyDef struct {
	Name   string // short, for tables and file names
	Models string // what real systems it stands for
	New    func(w *World) (Policy, error)
}

// Policies are the policies compared, keyd first.
var Policies = []PolicyDef{
	{"keyd", "keyd: the daemon's own pool, key choice, limiter and report handling (daemon.Engine)",
		newKeyd},
	{"round-robin", "round-robin rotation with a cool-down on 429 and no local limits (gemini-balance, gpt-load style)",
		func(w *World) (Policy, error) { return newRoundRobin(w), nil }},
	{"minute-counters", "per-key counters per fixed UTC minute, blind to keys sharing a project (the seed's Python KeyManager, LiteLLM usage-based routing)",
		func(w *World) (Policy, error) { return newMinuteCounters(w), nil }},
	{"token-bucket", "per-(project, model) token buckets with burst = RPM (and TPM), no day count (the common x/time/rate misconfiguration)",
		func(w *World) (Policy, error) { return newTokenBucket(w), nil }},
}

// Client behaviour shared by the baselines: after MaxRetries failed calls
// in a row the client backs off exponentially (1 s doubling to 60 s, plus
// up to 1 s of jitter, like go-genai's RetryOptions defaults).
const (
	maxRetries  = 3
	maxFailures = 3 // consecutive key errors (400/403) before a key is dropped
	cooldown    = time.Minute
)

func backoff(now time.Time, a *Ask) time.Time {
	a.Backoffs++
	a.Tries = 0
	d := min(time.Second<<min(a.Backoffs-1, 6), time.Minute)
	return now.Add(d + time.Duration(jitter(a.ID, a.Backoffs)*float64(time.Second)))
}

// afterFailure is the baselines' answer to a failed call: retry at once
// (another key) up to maxRetries times, then back off.
func afterFailure(now time.Time, a *Ask) time.Time {
	a.Tries++
	if a.Tries <= maxRetries {
		return now
	}
	return backoff(now, a)
}

// keyConfig is the keys.json of w, as keyd's operator writes it.
func keyConfig(w *World) []byte {
	type model struct {
		RPM int64 `json:"rpm"`
		TPM int64 `json:"tpm"`
		RPD int64 `json:"rpd,omitempty"`
	}
	type key struct {
		ID      string           `json:"key_id"`
		Project string           `json:"project"`
		Models  map[string]model `json:"models"`
	}
	var f struct {
		LeaseTTL string `json:"lease_ttl,omitempty"`
		Keys     []key  `json:"keys"`
	}
	if w.LeaseTTL > 0 {
		f.LeaseTTL = w.LeaseTTL.String()
	}
	for _, k := range w.Keys {
		l := w.Projects[k.Project]
		f.Keys = append(f.Keys, key{k.ID, k.Project, map[string]model{w.Model: {l.RPM, l.TPM, l.RPD}}})
	}
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		panic(err)
	}
	return b
}

// keydPolicy is keyd itself: every Acquire is a lease request with
// wait_ms 0 to the real pool (daemon.Engine), every Report a real report
// with the provider's status and error body. A refused request is retried
// after exactly retry_after_ms. The daemon's janitor (lease expiry) runs
// every virtual second.
type keydPolicy struct {
	e          *daemon.Engine
	model      string
	nextExpire time.Time
}

func newKeyd(w *World) (Policy, error) {
	data := keyConfig(w)
	cfg, err := config.Parse("/keyd-sim/keys.json", data, config.Options{
		EnvFile: "/keyd-sim/.env", // does not exist: secrets come from Getenv
		Getenv: func(name string) string {
			if id, ok := strings.CutPrefix(name, "GEMINI_KEY_"); ok {
				return "AIzaSIM-" + id
			}
			return ""
		},
	})
	if err != nil {
		return nil, fmt.Errorf("keyd config: %w", err)
	}
	return &keydPolicy{e: daemon.NewEngine(cfg, w.Now), model: w.Model}, nil
}

func (p *keydPolicy) Acquire(now time.Time, a *Ask) (Ticket, bool, time.Time) {
	if !now.Before(p.nextExpire) {
		p.e.Expire()
		p.nextExpire = now.Add(time.Second)
	}
	l, err := p.e.Lease(api.LeaseRequest{Model: p.model, Tokens: a.Tokens, Client: a.Client})
	if err == nil {
		return Ticket{Key: l.KeyID, Lease: l.LeaseID}, true, time.Time{}
	}
	if d, ok := err.RetryAfter(); ok {
		return Ticket{}, false, now.Add(d)
	}
	return Ticket{}, false, time.Time{}
}

func (p *keydPolicy) Report(now time.Time, a *Ask, t Ticket, resp *Response) time.Time {
	rep := api.ReportRequest{Status: resp.Status}
	if resp.Status == 200 {
		rep.Usage = &api.Usage{PromptTokens: a.Tokens}
	} else {
		rep.Error = resp.BodyJSON()
	}
	if _, err := p.e.Report(t.Lease, rep); err != nil {
		panic(fmt.Sprintf("keyd report %s: %v", t.Lease, err))
	}
	return now // keyd applied the verdict: lease again at once
}

// roundRobin models a rotating proxy (gemini-balance, gpt-load): keys are
// used in turn with no local limit; a key answered with a 429 rests for a
// fixed minute; a failed call is retried at once with the next key up to
// three times before the client backs off; a key that fails three times
// in a row with 400/403 is dropped.
type roundRobin struct {
	keys []rrKey
	next int
}

type rrKey struct {
	id    string
	until time.Time
	fails int
	dead  bool
}

func newRoundRobin(w *World) *roundRobin {
	p := &roundRobin{}
	for _, k := range w.Keys {
		p.keys = append(p.keys, rrKey{id: k.ID})
	}
	return p
}

func (p *roundRobin) Acquire(now time.Time, a *Ask) (Ticket, bool, time.Time) {
	n := len(p.keys)
	for i := range n {
		j := (p.next + i) % n
		if k := &p.keys[j]; !k.dead && !now.Before(k.until) {
			p.next = j + 1
			return Ticket{Key: k.id}, true, time.Time{}
		}
	}
	return Ticket{}, false, backoff(now, a) // "no available key"
}

func (p *roundRobin) find(id string) *rrKey {
	for i := range p.keys {
		if p.keys[i].id == id {
			return &p.keys[i]
		}
	}
	panic("unknown key " + id)
}

func (p *roundRobin) Report(now time.Time, a *Ask, t Ticket, resp *Response) time.Time {
	k := p.find(t.Key)
	switch {
	case resp.Status == 200:
		k.fails = 0
		return time.Time{}
	case resp.Status == 429:
		k.until = now.Add(cooldown)
	default:
		k.fails++
		k.dead = k.fails >= maxFailures
	}
	return afterFailure(now, a)
}

// minuteCounters models the seed's Python KeyManager (Redis counters of
// requests and tokens per key per minute) and LiteLLM's usage-based
// routing: each key is given its project's RPM and TPM as if it were alone,
// counted per fixed UTC minute (counts reset at :00), no day count; the
// key with the fewest tokens this minute is chosen and counted at once. A
// 429 or a key error rests the key for a minute. With nothing left, the
// client waits for the next minute (or the end of the earliest rest).
type minuteCounters struct {
	keys []mcKey
}

type mcKey struct {
	id         string
	rpm, tpm   int64
	minute     int64
	reqs, toks int64
	until      time.Time
}

func newMinuteCounters(w *World) *minuteCounters {
	p := &minuteCounters{}
	for _, k := range w.Keys {
		l := w.Projects[k.Project]
		p.keys = append(p.keys, mcKey{id: k.ID, rpm: l.RPM, tpm: l.TPM})
	}
	return p
}

func (p *minuteCounters) Acquire(now time.Time, a *Ask) (Ticket, bool, time.Time) {
	m := now.Unix() / 60
	var best *mcKey
	retry := time.Unix((m+1)*60, 0)
	fits := false
	for i := range p.keys {
		k := &p.keys[i]
		if k.minute != m {
			k.minute, k.reqs, k.toks = m, 0, 0
		}
		if a.Tokens <= k.tpm {
			fits = true
		}
		if now.Before(k.until) {
			retry = earliest(retry, k.until)
			continue
		}
		if k.reqs >= k.rpm || k.toks+a.Tokens > k.tpm {
			continue
		}
		if best == nil || k.toks < best.toks {
			best = k
		}
	}
	if best == nil {
		if !fits {
			return Ticket{}, false, time.Time{}
		}
		return Ticket{}, false, retry
	}
	best.reqs++
	best.toks += a.Tokens
	return Ticket{Key: best.id}, true, time.Time{}
}

func (p *minuteCounters) Report(now time.Time, a *Ask, t Ticket, resp *Response) time.Time {
	if resp.Status == 200 {
		return time.Time{}
	}
	for i := range p.keys {
		if p.keys[i].id == t.Key {
			p.keys[i].until = now.Add(cooldown)
		}
	}
	return afterFailure(now, a)
}

// tokenBucket models the common rate-limiter setup: one golang.org/x/time
// token bucket per (project, model) for requests (rate RPM/60 per second,
// burst RPM) and one for input tokens (rate TPM/60, burst TPM), keys used
// in turn among those whose bucket has room, no day count. A 429 pauses
// the bucket for its RetryInfo; a key failing three times in a row with
// 400/403 is dropped. It knows which keys share a project: only the
// bucket's shape differs from keyd.
type tokenBucket struct {
	keys    []tbKey
	buckets map[string]*tbBucket
	next    int
}

type tbKey struct {
	id      string
	project string
	fails   int
	dead    bool
}

type tbBucket struct {
	req, tok *rate.Limiter
	paused   time.Time
}

func newTokenBucket(w *World) *tokenBucket {
	p := &tokenBucket{buckets: map[string]*tbBucket{}}
	start := w.Now()
	for _, k := range w.Keys {
		p.keys = append(p.keys, tbKey{id: k.ID, project: k.Project})
		if p.buckets[k.Project] == nil {
			l := w.Projects[k.Project]
			b := &tbBucket{
				req: rate.NewLimiter(rate.Limit(float64(l.RPM)/60), int(l.RPM)),
				tok: rate.NewLimiter(rate.Limit(float64(l.TPM)/60), int(l.TPM)),
			}
			// Start full at the run's start, not at the zero time.
			b.req.SetBurstAt(start, int(l.RPM))
			b.tok.SetBurstAt(start, int(l.TPM))
			p.buckets[k.Project] = b
		}
	}
	return p
}

// wait is how long until lim holds n tokens.
func wait(lim *rate.Limiter, now time.Time, n float64) time.Duration {
	have := lim.TokensAt(now)
	if have >= n {
		return 0
	}
	return time.Duration(math.Ceil((n-have)/float64(lim.Limit())*1e9)) + time.Millisecond
}

func (p *tokenBucket) Acquire(now time.Time, a *Ask) (Ticket, bool, time.Time) {
	n := len(p.keys)
	var retry time.Time
	for i := range n {
		j := (p.next + i) % n
		k := &p.keys[j]
		if k.dead {
			continue
		}
		b := p.buckets[k.project]
		if a.Tokens > int64(b.tok.Burst()) {
			continue
		}
		w := max(b.paused.Sub(now), wait(b.req, now, 1), wait(b.tok, now, float64(a.Tokens)))
		if w > 0 {
			retry = earliest(retry, now.Add(w))
			continue
		}
		b.req.AllowN(now, 1)
		b.tok.AllowN(now, int(a.Tokens))
		p.next = j + 1
		return Ticket{Key: k.id}, true, time.Time{}
	}
	return Ticket{}, false, retry
}

func (p *tokenBucket) Report(now time.Time, a *Ask, t Ticket, resp *Response) time.Time {
	var k *tbKey
	for i := range p.keys {
		if p.keys[i].id == t.Key {
			k = &p.keys[i]
		}
	}
	switch {
	case resp.Status == 200:
		k.fails = 0
		return time.Time{}
	case resp.Status == 429:
		b := p.buckets[k.project]
		b.paused = later(b.paused, now.Add(resp.RetryInfo))
		return now // the bucket says when
	default:
		k.fails++
		k.dead = k.fails >= maxFailures
		return now
	}
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || (!b.IsZero() && b.Before(a)) {
		return b
	}
	return a
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
