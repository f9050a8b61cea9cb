package e2e

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/client"
)

// shutdownKeys is kill9Keys plus a bucket whose one request a minute is
// taken first, so that lease requests on model "slow" wait.
const shutdownKeys = `{"keys": [
  {"key_id": "k1", "project": "p1", "model_name": "m", "rpm": 100000, "tpm": 1000000000},
  {"key_id": "k2", "project": "p1", "model_name": "m", "rpm": 100000, "tpm": 1000000000},
  {"key_id": "k3", "project": "p2", "model_name": "m", "rpm": 100000, "tpm": 1000000000},
  {"key_id": "w", "project": "pw", "model_name": "slow", "rpm": 1, "tpm": 1000000}
]}
`

// TestSigtermDuringLoadLosesNothing is TestKill9LosesNothing with the
// signals systemd and a terminal send: SIGTERM, then SIGINT. keyd must
// stop accepting, answer every request it took (a waiting lease request
// gets shutting_down, not a dropped connection), commit, close the store
// and remove its socket; after a restart everything it acknowledged is
// there. Graceful means exact: every grant keyd made reached its caller,
// and no report whose answer was lost was applied.
func TestSigtermDuringLoadLosesNothing(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "keys.json")
	env := filepath.Join(dir, "keyd.env")
	writeFile(t, cfg, shutdownKeys)
	writeFile(t, env, kill9Env+"GEMINI_KEY_w=AIzaFAKE-sigterm-w\n")
	sock := filepath.Join(shortTempDir(t, "kst"), "s.sock")
	args := []string{"--config", cfg, "--env-file", env, "--state-dir", filepath.Join(dir, "state")}

	start := time.Now()
	led := &ledger{leases: map[string]bool{}, reported: map[string]string{}, unsure: map[string]bool{}}
	k := startKeyd(t, sock, args...)
	// The one grant of bucket pw/slow's minute; it outlives the restarts
	// (the window comes back from the store), so "slow" waits every round.
	c := client.New(sock)
	l, err := c.Lease(context.Background(), api.LeaseRequest{Model: "slow"})
	c.CloseIdleConnections()
	if err != nil {
		t.Fatal(err)
	}
	led.attempts++
	led.leases[l.LeaseID] = true

	for round, sig := range []os.Signal{syscall.SIGTERM, syscall.SIGINT} {
		n0 := len(led.leases)
		stopUnderLoad(t, k, led, sig, 400*time.Millisecond)
		if _, err := os.Lstat(sock); !os.IsNotExist(err) {
			t.Errorf("round %d: after %v the socket %s is still there (%v)", round, sig, sock, err)
		}
		k = startKeyd(t, sock, args...)
		t.Logf("round %d: %v after 400ms: %d leases acknowledged (%d in all), %d reports, %d unsure",
			round, sig, len(led.leases)-n0, len(led.leases), len(led.reported), len(led.unsure))
		if len(led.leases) == n0 {
			t.Fatalf("round %d: no lease was granted before %v; keyd's log:\n%s", round, sig, k.log)
		}
		exact(t, sock, led, round)
		verify(t, sock, led, round) // as after kill -9: nothing acknowledged lost
	}
	k.stop()
	if d := time.Since(start); d > time.Minute-5*time.Second {
		t.Fatalf("the test took %v: too close to the 60 s rpm window for the counts to mean anything", d)
	}
}

