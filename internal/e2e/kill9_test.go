package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/client"
)

// kill9Keys is a config no load in this test can exhaust: 3 keys in 2
// projects, so 2 buckets.
const kill9Keys = `{"keys": [
  {"key_id": "k1", "project": "p1", "model_name": "m", "rpm": 100000, "tpm": 1000000000},
  {"key_id": "k2", "project": "p1", "model_name": "m", "rpm": 100000, "tpm": 1000000000},
  {"key_id": "k3", "project": "p2", "model_name": "m", "rpm": 100000, "tpm": 1000000000}
]}
`

const kill9Env = `GEMINI_KEY_k1=AIzaFAKE-kill9-k1-0001
GEMINI_KEY_k2=AIzaFAKE-kill9-k2-0002
GEMINI_KEY_k3=AIzaFAKE-kill9-k3-0003
`

// ledger is what keyd acknowledged to the load generator: the leases it
// granted and the reports it answered, across every round.
type ledger struct {
	mu sync.Mutex
	// leases acknowledged (a lease response was received).
	leases map[string]bool
	// reports answered, with the classification keyd gave.
	reported map[string]string
	// reports sent whose answer never came: their fate is unknown.
	unsure map[string]bool
	// lease requests sent, answered or not: an upper bound on grants.
	attempts int
}

// TestKill9LosesNothing runs concurrent lease+report load against a real
// keyd, kills it with SIGKILL mid-flight, restarts it on the same state
// dir and socket, and checks that nothing it acknowledged was lost: every
// granted lease is still reportable, every report is remembered with its
// classification, and every grant still counts against its bucket.
func TestKill9LosesNothing(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "keys.json")
	env := filepath.Join(dir, "keyd.env")
	state := filepath.Join(dir, "state")
	writeFile(t, cfg, kill9Keys)
	writeFile(t, env, kill9Env)
	sock := filepath.Join(shortTempDir(t, "k9"), "s.sock")
	args := []string{"--config", cfg, "--env-file", env, "--state-dir", state}

	start := time.Now()
	led := &ledger{leases: map[string]bool{}, reported: map[string]string{}, unsure: map[string]bool{}}
	k := startKeyd(t, sock, args...)
	// Kill at three different moments of the load.
	for round, after := range []time.Duration{300 * time.Millisecond, 550 * time.Millisecond, 800 * time.Millisecond} {
		n0 := len(led.leases)
		load(t, k, led, after)
		if _, err := os.Lstat(sock); err != nil {
			t.Fatalf("round %d: after kill -9 the socket file should be left behind: %v", round, err)
		}
		k = startKeyd(t, sock, args...) // replaces the stale socket
		t.Logf("round %d: killed after %v: %d leases acknowledged (%d in all), %d reports, %d unsure",
			round, after, len(led.leases)-n0, len(led.leases), len(led.reported), len(led.unsure))
		if len(led.leases) == n0 {
			t.Fatalf("round %d: no lease was granted before the kill; keyd's log:\n%s", round, k.log)
		}
		verify(t, sock, led, round)
	}
	k.stop()
	if d := time.Since(start); d > time.Minute-5*time.Second {
		// (c) compares against a 60 s window: beyond it, old grants age out.
		t.Fatalf("the test took %v: too close to the 60 s rpm window for check (c) to mean anything", d)
	}
}

// load runs 16 workers taking leases and reporting every other one until
// keyd dies, and kills keyd with SIGKILL after the given time, while
// requests are in flight.
func load(t *testing.T, k *keydProc, led *ledger, after time.Duration) {
	t.Helper()
	c := client.New(k.sock)
	defer c.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var inFlight atomic.Int64 // requests sent and not yet answered
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Go(func() {
			for i := 0; ; i++ {
				led.mu.Lock()
				led.attempts++
				led.mu.Unlock()
				inFlight.Add(1)
				l, err := c.Lease(ctx, api.LeaseRequest{Model: "m", Tokens: 10, Client: fmt.Sprintf("kill9-w%d", w)})
				inFlight.Add(-1)
				if err != nil {
					return // keyd is gone (or the test timed out: verify says so)
				}
				led.mu.Lock()
				led.leases[l.LeaseID] = true
				led.mu.Unlock()
				if i%2 == 1 {
					continue
				}
				led.mu.Lock()
				led.unsure[l.LeaseID] = true
				led.mu.Unlock()
				inFlight.Add(1)
				r, err := c.Report(ctx, l.LeaseID, api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: 7, OutputTokens: 3, TotalTokens: 10}})
				inFlight.Add(-1)
				if err != nil {
					return
				}
				led.mu.Lock()
				delete(led.unsure, l.LeaseID)
				led.reported[l.LeaseID] = r.Classification
				led.mu.Unlock()
			}
		})
	}
	time.Sleep(after) // the load runs this long: the moment of the kill
	n := inFlight.Load()
	k.kill9()
	wg.Wait()
	if ctx.Err() != nil {
		t.Fatalf("the load outlived its 20 s bound")
	}
	t.Logf("kill -9 with about %d requests in flight", n)
}

