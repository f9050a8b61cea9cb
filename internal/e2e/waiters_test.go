package e2e

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/client"
)

// The models of TestWaitersUnderChurn.
const (
	churnFlash = "gemini-2.5-flash"
	churnPro   = "gemini-2.5-pro"
)

// churnKeysA is the configuration TestWaitersUnderChurn starts and ends
// with: 6 keys in 3 projects, so 6 buckets. p1/flash (shared by f1 and f2)
// and p1/pro are paced (burst_capacity), so they free by time within the
// test and the pool's timer wakes their waiters; the others are not, so
// they fill to their rpm within seconds and free only by refunds
// ("unused") and, for tpm, by reconciled usage. f3 serves both models
// with max_in_flight 2, and the lease_ttl of 3 s expires the leases the
// generators forget to report. Workload types: flash has light and heavy
// keys, pro heavy ones and one of none.
const churnKeysA = `{"lease_ttl": "3s", "default_tokens": 100, "keys": [
  {"key_id": "f1", "project": "p1", "model_name": "gemini-2.5-flash", "rpm": 40, "tpm": 6000, "burst_capacity": 4, "workload_type": "light", "priority": 1},
  {"key_id": "f2", "project": "p1", "model_name": "gemini-2.5-flash", "rpm": 40, "tpm": 6000, "burst_capacity": 4, "workload_type": "heavy"},
  {"key_id": "f3", "project": "p2", "workload_type": "heavy", "max_in_flight": 2, "models": {
     "gemini-2.5-flash": {"rpm": 60, "tpm": 15000},
     "gemini-2.5-pro":   {"rpm": 60, "tpm": 15000}}},
  {"key_id": "f4", "project": "p3", "model_name": "gemini-2.5-flash", "rpm": 20, "tpm": 3000, "workload_type": "light"},
  {"key_id": "r1", "project": "p1", "model_name": "gemini-2.5-pro", "rpm": 25, "tpm": 8000, "burst_capacity": 3, "workload_type": "heavy"},
  {"key_id": "r2", "project": "p3", "model_name": "gemini-2.5-pro", "rpm": 20, "tpm": 5000}
]}
`

// churnKeysB is churnKeysA with keys f2 and r2 removed (bucket p3/pro
// with r2: it is retired, and must come back with its window when A is
// loaded again), p1/flash's tpm raised from 6000 to 9000 and f3's
// max_in_flight lowered from 2 to 1. No rpm changes: see
// TestWaitersUnderChurn.
const churnKeysB = `{"lease_ttl": "3s", "default_tokens": 100, "keys": [
  {"key_id": "f1", "project": "p1", "model_name": "gemini-2.5-flash", "rpm": 40, "tpm": 9000, "burst_capacity": 4, "workload_type": "light", "priority": 1},
  {"key_id": "f3", "project": "p2", "workload_type": "heavy", "max_in_flight": 1, "models": {
     "gemini-2.5-flash": {"rpm": 60, "tpm": 15000},
     "gemini-2.5-pro":   {"rpm": 60, "tpm": 15000}}},
  {"key_id": "f4", "project": "p3", "model_name": "gemini-2.5-flash", "rpm": 20, "tpm": 3000, "workload_type": "light"},
  {"key_id": "r1", "project": "p1", "model_name": "gemini-2.5-pro", "rpm": 25, "tpm": 8000, "burst_capacity": 3, "workload_type": "heavy"}
]}
`

const churnSecrets = `GEMINI_KEY_f1=AIzaFAKE-churn-f1-0001
GEMINI_KEY_f2=AIzaFAKE-churn-f2-0002
GEMINI_KEY_f3=AIzaFAKE-churn-f3-0003
GEMINI_KEY_f4=AIzaFAKE-churn-f4-0004
GEMINI_KEY_r1=AIzaFAKE-churn-r1-0005
GEMINI_KEY_r2=AIzaFAKE-churn-r2-0006
`

// churnKey is what the test knows of a key of churnKeysA.
type churnKey struct {
	project  string
	workload string
	models   []string
}

var churnKeyInfo = map[string]churnKey{
	"f1": {"p1", "light", []string{churnFlash}},
	"f2": {"p1", "heavy", []string{churnFlash}},
	"f3": {"p2", "heavy", []string{churnFlash, churnPro}},
	"f4": {"p3", "light", []string{churnFlash}},
	"r1": {"p1", "heavy", []string{churnPro}},
	"r2": {"p3", "", []string{churnPro}},
}

