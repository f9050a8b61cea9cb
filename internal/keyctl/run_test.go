package keyctl

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	runSecret    = "AIzaRUN-secret-never-printed-by-keyctl-0042"
	runLeaseJSON = `{"lease_id":"L-1","key_id":"flash_01","project":"proj-a","model":"gemini-2.5-flash",
 "secret":"` + runSecret + `","tokens":1500,"expires_at":"2026-11-29T10:10:00Z"}`
	runReportOK = `{"lease_id":"L-1","key_id":"flash_01","classification":"success"}`
)

// runFake is a keyd stand-in that grants L-1 and takes its report.
func runFake(t *testing.T) *fake {
	t.Helper()
	f := newFake(t)
	f.on("POST", "/v1/leases", 200, runLeaseJSON)
	f.on("POST", "/v1/leases/L-1/report", 200, runReportOK)
	return f
}

// reportBodies are the report bodies the fake received.
func (f *fake) reportBodies() []string {
	var out []string
	for _, r := range f.requests() {
		if strings.HasSuffix(r.path, "/report") {
			out = append(out, r.body)
		}
	}
	return out
}

func (f *fake) leaseRequests() []request {
	var out []request
	for _, r := range f.requests() {
		if r.path == "/v1/leases" {
			out = append(out, r)
		}
	}
	return out
}

func noSecret(t *testing.T, r result) {
	t.Helper()
	lacks(t, "keyctl's stdout", r.stdout, runSecret)
	lacks(t, "keyctl's stderr", r.stderr, runSecret)
}

func TestRunExitStatus(t *testing.T) {
	f := runFake(t)
	r := keyctl(t, nil, "", "--socket", f.sock, "run", "--model", "gemini-2.5-flash", "--tokens", "1500", "--wait", "2s",
		"--workload", "light", "--", "sh", "-c", "exit 7").want(t, 7)
	if r.stdout != "" || r.stderr != "" {
		t.Errorf("stdout %q, stderr %q", r.stdout, r.stderr)
	}
	lr := f.leaseRequests()
	if len(lr) != 1 {
		t.Fatalf("lease requests %v", lr)
	}
	sameJSON(t, lr[0].body, `{"model":"gemini-2.5-flash","tokens":1500,"workload_type":"light","wait_ms":2000,"client":"keyctl-run:sh"}`)
	reps := f.reportBodies()
	if len(reps) != 1 {
		t.Fatalf("reports %v", reps)
	}
	sameJSON(t, reps[0], `{"status":0}`)

	// Exit 0 is a success; no "--" needed, CMD's flags stay CMD's.
	r = keyctl(t, nil, "", "--socket", f.sock, "run", "--model", "m", "--client", "batch", "sh", "-c", "exit 0").want(t, 0)
	if r.stdout != "" || r.stderr != "" {
		t.Errorf("stdout %q, stderr %q", r.stdout, r.stderr)
	}
	reps = f.reportBodies()
	sameJSON(t, reps[len(reps)-1], `{"status":200}`)
	lr = f.leaseRequests()
	sameJSON(t, lr[len(lr)-1].body, `{"model":"m","client":"batch"}`)

	// Killed by a signal: 128+N, reported as a network error.
	keyctl(t, nil, "", "--socket", f.sock, "run", "--model", "m", "--", "sh", "-c", "kill -KILL $$").want(t, 128+9)
	reps = f.reportBodies()
	sameJSON(t, reps[len(reps)-1], `{"status":0}`)
}

func TestRunEnvironment(t *testing.T) {
	f := runFake(t)
	t.Setenv("GOOGLE_API_KEY", "stale-key")
	t.Setenv("KEYD_LEASE_ID", "stale-lease")
	t.Setenv("RUN_TEST_KEEP", "kept")
	script := `printf '%s|%s|%s|%s|%s|%s|%s' "$GEMINI_API_KEY" "$GOOGLE_API_KEY" "$KEYD_LEASE_ID" "$KEYD_KEY_ID" "$KEYD_MODEL" "$KEYD_SOCKET" "$RUN_TEST_KEEP"`
	r := keyctl(t, nil, "", "--socket", f.sock, "run", "--model", "gemini-2.5-flash", "--", "sh", "-c", script).want(t, 0)
	want := strings.Join([]string{runSecret, runSecret, "L-1", "flash_01", "gemini-2.5-flash", f.sock, "kept"}, "|")
	if r.stdout != want {
		t.Errorf("CMD printed %q, want %q", r.stdout, want)
	}
	if r.stderr != "" {
		t.Errorf("stderr %q", r.stderr)
	}

	// stdin is CMD's; keyctl itself never prints the secret.
	r = keyctl(t, nil, "from stdin\n", "--socket", f.sock, "run", "--model", "m", "--", "sh", "-c", "cat; test -n \"$GEMINI_API_KEY\"").want(t, 0)
	if r.stdout != "from stdin\n" {
		t.Errorf("stdout %q", r.stdout)
	}
	noSecret(t, r)
	r = keyctl(t, nil, "", "--socket", f.sock, "run", "--model", "m", "--", "sh", "-c", "exit 5").want(t, 5)
	noSecret(t, r)
}