// stopUnderLoad starts waiters on model "slow" and 16 workers taking and
// reporting leases on "m", sends keyd sig after the given time, and checks
// what every request got: an answer, or a clean refusal.
func stopUnderLoad(t *testing.T, k *keydProc, led *ledger, sig os.Signal, after time.Duration) {
	t.Helper()
	c := client.New(k.sock)
	defer c.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	var mu sync.Mutex
	var bad []string // answers a clean shutdown must not give
	dropped := 0     // requests that got no answer (sent as keyd closed)
	failf := func(format string, args ...any) {
		mu.Lock()
		bad = append(bad, fmt.Sprintf(format, args...))
		mu.Unlock()
	}
	// ended classifies the error that ends a worker: shutting_down, or no
	// keyd to connect to, or no answer at all: net/http's Shutdown closes
	// a kept-alive connection whose next request arrives once it has
	// begun, without calling keyd (the client sees EOF). exact checks
	// that such a request was never applied.
	ended := func(what string, err error) {
		var ae *api.Error
		switch {
		case errors.As(err, &ae) && ae.Code == api.CodeShuttingDown && ae.HTTPStatus == http.StatusServiceUnavailable:
		case errors.Is(err, client.ErrNotRunning):
		case errors.As(err, &ae):
			failf("%s: keyd answered %v (%s), not shutting_down", what, err, ae.Code)
		default:
			mu.Lock()
			dropped++
			mu.Unlock()
		}
	}

	// Waiters: each request waits in keyd for capacity that will not come
	// before keyd stops. Each must get shutting_down.
	const waiters = 6
	waitErrs := make(chan error, waiters)
	for range waiters {
		go func() {
			_, err := c.Lease(ctx, api.LeaseRequest{Model: "slow", WaitMS: 30000, Client: "sigterm-waiter"})
			waitErrs <- err
		}()
	}
	time.Sleep(100 * time.Millisecond) // they reach keyd and wait

	var wg sync.WaitGroup
	for w := range 16 {
		wg.Go(func() {
			for i := 0; ; i++ {
				led.mu.Lock()
				led.attempts++
				led.mu.Unlock()
				l, err := c.Lease(ctx, api.LeaseRequest{Model: "m", Tokens: 10, Client: fmt.Sprintf("sigterm-w%d", w)})
				if err != nil {
					ended("lease", err)
					return
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
				r, err := c.Report(ctx, l.LeaseID, api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: 7, OutputTokens: 3, TotalTokens: 10}})
				if err != nil {
					ended("report "+l.LeaseID, err)
					return
				}
				led.mu.Lock()
				delete(led.unsure, l.LeaseID)
				led.reported[l.LeaseID] = r.Classification
				led.mu.Unlock()
			}
		})
	}
	time.Sleep(after)
	sent := time.Now()
	if err := k.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("sending %v: %v", sig, err)
	}
	for range waiters {
		err := <-waitErrs
		var ae *api.Error
		if !errors.As(err, &ae) || ae.Code != api.CodeShuttingDown || ae.HTTPStatus != http.StatusServiceUnavailable {
			failf("a lease request waiting at %v got %v; want 503 shutting_down", sig, err)
		}
	}
	wg.Wait()
	select {
	case <-k.done:
	case <-time.After(15 * time.Second):
		t.Fatalf("keyd did not stop within 15 s of %v; its log:\n%s", sig, k.log)
	}
	t.Logf("%v: keyd stopped %v after the signal; %d requests sent as it closed got no answer",
		sig, time.Since(sent).Round(time.Millisecond), dropped)
	if ctx.Err() != nil {
		t.Fatalf("the load outlived its 20 s bound")
	}
	if k.err != nil {
		t.Errorf("keyd exited with %v after %v", k.err, sig)
	}
	log := k.log.String()
	if !strings.Contains(log, `msg="keyd stopped"`) || strings.Contains(log, "were cut") || strings.Contains(log, "level=ERROR") {
		t.Errorf("keyd's log after %v: want a clean stop, nothing cut, no error:\n%s", sig, log)
	}
	for _, b := range bad {
		t.Error(b)
	}
}

// exact checks what only a clean stop guarantees, against the restarted
// keyd: every grant keyd made was acknowledged to its caller (the buckets
// count exactly the acknowledged leases), and a report whose answer was
// lost was never applied. It then files those reports as answered.
func exact(t *testing.T, sock string, led *ledger, round int) {
	t.Helper()
	c := client.New(sock)
	defer c.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	used := rpmUsed(t, ctx, c, round)
	if used != int64(len(led.leases)) {
		t.Errorf("round %d: the buckets count %d grants after the restart; %d were acknowledged: %d granted leases never reached their caller",
			round, used, len(led.leases), used-int64(len(led.leases)))
	}
	for id := range led.unsure {
		r, err := c.Report(ctx, id, api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: 7, OutputTokens: 3, TotalTokens: 10}})
		if err != nil {
			t.Errorf("round %d: lease %s: report: %v", round, id, err)
			continue
		}
		if r.Duplicate {
			t.Errorf("round %d: the report of lease %s was applied but its answer never reached the caller", round, id)
		}
		delete(led.unsure, id)
		led.reported[id] = r.Classification
	}
}