// churnRPM is every bucket's rpm, the same in both configurations.
var churnRPM = map[string]int64{
	"p1/" + churnFlash: 40,
	"p2/" + churnFlash: 60,
	"p3/" + churnFlash: 20,
	"p1/" + churnPro:   25,
	"p2/" + churnPro:   60,
	"p3/" + churnPro:   20,
}

// churnConfig is what the checks know of a configuration: its buckets'
// tpm and its keys' max_in_flight (those that have one).
type churnConfig struct {
	name        string
	tpm         map[string]int64
	maxInFlight map[string]int64
}

var (
	churnA = churnConfig{"A", map[string]int64{
		"p1/" + churnFlash: 6000,
		"p2/" + churnFlash: 15000,
		"p3/" + churnFlash: 3000,
		"p1/" + churnPro:   8000,
		"p2/" + churnPro:   15000,
		"p3/" + churnPro:   5000,
	}, map[string]int64{"f3": 2}}
	churnB = churnConfig{"B", map[string]int64{
		"p1/" + churnFlash: 9000,
		"p2/" + churnFlash: 15000,
		"p3/" + churnFlash: 3000,
		"p1/" + churnPro:   8000,
		"p2/" + churnPro:   15000,
	}, map[string]int64{"f3": 1}}
)

// epoch is a time during which one configuration was certainly in force:
// from when the reload that installed it returned (or keyd started) to
// when the next one was written.
type epoch struct {
	cfg      *churnConfig
	from, to time.Time
}

// churnTTL is churnKeys' lease_ttl.
const churnTTL = 3 * time.Second

// churnGrant is one lease keyd granted, as its caller saw it.
type churnGrant struct {
	id, key, project, model string
	tokens                  int64
	// sent is when the lease request was sent, got when the lease came
	// back: keyd granted it in between.
	sent, got time.Time
	// reported is when the report was sent (zero: never), class its
	// answer's classification, used the prompt tokens of a success.
	reported time.Time
	class    string
	used     int64
}

// grantedAt returns when keyd made the grant, in Unix nanoseconds of its
// clock (the machine's wall clock): the time in the lease's ID, which
// keyd takes under the pool's lock (see newLeaseID in internal/daemon).
// Failing that, it returns when the request was sent, which is earlier.
func (g *churnGrant) grantedAt() int64 {
	if len(g.id) == 33 && g.id[0] == 'l' {
		if ns, err := strconv.ParseUint(g.id[1:17], 16, 64); err == nil {
			return int64(ns)
		}
	}
	return g.sent.UnixNano()
}

// churnCall is one lease request and its outcome.
type churnCall struct {
	model, workload string
	wait            time.Duration // wait_ms
	took            time.Duration
	code            string // "" for a grant
}

// churnLedger is what the generators saw. mu guards everything in it.
type churnLedger struct {
	mu       sync.Mutex
	grants   []*churnGrant
	calls    []churnCall
	problems []string
}

func (l *churnLedger) problem(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.problems) < 50 {
		l.problems = append(l.problems, fmt.Sprintf(format, args...))
	}
}

// blackout is a time during which a key must not be granted: after keyctl
// disable (or a reload removing it) returned, before keyctl enable (or the
// reload adding it back) started.
type blackout struct {
	key      string
	from, to time.Time
	why      string
}