func TestRunCannotStart(t *testing.T) {
	f := runFake(t)
	// Not found: no lease is taken.
	r := keyctl(t, nil, "", "--socket", f.sock, "run", "--model", "m", "--", "/nonexistent/gen.py", "-x").want(t, 127)
	contains(t, "stderr", r.stderr, "keyctl: run: ", "/nonexistent/gen.py")
	if n := len(f.requests()); n != 0 {
		t.Errorf("%d requests to keyd", n)
	}

	// Found but not runnable: leased, then reported unused.
	bad := filepath.Join(t.TempDir(), "gen")
	if err := os.WriteFile(bad, []byte{0x7f, 0, 1, 2, 3, 0xfe}, 0o755); err != nil {
		t.Fatal(err)
	}
	r = keyctl(t, nil, "", "--socket", f.sock, "run", "--model", "m", "--", bad).want(t, 127)
	contains(t, "stderr", r.stderr, "keyctl: run: ")
	noSecret(t, r)
	reps := f.reportBodies()
	if len(reps) != 1 {
		t.Fatalf("reports %v", reps)
	}
	sameJSON(t, reps[0], `{"outcome":"unused","status":0}`)
}

func TestRunNoCapacity(t *testing.T) {
	f := newFake(t)
	f.on("POST", "/v1/leases", 429, `{"error":{"code":"no_capacity","message":"no key for m has capacity: 2 cooling","retry_after_ms":2500}}`)
	marker := filepath.Join(t.TempDir(), "ran")
	r := keyctl(t, nil, "", "--socket", f.sock, "run", "--model", "m", "--", "touch", marker).want(t, exitNoCapacity)
	if r.stderr != "keyctl: no key for m has capacity: 2 cooling (retry in 3s)\n" {
		t.Errorf("stderr %q", r.stderr)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Error("CMD ran without a lease")
	}
}

func TestRunReportOutcomes(t *testing.T) {
	// CMD reported the lease itself: keyctl's report is a duplicate, silently.
	f := newFake(t)
	f.on("POST", "/v1/leases", 200, runLeaseJSON)
	f.on("POST", "/v1/leases/L-1/report", 200, `{"lease_id":"L-1","key_id":"flash_01","classification":"rate_minute","duplicate":true}`)
	r := keyctl(t, nil, "", "--socket", f.sock, "run", "--model", "m", "--", "sh", "-c", "exit 1").want(t, 1)
	if r.stderr != "" || r.stdout != "" {
		t.Errorf("stdout %q, stderr %q", r.stdout, r.stderr)
	}

	// The report fails (the lease expired meanwhile): a warning, and CMD's code.
	f.on("POST", "/v1/leases/L-1/report", 404, `{"error":{"code":"not_found","message":"lease L-1 is unknown: it was never granted, or expired over 1h ago"}}`)
	r = keyctl(t, nil, "", "--socket", f.sock, "run", "--model", "m", "--", "sh", "-c", "exit 0").want(t, 0)
	if r.stderr != "keyctl: warning: reporting lease L-1: lease L-1 is unknown: it was never granted, or expired over 1h ago\n" {
		t.Errorf("stderr %q", r.stderr)
	}
}

func TestRunUsage(t *testing.T) {
	f := runFake(t)
	for _, args := range [][]string{
		{"run", "--model", "m"},
		{"run", "--model", "m", "--"},
		{"run", "sh", "-c", "true"},
		{"run", "--model", "m", "--tokens", "-5", "true"},
		{"run", "--model", "m", "--wait", "11m", "true"},
		{"run", "--bogus", "--model", "m", "true"},
	} {
		r := keyctl(t, nil, "", append([]string{"--socket", f.sock}, args...)...)
		if r.code != exitUsage || !strings.Contains(r.stderr, "usage: keyctl run") {
			t.Errorf("keyctl %q: exit %d, stderr %q", args, r.code, r.stderr)
		}
	}
	if n := len(f.requests()); n != 0 {
		t.Errorf("usage errors reached keyd: %d requests", n)
	}
	r := keyctl(t, nil, "", "run", "--help").want(t, 0)
	contains(t, "run --help", r.stdout, "--model M", "--tokens N", "--wait D", "--workload W", "GEMINI_API_KEY", "KEYD_LEASE_ID", "KEYD_KEY_ID", "KEYD_MODEL", "status 200", "128+N")
}

