package e2e

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/client"
	"github.com/keyd/keyd/internal/fakegemini"
	"github.com/keyd/keyd/internal/testutil"
)

// The pool of TestPool: 3 projects, 8 keys, one of them invalid. The fake
// Gemini API and keyd are given the same limits: keyd must know the true
// ones. TPM is generous (the heaviest minute uses about 40k input tokens):
// the binding limit is RPM, so capacity is a count of requests.
const poolModel = "gemini-2.5-flash"

var (
	poolRPM = map[string]int{"p1": 10, "p2": 20, "p3": 30} // 60 requests/min in all
	poolTPM = 200000
	poolRPD = 5000
	poolKey = []struct {
		id, project string
		invalid     bool
	}{
		{"a1", "p1", false}, {"a2", "p1", false},
		{"b1", "p2", false}, {"b2", "p2", false}, {"b3", "p2", true},
		{"c1", "p3", false}, {"c2", "p3", false}, {"c3", "p3", false},
	}
)

func poolSecret(id string) string { return "AIzaFAKE-pool-" + id + "-0123456789abcdef" }

// poolPlan is the timeline of one run, from the moment the generators
// are told to go.
type poolPlan struct {
	// killAt: keyd is killed with SIGKILL, then restarted on the same
	// state dir and socket.
	killAt time.Duration
	// longCall is how long the fake takes to answer each generator's first
	// call (its other calls take fastCall): long enough that those calls,
	// granted at the start, are in flight across the kill and are
	// reported to the restarted keyd.
	longCall, fastCall time.Duration
	// runFor is how long the load runs (then until nothing is in
	// flight); refill says it goes past the first minute.
	runFor time.Duration
	refill bool
}

// TestPool is the end-to-end test of the whole pool: keyd, the fake
// Gemini API with tight per-(project, model) limits, and 8 generator
// processes (4 Go ones on client/gemini, 4 Python ones on keyd_client.py,
// 6 workers each, so 48 callers looping as fast as leases allow: demand
// exceeds capacity throughout), with keyd killed with SIGKILL in the
// middle of the run and restarted.
//
// The timeline. Limits are sliding 60 s windows, so from a cold start
// each bucket's whole RPM is granted at once and nothing more until the
// first of those grants is 60 s old; then the window refills as the
// grants of a minute ago leave it. A run that stops before 60 s can
// only show the first window filled; the full run (not -short) therefore
// goes on until every bucket's window has refilled, and some more:
//
//	0 s     go: 48 workers ask at once and are granted; 8 of them are the
//	        generators' long calls; the leases on the invalid key, granted
//	        before its first 400 was reported, fail, and keyd disables it
//	0.6 s   the rest of the 60 slots is granted: every bucket is full (at
//	        keyd and at the fake), all workers wait in keyd
//	30 s    kill -9 while the long calls are in flight and every other
//	        worker waits; 1 s later (systemd's RestartSec) the restart on
//	        the same state dir and socket
//	35 s    the long calls end and are reported to the restarted keyd
//	60 s    the first grants leave the window: every bucket refills
//	66 s    nothing in flight, nothing grantable before 120 s: stop
//
// -short runs the same plan in 20 s (kill at 8 s), without the refill.
// The fake answers every call after 500 ms (the long ones after 35 s,
// 12 s in -short), on the real clock.
//
// It checks what the issue asks: no request above any limit (the fake's
// Violations, and zero 429s); every request accounted for (the fake's
// requests and successes per key equal keyd's usage, every 2xx the fake
// answered reached exactly one generator, no lease left open or
// unreported); the pool's capacity used at 90% or more (see
// poolCapacity); the invalid key disabled at its first 400 and never
// leased again, across the restart too; nothing lost across the restart
// (the windows and the disabled key come back, the leases open at the
// kill are reported to the new keyd). Its figures end the test log.
func TestPool(t *testing.T) {
	python, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 is not installed: the pool test runs Python generators")
	}
	plan := poolPlan{killAt: 30 * time.Second, longCall: 35 * time.Second, fastCall: 500 * time.Millisecond, runFor: 66 * time.Second, refill: true}
	if testing.Short() {
		plan = poolPlan{killAt: 8 * time.Second, longCall: 12 * time.Second, fastCall: 500 * time.Millisecond, runFor: 20 * time.Second}
	}
	r := newPoolRun(t, plan, python)
	r.run()
	r.check()
}

// poolRun is one run of TestPool.
type poolRun struct {
	t      *testing.T
	plan   poolPlan
	python string

	dir, sock string
	keydArgs  []string
	keyd      *keydProc
	keydLogs  []*testutil.SyncBuffer // of each keyd process
	fake      *fakegemini.Server
	srv       *httptest.Server
	gens      []*genProc

	// Times of the run.
	goAt, killAt, backAt, stopAt time.Time
	// keyd's buckets before the kill and after the restart.
	beforeKill, afterRestart *api.Status
	// keyd's status and usage history once the generators stopped.
	final      *api.Status
	finalUsage *api.UsageResponse
	buildTime  time.Duration // of the Go generator
	// problems found while the run went on, reported by check.
	problems []string
}

// The long calls' prompt: about 1100 tokens by the fake's rule. The fake
// answers prompts of longTokens or more after plan.longCall.
const longTokens = 1000

var longPrompt = strings.Repeat("Write a long essay on quota buckets. ", 120)