// TestWaitersUnderChurn runs 150 generators against a real keyd for 15 s,
// each taking leases (a random model, workload, token estimate and wait_ms
// of 0..5 s) and reporting them (mostly 200 with usage, some unused, a few
// per-minute 429s and 503s, a few never), while the test reloads keys.json
// (a key removed then added back, a tpm and a max_in_flight changed),
// disables and enables keys and resets them (lifting the cooldowns the
// 429s cause), all through keyctl. It checks that
//
//   - every lease request is answered within its wait_ms plus 2 s, with a
//     lease or no_capacity or no_keys: never a hang, never another error
//     (a few callers give up before their wait_ms: their call must end
//     then, by their context); every report is answered and classified
//     as sent;
//   - no bucket ever held more than its rpm grants, or more than its tpm
//     tokens, and f3 never more than max_in_flight open leases, each as
//     configured at the time;
//   - no key was granted while keyctl said it was disabled or a reload
//     had removed it;
//   - once every generator is done, GET /v1/status shows nobody waiting;
//
// and then that 100 requests waiting on an exhausted model (every pro
// bucket cooling after a per-minute 429) all get 503 shutting_down within
// 5 s of SIGTERM, and keyd exits 0.
//
// Exactness is checked client-side, from intervals that keyd's own must
// contain: a grant counts from when its lease came back (keyd granted it
// before) until its report was sent, if that report refunded it (unused),
// else for ever: the whole test fits in one 60 s window, so no grant
// leaves the window by time. Likewise its tokens count at the estimate
// until the report was sent, then at the reported usage (never above the
// estimate), and an open lease until its report was sent or lease_ttl
// after its request was sent. These intervals are within keyd's, so a
// count over a limit is keyd's count over it. The rpm of every bucket is
// the same in both configurations, so the rpm check holds at every
// instant. A tpm or max_in_flight that a reload lowers is legitimately
// exceeded by what was granted before (until refunds, reports or expiries
// bring the count down), so those are checked at every instant against
// the highest value either configuration gives, and against the value of
// the configuration in force only after keyd made a grant under it (the
// time in the lease's ID after the reload's answer): a grant needs room
// under the limit, and only grants raise the count.
func TestWaitersUnderChurn(t *testing.T) {
	const (
		runFor     = 15 * time.Second
		generators = 150
		maxWait    = 5 * time.Second
		slack      = 2 * time.Second
	)
	rate429 := fixture(t, "429_paid_rpm.json")
	body503 := fixture(t, "503_overloaded.json")
	testStart := time.Now()
	r := newRig(t, churnKeysA, churnSecrets)
	sock := r.k.sock

	led := &churnLedger{}
	start := time.Now()
	end := start.Add(runFor)
	var wg sync.WaitGroup
	for g := range generators {
		wg.Go(func() { churnGenerator(sock, g, end, maxWait, slack, led, rate429, body503) })
	}

	// The churn, on this goroutine (keyctl and writeAtomic may t.Fatal):
	// a cycle of 10 steps every 5 s, 3 cycles, ending on configuration A
	// with every key enabled. Each bucket has a key reset once a cycle,
	// lifting the cooldowns of the generators' 429s.
	var blackouts []blackout
	keyctl := func(want string, args ...string) time.Time {
		out, errOut, code := r.keyctl(args...)
		if code != 0 || !strings.Contains(out, want) {
			t.Errorf("keyctl %s: exit %d, stdout %q, stderr %q; want exit 0 and %q", strings.Join(args, " "), code, out, errOut, want)
		}
		return time.Now()
	}
	disabledAt := map[string]time.Time{}
	disable := func(key string) { disabledAt[key] = keyctl("key "+key+": disabled", "disable", key) }
	enable := func(key, how string) {
		blackouts = append(blackouts, blackout{key, disabledAt[key], time.Now(), "disabled by keyctl"})
		keyctl("key "+key+": ", how, key)
	}
	reset := func(key string) { keyctl("key "+key+": ", "reset", key) }
	var removedAt time.Time
	// epochs[len-1].to is set when the next configuration is written, or
	// at the checks.
	epochs := []epoch{{cfg: &churnA, from: testStart}}
	steps := []func(){
		func() { disable("f1") },
		func() { enable("f1", "enable") },
		func() { disable("f3") },
		func() { // f3 stays disabled through the reload
			epochs[len(epochs)-1].to = time.Now()
			writeAtomic(t, r.cfg, churnKeysB)
			removedAt = keyctl("4 keys", "reload")
			epochs = append(epochs, epoch{cfg: &churnB, from: removedAt})
		},
		func() { enable("f3", "reset") }, // which also lifts p2's cooldowns
		func() { reset("f4") },
		func() { reset("r1") },
		func() {
			for _, k := range []string{"f2", "r2"} {
				blackouts = append(blackouts, blackout{k, removedAt, time.Now(), "removed by a reload"})
			}
			epochs[len(epochs)-1].to = time.Now()
			writeAtomic(t, r.cfg, churnKeysA)
			epochs = append(epochs, epoch{cfg: &churnA, from: keyctl("6 keys", "reload")})
		},
		func() { reset("r2") },
		func() { reset("f2") }, // p1/flash's
	}
	const step = 500 * time.Millisecond
	for i := 0; ; i++ {
		at := start.Add(time.Duration(i+1) * step)
		if !at.Before(end) {
			break
		}
		time.Sleep(time.Until(at))
		steps[i%len(steps)]()
	}
	churnEnd := time.Now()

	allDone := make(chan struct{})
	go func() { wg.Wait(); close(allDone) }()
	select {
	case <-allDone:
	case <-time.After(maxWait + slack + 15*time.Second):
		t.Fatalf("the generators did not finish %v after the run's end: lease or report calls hang; keyd's log:\n%s",
			time.Since(end).Round(time.Millisecond), r.k.log)
	}
	done := time.Now()
	st := r.status()

	// What the generators saw.
	for _, p := range led.problems {
		t.Error(p)
	}
	codes := map[string]int{}
	waited, waitedGrants := 0, 0
	var maxOver time.Duration
	for _, c := range led.calls {
		codes[c.code]++
		if c.wait > 0 && c.took > 100*time.Millisecond {
			waited++
			if c.code == "" {
				waitedGrants++
			}
		}
		maxOver = max(maxOver, c.took-c.wait)
	}
	classes := map[string]int{}
	for _, g := range led.grants {
		classes[g.class]++
	}
	t.Logf("%d lease calls in %v (churn ended %v after start, generators %v): outcomes %v; %d waited over 100 ms, %d of them granted; "+
		"longest answer beyond wait_ms %v; reports %v ('' = never reported)",
		len(led.calls), runFor, churnEnd.Sub(start).Round(time.Millisecond), done.Sub(start).Round(time.Millisecond),
		codes, waited, waitedGrants, maxOver.Round(time.Millisecond), classes)

	// Status: nobody waits once every request has its answer.
	if len(st.Waiting) != 0 {
		t.Errorf("GET /v1/status lists waiting requests after every lease call returned: %+v", st.Waiting)
	}
	if st.Config.LastError != "" || len(st.Keys) != 6 {
		t.Errorf("after the churn: %d keys, last error %q; want configuration A's 6 keys and no error", len(st.Keys), st.Config.LastError)
	}
	for _, k := range st.Keys {
		if k.State == api.StateDisabled {
			t.Errorf("key %s is still disabled after the churn: %s", k.KeyID, k.Reason)
		}
	}

	// The load must have loaded: grants (the buckets' rpm add up to 225,
	// plus the refunds), waits that ended in grants and in refusals,
	// refunds.
	if len(led.grants) < 80 || waitedGrants < 20 || codes[api.CodeNoCapacity] < 100 || classes[api.ClassUnused] < 10 {
		t.Errorf("the load was too light to mean anything: %d grants, %d granted after a wait, %v", len(led.grants), waitedGrants, codes)
	}

	epochs[len(epochs)-1].to = time.Now()
	churnCheckExact(t, led.grants, epochs, blackouts, true)
	if t.Failed() {
		t.Logf("keyd's log:\n%s", r.k.log)
		return
	}

	// Final phase: exhaust pro, park 100 waiters on it, SIGTERM.
	churnShutdown(t, r, led, rate429)
	epochs[len(epochs)-1].to = time.Now()
	churnCheckExact(t, led.grants, epochs, nil, false) // with the final phase's grants

	if d := time.Since(testStart); d > 50*time.Second {
		t.Errorf("the test took %v: too close to the 60 s rpm window for the exactness check to mean anything", d)
	}
	t.Logf("wall time %v", time.Since(testStart).Round(time.Millisecond))
}