// runAsync runs keyctl with args in the background, with signals from
// the returned channel instead of the process's.
type asyncRun struct {
	sigs chan<- os.Signal
	done chan result
}

func startRun(t *testing.T, args ...string) *asyncRun {
	t.Helper()
	captured := make(chan chan<- os.Signal, 1)
	oldNotify, oldStop := notifySignals, stopSignals
	notifySignals = func(c chan<- os.Signal) { captured <- c }
	stopSignals = func(chan<- os.Signal) {}
	t.Cleanup(func() { notifySignals, stopSignals = oldNotify, oldStop })
	a := &asyncRun{done: make(chan result, 1)}
	go func() {
		var out, errOut syncWriter
		e := &env{stdin: strings.NewReader(""), stdout: &out, stderr: &errOut,
			getenv: func(string) string { return "" }, now: func() time.Time { return now }, loc: time.UTC}
		code := run(context.Background(), e, args)
		a.done <- result{code, out.String(), errOut.String()}
	}()
	select {
	case a.sigs = <-captured:
	case r := <-a.done:
		t.Fatalf("keyctl ended before listening for signals: %+v", r)
	}
	return a
}

func (a *asyncRun) wait(t *testing.T) result {
	t.Helper()
	select {
	case r := <-a.done:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("keyctl run did not end")
	}
	return result{}
}

type syncWriter struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *syncWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *syncWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// waitFile waits for CMD to create path.
func waitFile(t *testing.T, path string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return
		}
	}
	t.Fatalf("%s never appeared", path)
}

func TestRunForwardsSignals(t *testing.T) {
	f := runFake(t)
	dir := t.TempDir()
	ready := filepath.Join(dir, "ready")
	script := `trap 'exit 42' TERM; trap 'exit 43' INT; touch "$0"; while :; do sleep 0.01; done`

	old := inTerminalForeground
	defer func() { inTerminalForeground = old }()

	// Not in a terminal's foreground: SIGINT is passed on.
	inTerminalForeground = func() bool { return false }
	a := startRun(t, "--socket", f.sock, "run", "--model", "m", "--", "sh", "-c", script, ready)
	waitFile(t, ready)
	a.sigs <- syscall.SIGINT
	a.wait(t).want(t, 43)
	reps := f.reportBodies()
	sameJSON(t, reps[len(reps)-1], `{"status":0}`)

	// In a terminal's foreground the terminal sent Ctrl-C to CMD already:
	// keyctl does not send it again; SIGTERM it does.
	os.Remove(ready)
	inTerminalForeground = func() bool { return true }
	a = startRun(t, "--socket", f.sock, "run", "--model", "m", "--", "sh", "-c", script, ready)
	waitFile(t, ready)
	a.sigs <- syscall.SIGINT
	time.Sleep(50 * time.Millisecond)
	a.sigs <- syscall.SIGTERM
	r := a.wait(t).want(t, 42)
	noSecret(t, r)
}

// blockingKeyd answers no lease request until the client gives up.
func blockingKeyd(t *testing.T) (sock string, leases chan struct{}) {
	t.Helper()
	dir, err := os.MkdirTemp("", "kc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock = filepath.Join(dir, "s")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	leases = make(chan struct{}, 4)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/leases" {
			leases <- struct{}{}
			<-r.Context().Done()
			return
		}
		http.Error(w, `{"error":{"code":"not_found","message":"no"}}`, 404)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock, leases
}

func TestRunSignalWhileLeasing(t *testing.T) {
	sock, leases := blockingKeyd(t)
	marker := filepath.Join(t.TempDir(), "ran")
	a := startRun(t, "--socket", sock, "run", "--model", "m", "--wait", "5m", "--", "touch", marker)
	<-leases
	a.sigs <- syscall.SIGINT
	r := a.wait(t).want(t, 128+2)
	contains(t, "stderr", r.stderr, "keyctl: run: interrupted by interrupt before touch started")
	if _, err := os.Stat(marker); err == nil {
		t.Error("CMD ran")
	}
}