func newPoolRun(t *testing.T, plan poolPlan, python string) *poolRun {
	r := &poolRun{t: t, plan: plan, python: python, dir: t.TempDir()}
	r.sock = filepath.Join(shortTempDir(t, "kp"), "s.sock")

	// keyd's configuration: the fake's limits, exactly.
	var keys, env []string
	for _, k := range poolKey {
		keys = append(keys, fmt.Sprintf(`{"key_id": %q, "project": %q, "model_name": %q, "rpm": %d, "tpm": %d, "rpd": %d}`,
			k.id, k.project, poolModel, poolRPM[k.project], poolTPM, poolRPD))
		env = append(env, fmt.Sprintf("GEMINI_KEY_%s=%s", k.id, poolSecret(k.id)))
	}
	cfg := filepath.Join(r.dir, "keys.json")
	envFile := filepath.Join(r.dir, "keyd.env")
	writeFile(t, cfg, "{\"keys\": [\n  "+strings.Join(keys, ",\n  ")+"\n]}\n")
	writeFile(t, envFile, strings.Join(env, "\n")+"\n")
	r.keydArgs = []string{"--config", cfg, "--env-file", envFile, "--state-dir", filepath.Join(r.dir, "state"), "--log-level", "debug"}

	// The fake, in this process on 127.0.0.1, on the real clock. Every
	// project sets its limits: the model's defaults are never used.
	fc := fakegemini.Config{
		Models:  []fakegemini.Model{{Name: poolModel, Limits: fakegemini.Limits{RPM: 1, TPM: 1}}},
		Latency: plan.fastCall,
	}
	for _, p := range []string{"p1", "p2", "p3"} {
		fc.Projects = append(fc.Projects, fakegemini.Project{Name: p,
			Models: map[string]fakegemini.Limits{poolModel: {RPM: poolRPM[p], TPM: poolTPM, RPD: poolRPD}}})
	}
	for _, k := range poolKey {
		st := fakegemini.KeyOK
		if k.invalid {
			st = fakegemini.KeyInvalid
		}
		fc.Keys = append(fc.Keys, fakegemini.Key{Key: poolSecret(k.id), Project: k.project, State: st})
	}
	r.fake = fakegemini.New(fc)
	r.fake.Fail(func(q fakegemini.Request) *fakegemini.Fault {
		if q.PromptTokens >= longTokens {
			return &fakegemini.Fault{Kind: fakegemini.FaultLatency, Latency: plan.longCall - plan.fastCall}
		}
		return nil
	})
	r.srv = httptest.NewServer(r.fake)
	t.Cleanup(r.srv.Close)
	return r
}

// restartSec is systemd/keyd.service's RestartSec: how long keyd stays
// down after the kill.
const restartSec = time.Second

// run drives the timeline; check then judges it.
func (r *poolRun) run() {
	t := r.t
	r.keyd = startKeyd(t, r.sock, r.keydArgs...)
	r.keydLogs = append(r.keydLogs, r.keyd.log)
	r.startGenerators()
	for _, g := range r.gens {
		g.send("go\n")
	}
	r.goAt = time.Now()

	// The first window: filled, with the invalid key's 400 and the long
	// calls in flight, well before the kill.
	r.waitFor("the first window to fill, the invalid key to be tried and the long calls to be in flight",
		r.goAt.Add(r.plan.killAt-time.Second), func() bool {
			recs := r.fake.Requests()
			return r.invalidTried(recs) && r.longInFlight(recs) == len(r.gens) && r.keydFull(r.status())
		})

	// kill -9 in the middle, then the restart on the same state.
	time.Sleep(time.Until(r.goAt.Add(r.plan.killAt)))
	r.beforeKill = r.status()
	if n := r.longInFlight(r.fake.Requests()); n != len(r.gens) {
		r.problem("at the kill %d long calls were in flight, want %d", n, len(r.gens))
	}
	r.killAt = time.Now()
	r.keyd.kill9()
	time.Sleep(restartSec) // as systemd restarts it (systemd/keyd.service)
	r.keyd = startKeyd(t, r.sock, r.keydArgs...)
	r.backAt = time.Now()
	r.keydLogs = append(r.keydLogs, r.keyd.log)
	r.afterRestart = r.status()

	// The long calls end and are reported to the new keyd.
	r.waitFor("the long calls to be reported", r.goAt.Add(r.plan.longCall+10*time.Second), func() bool {
		return r.fakeInFlight() == 0 && keydInFlight(r.status()) == 0
	})

	// The rest of the run: runFor, 6 s past the refill in the full run
	// (how well it went is poolCapacity's to say). It stops once no call
	// is in flight and keyd has nothing to grant, so that stopping the
	// generators (which cancels their waits) can neither cut a call nor
	// strand a grant.
	time.Sleep(time.Until(r.goAt.Add(r.plan.runFor)))
	r.waitFor("quiescence: every bucket full, nothing in flight", r.goAt.Add(r.plan.runFor+5*time.Second), func() bool {
		st := r.status()
		return r.fakeInFlight() == 0 && keydInFlight(st) == 0 && r.keydFull(st)
	})
	r.stopAt = time.Now()
	r.stopGenerators()
	r.final, r.finalUsage = r.status(), r.usage()
	r.keyd.stop()
}

// problem records a failure found during the run; check reports it.
func (r *poolRun) problem(format string, args ...any) {
	r.problems = append(r.problems, fmt.Sprintf(format, args...))
}