// churnGenerator is one generator: a client of its own, taking and
// reporting leases until end.
func churnGenerator(sock string, g int, end time.Time, maxWait, slack time.Duration, led *churnLedger, rate429, body503 rawJSON) {
	c := client.New(sock)
	defer c.CloseIdleConnections()
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(g)))
	name := fmt.Sprintf("churn-g%d", g)
	for {
		left := time.Until(end)
		if left <= 0 {
			return
		}
		model, workloads := churnFlash, []string{"", "light", "heavy"}
		if rng.IntN(5) < 2 {
			model, workloads = churnPro, []string{"", "heavy"}
		}
		workload := workloads[rng.IntN(len(workloads))]
		tokens := 50 + rng.Int64N(450)
		if rng.IntN(10) == 0 {
			tokens = 1500 + rng.Int64N(1300) // large: must not starve behind small ones
		}
		var wait time.Duration
		if rng.IntN(10) >= 3 {
			wait = time.Duration(rng.Int64N(int64(maxWait/time.Millisecond)+1)) * time.Millisecond
		}
		wait = min(wait, left.Truncate(time.Millisecond))
		req := api.LeaseRequest{Model: model, Tokens: tokens, WorkloadType: workload, WaitMS: wait.Milliseconds(), Client: name}

		// The context bounds a hang, which the check below reports; for
		// one request in 20 that waits, it is a caller giving up before
		// its wait_ms (the waiter leaves the queue). A lease keyd grants
		// as the caller gives up is then lost to the ledger, which only
		// lowers the counts of the exactness checks.
		bound, giveUp := wait+slack+10*time.Second, time.Duration(0)
		if wait > 200*time.Millisecond && rng.IntN(20) == 0 {
			giveUp = 100*time.Millisecond + time.Duration(rng.Int64N(int64(wait-150*time.Millisecond)))
			bound = giveUp
		}
		ctx, cancel := context.WithTimeout(context.Background(), bound)
		sent := time.Now()
		l, err := c.Lease(ctx, req)
		cancel()
		got := time.Now()
		call := churnCall{model: model, workload: workload, wait: wait, took: got.Sub(sent)}
		if call.took > wait+slack || giveUp > 0 && call.took > giveUp+slack {
			led.problem("lease %s workload %q tokens %d wait_ms %d (giving up after %v): answered after %v (%v)",
				model, workload, tokens, req.WaitMS, giveUp, call.took.Round(time.Millisecond), err)
		}
		if err != nil {
			var ae *api.Error
			switch {
			case giveUp > 0 && errors.Is(err, context.DeadlineExceeded):
				call.code = "gave_up"
			case !errors.As(err, &ae):
				call.code = "transport"
				led.problem("lease %s wait_ms %d: %v (not an answer of keyd)", model, req.WaitMS, err)
			case ae.Code == api.CodeNoCapacity && ae.HTTPStatus == http.StatusTooManyRequests,
				ae.Code == api.CodeNoKeys && ae.HTTPStatus == http.StatusServiceUnavailable:
				call.code = ae.Code
			default:
				call.code = ae.Code
				led.problem("lease %s workload %q tokens %d wait_ms %d: %d %s: %v; want a lease, no_capacity or no_keys",
					model, workload, tokens, req.WaitMS, ae.HTTPStatus, ae.Code, err)
			}
			led.mu.Lock()
			led.calls = append(led.calls, call)
			led.mu.Unlock()
			time.Sleep(time.Duration(10+rng.IntN(70)) * time.Millisecond)
			continue
		}
		gr := &churnGrant{id: l.LeaseID, key: l.KeyID, project: l.Project, model: l.Model, tokens: l.Tokens, sent: sent, got: got}
		k, ok := churnKeyInfo[l.KeyID]
		switch {
		case !ok || k.project != l.Project || l.Model != model || !slices.Contains(k.models, model):
			led.problem("lease %s workload %q got %+v: not a key of that model", model, workload, l)
		case workload != "" && k.workload != workload:
			led.problem("lease %s workload %q got key %s of workload %q", model, workload, l.KeyID, k.workload)
		case l.Tokens != tokens:
			led.problem("lease of %d tokens came back with %d", tokens, l.Tokens)
		}
		led.mu.Lock()
		led.calls = append(led.calls, call)
		led.grants = append(led.grants, gr)
		led.mu.Unlock()

		time.Sleep(time.Duration(rng.IntN(200)) * time.Millisecond) // the call to Gemini
		var rep api.ReportRequest
		var want string
		switch n := rng.IntN(100); {
		case n < 3: // never reported: it expires after lease_ttl
			continue
		case n < 23:
			rep, want = api.ReportRequest{Outcome: api.OutcomeUnused}, api.ClassUnused
		case n < 26:
			rep, want = api.ReportRequest{Status: 429, Error: rate429}, api.ClassRateMinute
		case n < 28:
			rep, want = api.ReportRequest{Status: 503, Error: body503}, api.ClassServerError
		default:
			used := tokens/4 + rng.Int64N(tokens-tokens/4+1) // at most the estimate
			rep, want = api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: used, OutputTokens: 20, TotalTokens: used + 20}}, api.ClassSuccess
		}
		reported := time.Now()
		ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
		resp, err := c.Report(ctx, l.LeaseID, rep)
		cancel()
		if err != nil || resp.Classification != want || resp.Duplicate || resp.KeyID != l.KeyID {
			led.problem("report %s of lease %s on key %s: %+v, %v; want a first report classified %s", want, l.LeaseID, l.KeyID, resp, err, want)
			continue
		}
		led.mu.Lock()
		gr.reported, gr.class = reported, want
		if rep.Usage != nil {
			gr.used = rep.Usage.PromptTokens
		}
		led.mu.Unlock()
	}
}