// rpmUsed is the sum of every bucket's rpm use, from keyd's status.
func rpmUsed(t *testing.T, ctx context.Context, c *client.Client, round int) int64 {
	t.Helper()
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatalf("round %d: status: %v", round, err)
	}
	var used int64
	for _, b := range st.Buckets {
		used += b.RPM.Used
	}
	return used
}

// verify checks, against the restarted keyd, that everything in led
// survived, and brings led up to date: after it, every lease is reported.
func verify(t *testing.T, sock string, led *ledger, round int) {
	t.Helper()
	c := client.New(sock)
	defer c.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// (c) every acknowledged grant still counts: the test is shorter than
	// the 60 s window, so all of them are in it. And nothing counts twice:
	// no more than were asked for.
	used := rpmUsed(t, ctx, c, round)
	if used < int64(len(led.leases)) || used > int64(led.attempts) {
		t.Errorf("round %d: rpm used over all buckets is %d after the restart; want between the %d acknowledged grants and the %d requests",
			round, used, len(led.leases), led.attempts)
	}

	type job struct {
		id    string
		class string // "" for a lease never reported
		state string // "unreported", "reported", "unsure"
	}
	var jobs []job
	for id := range led.leases {
		switch class, ok := led.reported[id]; {
		case ok:
			jobs = append(jobs, job{id, class, "reported"})
		case led.unsure[id]:
			jobs = append(jobs, job{id, "", "unsure"})
		default:
			jobs = append(jobs, job{id, "", "unreported"})
		}
	}
	ch := make(chan job)
	var mu sync.Mutex
	var failures []string
	fail := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		failures = append(failures, fmt.Sprintf(format, args...))
	}
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for j := range ch {
				r, err := c.Report(ctx, j.id, api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: 7, OutputTokens: 3, TotalTokens: 10}})
				var ae *api.Error
				switch {
				case errors.As(err, &ae) && ae.Code == api.CodeNotFound:
					fail("%s lease %s was acknowledged but keyd lost it: %v", j.state, j.id, err)
					continue
				case err != nil:
					fail("%s lease %s: report: %v", j.state, j.id, err)
					continue
				}
				switch j.state {
				case "unreported": // (a) the report is the first
					if r.Duplicate || r.Classification != api.ClassSuccess {
						fail("lease %s, acknowledged and never reported, answers %+v; want a first report classified success", j.id, r)
					}
				case "reported": // (b) acknowledged reports are remembered
					if !r.Duplicate || r.Classification != j.class {
						fail("lease %s, whose report was acknowledged as %s, answers %+v to a repeat; want duplicate with the same classification", j.id, j.class, r)
					}
				case "unsure": // either is right; lost is not (checked above)
					if r.Classification != api.ClassSuccess {
						fail("lease %s, reported as success before the kill, answers %+v", j.id, r)
					}
				}
				mu.Lock()
				led.mu.Lock()
				led.reported[j.id] = r.Classification
				delete(led.unsure, j.id)
				led.mu.Unlock()
				mu.Unlock()
			}
		})
	}
	for _, j := range jobs {
		ch <- j
	}
	close(ch)
	wg.Wait()
	for i, f := range failures {
		if i == 20 {
			t.Errorf("round %d: and %d more", round, len(failures)-i)
			break
		}
		t.Errorf("round %d: %s", round, f)
	}
	if len(failures) > 0 {
		t.FailNow()
	}
}