// waitFor polls cond until it holds or the deadline passes (then it is a
// problem, and the run goes on).
func (r *poolRun) waitFor(what string, deadline time.Time, cond func() bool) {
	for !cond() {
		if time.Now().After(deadline) {
			r.problem("timed out at %v waiting for %s", time.Since(r.goAt).Round(time.Millisecond), what)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (r *poolRun) status() *api.Status {
	r.t.Helper()
	c := client.New(r.sock)
	defer c.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := c.Status(ctx)
	if err != nil {
		r.t.Fatalf("keyd status: %v; keyd's log:\n%s", err, r.keyd.log)
	}
	return st
}

// keydFull reports whether keyd can grant nothing now: every bucket's
// window is full, or the bucket is cooling or disabled.
func (r *poolRun) keydFull(st *api.Status) bool {
	for _, b := range st.Buckets {
		if b.State == api.StateReady && b.RPM.Used < b.RPM.Limit {
			return false
		}
	}
	return len(st.Buckets) == len(poolRPM)
}

func keydInFlight(st *api.Status) int {
	n := 0
	for _, k := range st.Keys {
		n += k.InFlight
	}
	return n
}

func (r *poolRun) fakeInFlight() int {
	n := 0
	for _, rec := range r.fake.Requests() {
		if rec.Status == 0 {
			n++
		}
	}
	return n
}

func (r *poolRun) longInFlight(recs []fakegemini.Record) int {
	n := 0
	for _, rec := range recs {
		if rec.Status == 0 && rec.PromptTokens >= longTokens {
			n++
		}
	}
	return n
}

func (r *poolRun) invalidTried(recs []fakegemini.Record) bool {
	for _, rec := range recs {
		if rec.Key == poolSecret("b3") {
			return true
		}
	}
	return false
}

// admittedByProject returns the admission times at the fake per project,
// sorted.
func admittedByProject(recs []fakegemini.Record) map[string][]time.Time {
	out := map[string][]time.Time{}
	for _, rec := range recs {
		if rec.Admitted {
			out[rec.Project] = append(out[rec.Project], rec.Time)
		}
	}
	for _, ts := range out {
		slices.SortFunc(ts, time.Time.Compare)
	}
	return out
}

// inWindow counts the times in (at-60s, at], as the fake's window does.
func inWindow(ts []time.Time, at time.Time) int {
	lo := sort.Search(len(ts), func(i int) bool { return ts[i].After(at.Add(-fakegemini.Window)) })
	hi := sort.Search(len(ts), func(i int) bool { return ts[i].After(at) })
	return hi - lo
}

// genLine is one line of a generator's stdout: poolgen/main.go's, or
// testdata/poolgen.py's, which knows the lease and keyd's verdict too.
type genLine struct {
	Event string `json:"event"` // ready, call, lease_error, report_error, done
	Gen   string `json:"gen"`
	Lang  string `json:"lang"`
	// A call: its status, the response's responseId, whether it was the
	// worker's long call.
	Worker int    `json:"worker"`
	Status int    `json:"status"`
	Resp   string `json:"resp,omitempty"`
	Long   bool   `json:"long,omitempty"`
	// Python: the lease, keyd's verdict on its report, and times (Unix
	// seconds). Go: Key and Attempts of a failed call.
	Lease       string  `json:"lease,omitempty"`
	Key         string  `json:"key,omitempty"`
	Class       string  `json:"class,omitempty"`
	Dup         bool    `json:"dup,omitempty"`
	ReportTries int     `json:"report_tries,omitempty"`
	GrantNS     int64   `json:"grant_ns,omitempty"`
	TSend       float64 `json:"t_send,omitempty"`
	TDone       float64 `json:"t_done,omitempty"`
	TReported   float64 `json:"t_reported,omitempty"`
	Attempts    int     `json:"attempts,omitempty"`
	// lease_error, report_error: keyd's error code and message.
	Code string `json:"code,omitempty"`
	Err  string `json:"error,omitempty"`

	At time.Time `json:"-"` // when the test read the line
}

// genProc is one generator process.
type genProc struct {
	name, lang string
	cmd        *exec.Cmd
	stdin      io.WriteCloser
	stderr     *testutil.SyncBuffer
	ready      chan struct{}
	done       chan struct{}
	err        error

	mu    sync.Mutex
	lines []genLine
	bad   []string // stdout lines that are not genLines
}

func (g *genProc) send(s string) {
	io.WriteString(g.stdin, s)
}

func (g *genProc) snapshot() []genLine {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.lines)
}

const poolWorkers = 6

func (r *poolRun) startGenerators() {
	t := r.t
	// The Go generator is a program of its own: linking client/gemini
	// (genai and its dependencies) into this test binary would leave
	// their goroutines behind for the leak check.
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	gen := filepath.Join(r.dir, "poolgen")
	built := time.Now()
	if out, err := exec.Command(goTool, "build", "-o", gen, "./poolgen").CombinedOutput(); err != nil {
		t.Fatalf("go build ./poolgen: %v\n%s", err, out)
	}
	r.buildTime = time.Since(built)
	clientDir, err := filepath.Abs(filepath.Join("..", "..", "clients", "python"))
	if err != nil {
		t.Fatal(err)
	}
	common := []string{
		"POOLGEN_SOCKET=" + r.sock,
		"POOLGEN_BASE_URL=" + r.srv.URL,
		"POOLGEN_MODEL=" + poolModel,
		fmt.Sprintf("POOLGEN_WORKERS=%d", poolWorkers),
		"POOLGEN_LONG_PROMPT=" + longPrompt,
		// A worker's first call is the long one only if granted in the
		// first burst: a later one would outlast the run.
		"POOLGEN_LONG_WITHIN=5",
		"POOLGEN_CLIENT_DIR=" + clientDir,
	}
	for i := range 8 {
		lang := []string{"go", "py"}[i%2]
		g := &genProc{name: fmt.Sprintf("%s%d", lang, i/2+1), lang: lang, stderr: &testutil.SyncBuffer{},
			ready: make(chan struct{}), done: make(chan struct{})}
		if lang == "go" {
			g.cmd = exec.Command(gen)
			g.cmd.Env = os.Environ()
		} else {
			g.cmd = exec.Command(r.python, filepath.Join("testdata", "poolgen.py"))
			g.cmd.Env = append(os.Environ(), "PYTHONUNBUFFERED=1")
		}
		g.cmd.Env = append(g.cmd.Env, append(common, "POOLGEN_NAME="+g.name)...)
		g.cmd.Stderr = g.stderr
		if g.stdin, err = g.cmd.StdinPipe(); err != nil {
			t.Fatal(err)
		}
		stdout, err := g.cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := g.cmd.Start(); err != nil {
			t.Fatalf("starting generator %s: %v", g.name, err)
		}
		read := make(chan struct{})
		go func() {
			defer close(read)
			sc := bufio.NewScanner(stdout)
			sc.Buffer(nil, 1<<20)
			for sc.Scan() {
				var l genLine
				if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
					g.mu.Lock()
					g.bad = append(g.bad, sc.Text())
					g.mu.Unlock()
					continue
				}
				l.At = time.Now()
				if l.Event == "ready" {
					close(g.ready)
				}
				g.mu.Lock()
				g.lines = append(g.lines, l)
				g.mu.Unlock()
			}
		}()
		go func() {
			<-read // Wait must not close the pipe before it is read
			g.err = g.cmd.Wait()
			close(g.done)
		}()
		t.Cleanup(func() {
			select {
			case <-g.done:
			default:
				g.cmd.Process.Kill()
				<-g.done
			}
		})
		r.gens = append(r.gens, g)
	}
	for _, g := range r.gens {
		select {
		case <-g.ready:
		case <-g.done:
			t.Fatalf("generator %s exited before it was ready (%v); its stderr:\n%s", g.name, g.err, g.stderr)
		case <-time.After(60 * time.Second):
			t.Fatalf("generator %s not ready after 60 s; its stderr:\n%s", g.name, g.stderr)
		}
	}
}

// stopGenerators closes their stdin and waits for them to finish what
// they leased and exit.
func (r *poolRun) stopGenerators() {
	for _, g := range r.gens {
		g.stdin.Close()
	}
	timeout := time.After(30 * time.Second)
	for _, g := range r.gens {
		select {
		case <-g.done:
			if g.err != nil {
				r.problem("generator %s exited with %v; its stderr:\n%s", g.name, g.err, g.stderr)
			}
		case <-timeout:
			r.problem("generator %s did not stop within 30 s of its stop; its stderr:\n%s", g.name, g.stderr)
		}
	}
}

// check judges the run and prints its figures.
func (r *poolRun) check() {
	t := r.t
	for _, p := range r.problems {
		t.Error(p)
	}
	recs := r.fake.Requests()
	stats := r.fake.Stats()
	final, usage := r.final, r.finalUsage

	secretOf := map[string]string{}
	keyOf := map[string]string{}
	for _, k := range poolKey {
		secretOf[k.id] = poolSecret(k.id)
		keyOf[poolSecret(k.id)] = k.id
	}

	// 1. No request above any provider limit.
	if len(stats.Violations) > 0 {
		t.Errorf("the fake found requests over a limit:\n  %s", strings.Join(stats.Violations, "\n  "))
	}
	var refused []fakegemini.Record
	for _, rec := range recs {
		if rec.Status == 429 {
			refused = append(refused, rec)
		}
	}
	if len(refused) > 0 {
		// keyd's window counts a grant from the moment keyd makes it, the
		// provider's from the moment the request arrives: later by keyd's
		// commit, its answer and the call's own latency (the figures
		// measure them), which differ between a burst and a lone grant.
		t.Errorf("the fake refused %d requests with 429: keyd granted leases the provider's window had no room for yet:\n  %s",
			len(refused), strings.Join(r.explain429(refused, recs), "\n  "))
	}

	// 2. Every request accounted for.
	type perKey struct{ fakeReq, fake2xx, fake429, fakeOther, keydReq, keydOK, keyd429, keydErr, keydUnused int64 }
	counts := map[string]*perKey{}
	for _, k := range poolKey {
		counts[k.id] = &perKey{}
	}
	byResp := map[string]fakegemini.Record{}
	for _, rec := range recs {
		pk := counts[keyOf[rec.Key]]
		if pk == nil || (rec.Method != fakegemini.MethodGenerate && rec.Method != fakegemini.MethodStream) {
			t.Errorf("the fake saw an unexpected request: %+v", rec)
			continue
		}
		pk.fakeReq++
		switch {
		case rec.Status >= 200 && rec.Status < 300:
			pk.fake2xx++
		case rec.Status == 429:
			pk.fake429++
		default:
			pk.fakeOther++
		}
		if rec.Status == 200 {
			byResp[fakeResponseID(rec.Seq)] = rec
		}
	}
	for _, row := range usage.Rows {
		pk := counts[row.KeyID]
		if pk == nil {
			t.Errorf("keyd's usage names an unknown key: %+v", row)
			continue
		}
		pk.keydReq += row.Requests
		pk.keyd429 += row.RateMinute + row.RateDay + row.Other429
		pk.keydErr += row.Errors
		pk.keydUnused += row.Unused
	}
	for id, pk := range counts {
		pk.keydOK = pk.keydReq - pk.keyd429 - pk.keydErr
		if pk.keydReq != pk.fakeReq || pk.keydOK != pk.fake2xx || pk.keyd429 != pk.fake429 || pk.keydErr != pk.fakeOther {
			t.Errorf("key %s: the fake saw %d requests (%d 2xx, %d 429, %d other); keyd counts %d grants used (%d successes, %d 429s, %d errors; %d unused)",
				id, pk.fakeReq, pk.fake2xx, pk.fake429, pk.fakeOther, pk.keydReq, pk.keydOK, pk.keyd429, pk.keydErr, pk.keydUnused)
		}
	}
	if n := keydInFlight(final); n != 0 {
		t.Errorf("%d leases are still open at the end: granted and never reported", n)
	}
	// Each 2xx of the fake reached exactly one generator.
	seen := map[string]string{}
	var genOK, genFail, leaseErrs int
	perGen := map[string][4]int{}                  // calls ok, failed, lease errors, calls ok after the restart
	var pyDelays, pyAnswer, pySend []time.Duration // grant at keyd -> admission at the fake, -> lease in hand, lease in hand -> admission
	var pyLong, goLong, pyLongAcrossKill int
	for _, g := range r.gens {
		g.mu.Lock()
		bad := slices.Clone(g.bad)
		g.mu.Unlock()
		if len(bad) > 0 {
			t.Errorf("generator %s printed lines that are not JSON: %q", g.name, bad)
		}
		if s := g.stderr.String(); strings.Contains(s, "reporting a lease failed") || strings.Contains(s, "Traceback") {
			t.Errorf("generator %s: a report was lost or the generator failed; its stderr:\n%s", g.name, s)
		}
		pg := perGen[g.name]
		for _, l := range g.snapshot() {
			switch l.Event {
			case "call":
			case "lease_error":
				pg[2]++
				leaseErrs++
				if l.Code != "not_running" && l.Code != "transport_error" {
					t.Errorf("generator %s: a lease failed other than by keyd being down: %s: %s", g.name, l.Code, l.Err)
				}
				continue
			case "report_error":
				t.Errorf("generator %s: report of lease %s (key %s, status %d) failed: %s: %s", g.name, l.Lease, l.Key, l.Status, l.Code, l.Err)
				continue
			default:
				continue
			}
			if l.Status != 200 {
				pg[1]++
				genFail++
				// The Go helper retries an invalid key or a 429 under
				// another lease, so only a Python call can end on the
				// invalid key's 400 (or a 429, which the check of 429s
				// above reports).
				if !(l.Lang == "py" && (l.Status == 400 && l.Key == "b3" || l.Status == 429)) {
					t.Errorf("generator %s: a call failed: %+v", g.name, l)
				}
			} else {
				pg[0]++
				genOK++
				if other, dup := seen[l.Resp]; dup || l.Resp == "" {
					t.Errorf("generator %s: response %q also went to %s", g.name, l.Resp, other)
				}
				seen[l.Resp] = g.name
				rec, ok := byResp[l.Resp]
				if !ok {
					t.Errorf("generator %s got response %q, which the fake never answered with 200", g.name, l.Resp)
				} else if l.Lang == "py" {
					if keyOf[rec.Key] != l.Key {
						t.Errorf("generator %s: lease on key %s, but the fake saw key %s", g.name, l.Key, keyOf[rec.Key])
					}
					pyDelays = append(pyDelays, rec.Time.Sub(time.Unix(0, l.GrantNS)))
					pyAnswer = append(pyAnswer, unixFloat(l.TSend).Sub(time.Unix(0, l.GrantNS)))
					pySend = append(pySend, rec.Time.Sub(unixFloat(l.TSend)))
				}
				if l.Long {
					if l.Lang == "py" {
						pyLong++
						if time.Unix(0, l.GrantNS).Before(r.killAt) && unixFloat(l.TReported).After(r.backAt) {
							pyLongAcrossKill++
						}
					} else {
						goLong++
					}
				}
				if l.At.After(r.backAt) {
					pg[3]++
				}
			}
			if l.Lang == "py" {
				want := map[int]string{200: api.ClassSuccess, 400: api.ClassKeyInvalid, 429: api.ClassRateMinute}[l.Status]
				if l.Class != want || (l.Dup && l.ReportTries < 2) {
					t.Errorf("generator %s: lease %s (status %d) reported as %q (duplicate %v after %d tries), want %q",
						g.name, l.Lease, l.Status, l.Class, l.Dup, l.ReportTries, want)
				}
			}
		}
		perGen[g.name] = pg
		if pg[3] == 0 {
			t.Errorf("generator %s made no successful call after the restart", g.name)
		}
	}
	if len(seen) != len(byResp) {
		var lost []string
		for id, rec := range byResp {
			if seen[id] == "" {
				lost = append(lost, fmt.Sprintf("#%d at %.3fs key %s, %d prompt tokens", rec.Seq, rec.Time.Sub(r.goAt).Seconds(), keyOf[rec.Key], rec.PromptTokens))
			}
		}
		slices.Sort(lost)
		t.Errorf("the fake answered %d requests with 200, the generators got %d of them; not:\n  %s", len(byResp), len(seen), strings.Join(lost, "\n  "))
	}

	// 3. The invalid key: disabled at its first 400 and never leased
	// again. keyd cannot know the key is invalid before a report says so,
	// so every lease it granted on it before the first 400 was reported
	// fails too: with 48 callers asking at once that is several. The
	// check is that no grant on it came after keyd disabled it (by keyd's
	// debug log: the grant times that lease ids carry, against the time
	// of "key disabled"), that it stayed disabled across the restart, and
	// that the fake saw it only in the first burst, answered 400.
	var invalid []fakegemini.Record
	for _, rec := range recs {
		if rec.Key == secretOf["b3"] {
			invalid = append(invalid, rec)
			if rec.Status != 400 || !rec.Time.Before(r.killAt) {
				t.Errorf("the invalid key reached the fake at %.3fs, answered %d; want only 400s, before the kill", rec.Time.Sub(r.goAt).Seconds(), rec.Status)
			}
		}
	}
	b3grants, disabledAt := r.invalidKeyLog()
	slices.SortFunc(b3grants, time.Time.Compare)
	switch {
	case disabledAt.IsZero():
		t.Errorf("keyd's log does not say when it disabled b3")
	case len(b3grants) != len(invalid):
		t.Errorf("keyd's log shows %d grants on b3, the fake saw %d requests with it", len(b3grants), len(invalid))
	}
	for _, g := range b3grants {
		// The log's time has millisecond precision.
		if g.After(disabledAt.Add(time.Millisecond)) {
			t.Errorf("keyd granted a lease on b3 at %.3fs, after it disabled b3 at %.3fs", g.Sub(r.goAt).Seconds(), disabledAt.Sub(r.goAt).Seconds())
		}
	}
	for _, st := range []*api.Status{r.beforeKill, r.afterRestart, final} {
		for _, k := range st.Keys {
			if k.KeyID == "b3" && (k.State != api.StateDisabled || !strings.Contains(k.Reason, "API_KEY_INVALID")) {
				t.Errorf("key b3 is %s (%s) in keyd's status; want disabled for API_KEY_INVALID", k.State, k.Reason)
			}
		}
	}

	// 4. Nothing lost across the restart: the windows came back (every
	// bucket as full as before the kill), the long calls open at the
	// kill were reported to the new keyd (the Go ones by client/gemini,
	// which logs a report it could not make: see stderr above).
	after := map[string]api.BucketState{}
	for _, a := range r.afterRestart.Buckets {
		after[a.Project+"/"+a.Model] = a
	}
	for _, b := range r.beforeKill.Buckets {
		a := after[b.Project+"/"+b.Model]
		if a.RPM.Used != b.RPM.Used || a.TPM.Used != b.TPM.Used || a.RPD.Used != b.RPD.Used {
			t.Errorf("bucket %s/%s: rpm %d, tpm %d, rpd %d before the kill; rpm %d, tpm %d, rpd %d after the restart",
				b.Project, b.Model, b.RPM.Used, b.TPM.Used, b.RPD.Used, a.RPM.Used, a.TPM.Used, a.RPD.Used)
		}
	}
	if n := keydInFlight(r.afterRestart); n != len(r.gens) {
		t.Errorf("%d leases open after the restart; want the %d long calls in flight at the kill", n, len(r.gens))
	}
	if pyLong != len(r.gens)/2 || goLong != len(r.gens)/2 || pyLongAcrossKill != pyLong {
		t.Errorf("long calls: %d Python (%d granted before the kill and reported after the restart), %d Go; want %d each, all across the kill",
			pyLong, pyLongAcrossKill, goLong, len(r.gens)/2)
	}

	// 5. Capacity.
	capy := poolCapacity(recs, r.goAt, r.stopAt, map[string][]time.Time{"p2": b3grants})
	if capy.total < 0.90 {
		t.Errorf("the pool's capacity was %.1f%% used; want at least 90%%", 100*capy.total)
	}
	if r.plan.refill && (capy.slots == 0 || capy.steady < 0.90) {
		t.Errorf("the slots freed after the first minute were taken again %v late on average (of %d); that is %.1f%% of the capacity used in a steady state; want at least 90%%",
			capy.refillDelay.Round(time.Millisecond), capy.slots, 100*capy.steady)
	}
	if d := r.stopAt.Sub(r.goAt); d < 20*time.Second {
		t.Errorf("the load ran %v; want at least 20 s", d)
	}

	// The figures.
	var b strings.Builder
	fmt.Fprintf(&b, "pool: %d keys in 3 projects (rpm p1 %d, p2 %d, p3 %d; tpm %d; rpd %d), key b3 invalid; %d generators (4 Go, 4 Python) x %d workers\n",
		len(poolKey), poolRPM["p1"], poolRPM["p2"], poolRPM["p3"], poolTPM, poolRPD, len(r.gens), poolWorkers)
	fmt.Fprintf(&b, "go build ./poolgen: %v\n", r.buildTime.Round(time.Millisecond))
	fmt.Fprintf(&b, "run: %.1fs of load; kill -9 at %.1fs, keyd back after %v (restart gap); stop at %.1fs\n",
		r.stopAt.Sub(r.goAt).Seconds(), r.killAt.Sub(r.goAt).Seconds(), r.backAt.Sub(r.killAt).Round(time.Millisecond), r.stopAt.Sub(r.goAt).Seconds())
	fmt.Fprintf(&b, "fake: %d requests, %d admitted, by status %v; 429s %d; violations %d\n",
		stats.Requests, stats.Admitted, stats.ByStatus, len(refused), len(stats.Violations))
	fmt.Fprintf(&b, "%-4s %-3s %8s %8s %8s %9s %9s %9s\n", "key", "prj", "fake req", "fake 2xx", "fake err", "keyd req", "keyd ok", "keyd err")
	for _, k := range poolKey {
		pk := counts[k.id]
		fmt.Fprintf(&b, "%-4s %-3s %8d %8d %8d %9d %9d %9d\n", k.id, k.project, pk.fakeReq, pk.fake2xx, pk.fakeOther+pk.fake429, pk.keydReq, pk.keydOK, pk.keydErr+pk.keyd429)
	}
	fmt.Fprintf(&b, "generators: %d calls ok, %d failed (Python's calls on the invalid key, and 429s), %d lease errors while keyd was down\n", genOK, genFail, leaseErrs)
	for _, g := range r.gens {
		pg := perGen[g.name]
		fmt.Fprintf(&b, "  %s: %d ok (%d after the restart), %d failed, %d lease errors\n", g.name, pg[0], pg[3], pg[1], pg[2])
	}
	if len(b3grants) > 0 && !disabledAt.IsZero() {
		fmt.Fprintf(&b, "invalid key b3: %d grants, from %.3fs to %.3fs, all before keyd disabled it at %.3fs; the fake saw %d requests with it, all 400\n",
			len(b3grants), b3grants[0].Sub(r.goAt).Seconds(), b3grants[len(b3grants)-1].Sub(r.goAt).Seconds(), disabledAt.Sub(r.goAt).Seconds(), len(invalid))
	}
	fmt.Fprintf(&b, "restart: %d leases open at the kill, reported after it (Python: %d granted before the kill and reported after the restart)\n",
		keydInFlight(r.afterRestart), pyLongAcrossKill)
	for _, bs := range final.Buckets {
		until := ""
		if bs.Until != nil {
			until = fmt.Sprintf(" until %.1fs", bs.Until.Sub(r.goAt).Seconds())
		}
		fmt.Fprintf(&b, "keyd bucket %s/%s at the end: %s%s %s; rpm %d/%d\n", bs.Project, bs.Model, bs.State, until, bs.Reason, bs.RPM.Used, bs.RPM.Limit)
	}
	if n, last := r.cooldowns(); n > 0 {
		fmt.Fprintf(&b, "keyd cooled buckets %d times after 429s; the last: %s\n", n, last)
	}
	fmt.Fprintf(&b, "capacity used: %.1f%% over the run (window fullness, sampled every 100 ms); %.1f%% of the capacity was held in keyd's windows by the invalid key's grants, which the fake never counted\n",
		100*capy.total, 100*capy.held)
	if capy.slots > 0 {
		fmt.Fprintf(&b, "refill: %d slots freed after the first minute, taken again %v late on average (at worst %v): %.1f%% of the capacity in a steady state\n",
			capy.slots, capy.refillDelay.Round(time.Millisecond), capy.maxDelay.Round(time.Millisecond), 100*capy.steady)
	} else {
		fmt.Fprintf(&b, "refill: none in a run this short\n")
	}
	for _, p := range []string{"p1", "p2", "p3"} {
		c := capy.bucket[p]
		tight := "none rpm apart"
		if c.tightest >= 0 {
			tight = fmt.Sprintf("admissions rpm apart at least %.3fs apart", c.tightest.Seconds())
		}
		fmt.Fprintf(&b, "  %s: rpm %d: %d admitted in %.1fs (at most %d in any interval this long); window %.1f%% full; %s\n",
			p, poolRPM[p], c.admitted, r.stopAt.Sub(r.goAt).Seconds(), c.bound, 100*c.used, tight)
	}
	fmt.Fprintf(&b, "grant at keyd (the time keyd's window counts) to admission at the fake, Python calls: %s\n", durStats(pyDelays))
	fmt.Fprintf(&b, "  of which grant to lease in the generator's hand (keyd's commit, the answer): %s\n", durStats(pyAnswer))
	fmt.Fprintf(&b, "  and lease in hand to admission (the HTTP call): %s\n", durStats(pySend))
	t.Logf("figures:\n%s", b.String())
}

// invalidKeyLog reads keyd's debug log for the grants on b3 (their
// times, from the lease ids) and the time keyd disabled it.
func (r *poolRun) invalidKeyLog() (grants []time.Time, disabledAt time.Time) {
	granted := regexp.MustCompile(`msg="lease granted" lease=l([0-9a-f]{16})[0-9a-f]{16} key=b3 `)
	disabled := regexp.MustCompile(`time=(\S+) level=INFO msg="key disabled" key=b3 `)
	for _, log := range r.keydLogs {
		for _, line := range strings.Split(log.String(), "\n") {
			if m := granted.FindStringSubmatch(line); m != nil {
				ns, _ := strconv.ParseUint(m[1], 16, 64)
				grants = append(grants, time.Unix(0, int64(ns)))
			}
			if m := disabled.FindStringSubmatch(line); m != nil && disabledAt.IsZero() {
				disabledAt, _ = time.Parse(time.RFC3339Nano, m[1])
			}
		}
	}
	return grants, disabledAt
}

// cooldowns counts keyd's "bucket cooling" log lines and returns the last.
func (r *poolRun) cooldowns() (n int, last string) {
	for _, log := range r.keydLogs {
		for _, line := range strings.Split(log.String(), "\n") {
			if strings.Contains(line, `msg="bucket cooling"`) {
				n++
				last = line
			}
		}
	}
	return n, last
}

// durStats summarizes ds: count, min, median, p99, max.
func durStats(ds []time.Duration) string {
	if len(ds) == 0 {
		return "none"
	}
	ds = slices.Clone(ds)
	slices.Sort(ds)
	q := func(f float64) time.Duration { return ds[int(f*float64(len(ds)-1))].Round(time.Microsecond) }
	return fmt.Sprintf("%d: min %v, median %v, p99 %v, max %v", len(ds), q(0), q(0.5), q(0.99), q(1))
}

func unixFloat(s float64) time.Time { return time.Unix(0, int64(s*1e9)) }

// usage returns keyd's whole usage history.
func (r *poolRun) usage() *api.UsageResponse {
	c := client.New(r.sock)
	defer c.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	u, err := c.Usage(ctx, r.goAt.Add(-3*time.Hour), "")
	if err != nil {
		r.t.Fatalf("keyd usage: %v", err)
	}
	return u
}

// explain429 describes each 429 of the fake: its bucket, when, and how
// far inside the window the admission it collided with was.
func (r *poolRun) explain429(refused, recs []fakegemini.Record) []string {
	adm := admittedByProject(recs)
	var out []string
	for _, rec := range refused {
		ts := adm[rec.Project]
		lo := sort.Search(len(ts), func(i int) bool { return ts[i].After(rec.Time.Add(-fakegemini.Window)) })
		edge := "-"
		if lo < len(ts) {
			edge = (fakegemini.Window - rec.Time.Sub(ts[lo])).String()
		}
		out = append(out, fmt.Sprintf("%s at %.3fs (%v): the oldest admission in its window left it %s later; quota %v, retry %v",
			rec.Project, rec.Time.Sub(r.goAt).Seconds(), rec.Time.Format("15:04:05.000"), edge, rec.Quota, rec.RetryDelay))
	}
	return out
}

// fakeResponseID is the fake's responseId of request seq (as
// fakegemini's responseID).
func fakeResponseID(seq int) string {
	sum := sha256.Sum256([]byte("fakegemini-response-" + strconv.Itoa(seq)))
	return base64.RawURLEncoding.EncodeToString(sum[:])[:23]
}

// poolUse is the capacity used of the pool and of each bucket.
type poolUse struct {
	total float64
	// slots is how many admissions left the window before the end; each
	// frees a slot. refillDelay is the mean time until the slot was taken
	// again (to the end of the run if it was not), maxDelay the longest,
	// and steady 1 - refillDelay/60s: the capacity used by a keyd that
	// takes freed slots that late, in a steady state.
	slots                 int
	refillDelay, maxDelay time.Duration
	steady                float64
	// held is the share of the capacity that keyd's windows held for
	// grants the fake never counted: the invalid key's.
	held   float64
	bucket map[string]bucketUse
}

type bucketUse struct {
	used     float64       // mean window fullness
	admitted int           // admissions from go to stop
	bound    int           // the most any interval of that length can admit
	tightest time.Duration // smallest gap between admissions rpm apart
}

// poolCapacity measures how much of the pool's capacity the run used,
// from the fake's record alone.
//
// A bucket's capacity is its RPM in every sliding 60 s window, so its
// use at an instant u is how full its window is: the requests the fake
// admitted in (u-60s, u] over RPM. That is 1 exactly when nothing more
// could have been admitted at u, and below 1 only when the bucket had
// room and the demand (which always exceeds capacity here) was not
// served: the unused capacity. The pool's use is the mean of it over the
// run, sampled every 100 ms from go to stop, the buckets weighed by their
// RPM.
//
// After the first minute the question is another: does keyd take again
// the slots that free as the first grants leave the window, and how
// soon? Admission i+RPM of a saturated bucket takes the slot admission i
// frees 60 s after it; its lateness, a[i+RPM] - (a[i] + 60 s), is
// capacity lost (a slot never taken again is late until the end). The
// mean lateness over the slots freed before the end measures the refill
// independently of how long the run goes on after it: a keyd whose
// freed slots wait L on average uses 1 - L/60s of the capacity in a
// steady state. A window fullness averaged over the few seconds after
// the refill would charge the whole minute's lateness to those seconds.
//
// The restart: the kill comes when every window is full and no grant
// leaves it before the restart, so the downtime costs no capacity; had
// it cost some, the windows would show it (nothing is excluded). The
// invalid key's grant counts in keyd's window but not in the fake's
// (which counts no request it refused): keyd does not refund a grant
// whose key proved invalid, so each one keeps a slot of p2 from use for
// a minute. That loss is counted, and shown apart as held.
//
// It also returns, per bucket, the admissions against the most an
// interval as long as the run can hold (RPM times the number of 60 s
// windows it spans) and the tightest spacing of admissions RPM apart,
// which the limit requires to be over 60 s: the margin keyd left.
func poolCapacity(recs []fakegemini.Record, from, to time.Time, held map[string][]time.Time) poolUse {
	adm := admittedByProject(recs)
	out := poolUse{bucket: map[string]bucketUse{}}
	var sumAll, capAll, sumHeld float64
	var sumLate time.Duration
	for p, rpm := range poolRPM {
		ts := adm[p]
		var sum, n float64
		for u := from; !u.After(to); u = u.Add(100 * time.Millisecond) {
			c := float64(inWindow(ts, u))
			sumHeld += float64(min(inWindow(held[p], u), rpm-int(c)))
			sum += c
			n++
			sumAll += c
			capAll += float64(rpm)
		}
		bu := bucketUse{tightest: -1}
		if n > 0 {
			bu.used = sum / (n * float64(rpm))
		}
		for _, x := range ts {
			if !x.Before(from) && !x.After(to) {
				bu.admitted++
			}
		}
		windows := int((to.Sub(from) + fakegemini.Window - 1) / fakegemini.Window)
		bu.bound = rpm * windows
		for i := 0; i+rpm < len(ts); i++ {
			if d := ts[i+rpm].Sub(ts[i]); bu.tightest < 0 || d < bu.tightest {
				bu.tightest = d
			}
		}
		for i, a := range ts {
			freed := a.Add(fakegemini.Window)
			if a.Before(from) || !freed.Before(to) {
				continue
			}
			late := to.Sub(freed)
			if i+rpm < len(ts) && ts[i+rpm].Before(to) {
				late = ts[i+rpm].Sub(freed)
			}
			out.slots++
			sumLate += late
			out.maxDelay = max(out.maxDelay, late)
		}
		out.bucket[p] = bu
	}
	if capAll > 0 {
		out.total = sumAll / capAll
		out.held = sumHeld / capAll
	}
	if out.slots > 0 {
		out.refillDelay = sumLate / time.Duration(out.slots)
		out.steady = 1 - float64(out.refillDelay)/float64(fakegemini.Window)
	}
	return out
}