// churnCheckExact checks the grants against the limits, over the
// intervals TestWaitersUnderChurn describes: at every instant, a bucket
// held at most its rpm grants, and at most the highest tpm of either
// configuration in tokens, and f3 at most the highest max_in_flight of
// either in open leases; and within an epoch, once a grant keyd made in
// it has come back, at most the epoch's configuration's tpm and
// max_in_flight (keyd made that grant under them, and only grants raise
// the counts). It also checks that no key was granted during one of its
// blackouts. It logs the highest counts when verbose.
func churnCheckExact(t *testing.T, grants []*churnGrant, epochs []epoch, blackouts []blackout, verbose bool) {
	t.Helper()
	type event struct {
		at     time.Time
		n, tok int64 // changes of the grants and tokens held
		g      *churnGrant
	}
	byBucket := map[string][]event{}
	byKey := map[string][]event{}
	for _, g := range grants {
		bid := g.project + "/" + g.model
		byBucket[bid] = append(byBucket[bid], event{at: g.got, n: 1, tok: g.tokens, g: g})
		switch g.class {
		case api.ClassUnused:
			byBucket[bid] = append(byBucket[bid], event{at: g.reported, n: -1, tok: -g.tokens, g: g})
		case api.ClassSuccess:
			byBucket[bid] = append(byBucket[bid], event{at: g.reported, tok: g.used - g.tokens, g: g})
		}
		if _, ok := churnA.maxInFlight[g.key]; ok {
			closed := g.sent.Add(churnTTL)
			if !g.reported.IsZero() && g.reported.Before(closed) {
				closed = g.reported
			}
			byKey[g.key] = append(byKey[g.key], event{at: g.got, n: 1, g: g}, event{at: closed, n: -1, g: g})
		}
		for _, b := range blackouts {
			if b.key == g.key && g.sent.After(b.from) && g.got.Before(b.to) {
				t.Errorf("lease %s on key %s was requested %v after the key was %s and granted %v before it came back",
					g.id, g.key, g.sent.Sub(b.from).Round(time.Millisecond), b.why, b.to.Sub(g.got).Round(time.Millisecond))
			}
		}
	}
	epochAt := func(at time.Time) *epoch {
		for i := range epochs {
			if e := &epochs[i]; !at.Before(e.from) && !at.After(e.to) {
				return e
			}
		}
		return nil
	}
	// sweep runs evs in time order, decreases first on a tie (the counts
	// stay below keyd's), and calls check after each grant with the
	// counts and the epoch at that time, if that epoch has seen a grant
	// of evs that keyd made in it come back (nil otherwise). keyd made
	// it under the epoch's configuration when its lease ID's time is past
	// the epoch's start: keyd took that time under the lock that the
	// reload had released before it answered.
	sweep := func(evs []event, check func(e event, n, tok int64, settled *epoch)) {
		slices.SortStableFunc(evs, func(a, b event) int {
			if c := a.at.Compare(b.at); c != 0 {
				return c
			}
			if a.n != b.n {
				return int(a.n - b.n)
			}
			return int(min(max(a.tok-b.tok, -1), 1))
		})
		settled := map[*epoch]bool{}
		var n, tok int64
		for _, e := range evs {
			n += e.n
			tok += e.tok
			if e.n <= 0 {
				continue
			}
			ep := epochAt(e.at)
			if ep != nil && e.g.grantedAt() >= ep.from.UnixNano() {
				settled[ep] = true
			}
			if !settled[ep] {
				ep = nil
			}
			check(e, n, tok, ep)
		}
	}
	at := func(e event) string { return e.at.Format("15:04:05.000") }
	for bid, evs := range byBucket {
		rpm, ok := churnRPM[bid]
		if !ok {
			t.Errorf("grants on bucket %s, which no configuration has", bid)
			continue
		}
		maxTPM := max(churnA.tpm[bid], churnB.tpm[bid])
		var mostN, mostTok int64
		sweep(evs, func(e event, n, tok int64, ep *epoch) {
			mostN, mostTok = max(mostN, n), max(mostTok, tok)
			if n > rpm {
				t.Errorf("bucket %s: %d grants held at once (rpm %d, all within one 60 s window), the last lease %s on key %s at %s",
					bid, n, rpm, e.g.id, e.g.key, at(e))
			}
			if tok > maxTPM {
				t.Errorf("bucket %s: %d tokens held at once (tpm %d at most), the last lease %s of %d tokens on key %s at %s",
					bid, tok, maxTPM, e.g.id, e.g.tokens, e.g.key, at(e))
			}
			if ep == nil {
				return
			}
			if lim, ok := ep.cfg.tpm[bid]; ok && tok > lim {
				t.Errorf("bucket %s: %d tokens held at %s, after lease %s of %d tokens on key %s, under configuration %s (in force since %s) whose tpm is %d",
					bid, tok, at(e), e.g.id, e.g.tokens, e.g.key, ep.cfg.name, ep.from.Format("15:04:05.000"), lim)
			}
		})
		if verbose {
			t.Logf("bucket %s: at most %d/%d grants and %d/%d tokens held", bid, mostN, rpm, mostTok, maxTPM)
		}
	}
	for key, evs := range byKey {
		maxMIF := max(churnA.maxInFlight[key], churnB.maxInFlight[key])
		var most int64
		sweep(evs, func(e event, n, _ int64, ep *epoch) {
			most = max(most, n)
			if n > maxMIF {
				t.Errorf("key %s: %d leases open at once (max_in_flight %d at most), the last %s at %s", key, n, maxMIF, e.g.id, at(e))
			}
			if ep != nil && n > ep.cfg.maxInFlight[key] {
				t.Errorf("key %s: %d leases open at %s, the last %s, under configuration %s (in force since %s) whose max_in_flight is %d",
					key, n, at(e), e.g.id, ep.cfg.name, ep.from.Format("15:04:05.000"), ep.cfg.maxInFlight[key])
			}
		})
		if verbose {
			t.Logf("key %s: at most %d/%d leases open", key, most, maxMIF)
		}
	}
}

// churnShutdown exhausts model pro (a per-minute 429 on every bucket that
// grants, which cools it for 34 s or more), has 100 requests wait on it,
// sends keyd SIGTERM and checks that every one gets 503 shutting_down
// within 5 s and that keyd exits 0.
func churnShutdown(t *testing.T, r *rig, led *churnLedger, rate429 rawJSON) {
	const waiters = 100
	c := client.New(r.k.sock)
	defer c.CloseIdleConnections()
	deadline := time.Now().Add(15 * time.Second)
	for {
		if time.Now().After(deadline) {
			t.Fatalf("could not exhaust %s within 15 s; status: %+v", churnPro, r.status().Buckets)
		}
		sent := time.Now()
		l, err := c.Lease(r.ctx(), api.LeaseRequest{Model: churnPro, Tokens: 10, Client: "churn-exhaust"})
		if err == nil {
			g := &churnGrant{id: l.LeaseID, key: l.KeyID, project: l.Project, model: l.Model, tokens: l.Tokens, sent: sent, got: time.Now()}
			led.grants = append(led.grants, g)
			g.reported = time.Now()
			rep, err := c.Report(r.ctx(), l.LeaseID, api.ReportRequest{Status: 429, Error: rate429})
			if err != nil || rep.Classification != api.ClassRateMinute {
				t.Fatalf("report 429 of lease %s: %+v, %v", l.LeaseID, rep, err)
			}
			g.class = api.ClassRateMinute
			continue
		}
		d, ok := client.IsNoCapacity(err)
		if !ok {
			t.Fatalf("exhausting %s: %v; want a lease or no_capacity", churnPro, err)
		}
		if d == 0 || d > 25*time.Second {
			break // nothing frees before the waiters below are gone
		}
		time.Sleep(min(d, time.Second)) // a pacer, or f3's slot of a forgotten lease
	}

	errs := make(chan error, waiters)
	for i := range waiters {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
			defer cancel()
			l, err := c.Lease(ctx, api.LeaseRequest{Model: churnPro, Tokens: 10, WaitMS: 30000, Client: fmt.Sprintf("churn-waiter%d", i)})
			if err == nil {
				err = fmt.Errorf("granted lease %s on key %s of an exhausted model", l.LeaseID, l.KeyID)
			}
			errs <- err
		}()
	}
	r.await(fmt.Sprintf("%d requests waiting for %s", waiters, churnPro), func(st *api.Status) bool {
		return len(st.Waiting) == 1 && st.Waiting[0].Model == churnPro && st.Waiting[0].Requests == waiters
	})
	sent := time.Now()
	if err := r.k.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	timeout := time.After(5 * time.Second)
	shut := 0
	for i := range waiters {
		select {
		case err := <-errs:
			var ae *api.Error
			if errors.As(err, &ae) && ae.Code == api.CodeShuttingDown && ae.HTTPStatus == http.StatusServiceUnavailable {
				shut++
			} else {
				t.Errorf("a request waiting at SIGTERM got %v; want 503 shutting_down", err)
			}
		case <-timeout:
			t.Fatalf("%d of %d waiters had no answer 5 s after SIGTERM (%d got shutting_down); keyd's log:\n%s", waiters-i, waiters, shut, r.k.log)
		}
	}
	answered := time.Since(sent)
	select {
	case <-r.k.done:
	case <-time.After(15 * time.Second):
		t.Fatalf("keyd did not exit within 15 s of SIGTERM; its log:\n%s", r.k.log)
	}
	t.Logf("SIGTERM: %d waiters answered shutting_down within %v, keyd exited after %v",
		shut, answered.Round(time.Millisecond), time.Since(sent).Round(time.Millisecond))
	if r.k.err != nil {
		t.Errorf("keyd exited with %v after SIGTERM, want 0; its log:\n%s", r.k.err, r.k.log)
	}
	if log := r.k.log.String(); !strings.Contains(log, `msg="keyd stopped"`) || strings.Contains(log, "were cut") || strings.Contains(log, "level=ERROR") {
		t.Errorf("keyd's log: want a clean stop, nothing cut, no error:\n%s", log)
	}
}

// TestExpiredLeaseFreesMaxInFlightSlot takes the one lease a key with
// max_in_flight 1 allows and lets it expire unreported. From its
// expires_at the slot is free (docs/api.md: "After this the lease no
// longer holds a max_in_flight slot"; docs/configuration.md: "A slot frees
// on report or at expires_at"), so a lease request with wait_ms 0 just
// after it must be granted, and so on for a few rounds.
//
// keyd used to close expired leases only when its janitor ticked (once a
// second) or the pool's timer ran for a waiter: until then a request that
// did not wait was refused with no_capacity "max_in_flight 1 reached" and
// a retry_after_ms of 1, and a client obeying it retried hundreds of
// times. lease now closes the expired leases first (pool.closeExpired).
func TestExpiredLeaseFreesMaxInFlightSlot(t *testing.T) {
	t.Parallel()
	r := newRig(t, `{"lease_ttl": "1s", "keys": [
  {"key_id": "s", "project": "q", "model_name": "m", "rpm": 1000, "tpm": 1000000, "max_in_flight": 1}
]}
`, "GEMINI_KEY_s=AIzaFAKE-expiry-s\n")
	l := r.lease("m")
	for round := range 3 {
		time.Sleep(time.Until(l.ExpiresAt) + 20*time.Millisecond)
		next, err := r.c.Lease(r.ctx(), api.LeaseRequest{Model: "m", Client: "expiry"})
		if err != nil {
			d, _ := client.IsNoCapacity(err)
			t.Fatalf("round %d: the only open lease expired at %s, but a lease request 20ms later was refused: %v (retry after %v)",
				round, l.ExpiresAt.Format("15:04:05.000"), err, d)
		}
		l = next
	}
}
