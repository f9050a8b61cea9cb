package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// testDaemon is keyd run in-process by Run on a real Unix socket and a
// real bbolt file.
type testDaemon struct {
	socket, dir string
	http        *http.Client
	log         *testutil.SyncBuffer
	stop        func() error
}

// shortDir is a temp dir whose paths fit a Unix socket address.
func shortDir(t testing.TB) string {
	d, err := os.MkdirTemp("", "kd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

const exampleSecret = "AIzaSECRET-value-that-must-never-be-logged-1234"

func startDaemon(t testing.TB, keysJSON string) *testDaemon {
	t.Helper()
	return startDaemonLevel(t, keysJSON, slog.LevelDebug)
}

// startDaemonLevel is startDaemon logging at level (benchmarks log at
// info, keyd's default, so as not to measure debug logging).
func startDaemonLevel(t testing.TB, keysJSON string, level slog.Level) *testDaemon {
	t.Helper()
	return startDaemonWith(t, keysJSON, func(o *Options) { o.LogLevel = level })
}

// startDaemonWith is startDaemon with options set by opt.
func startDaemonWith(t testing.TB, keysJSON string, opt func(*Options)) *testDaemon {
	t.Helper()
	dir := shortDir(t)
	if err := os.WriteFile(filepath.Join(dir, "keys.json"), []byte(keysJSON), 0o600); err != nil {
		t.Fatal(err)
	}
	var env strings.Builder
	for _, id := range []string{"k1", "k2", "k3", "a", "b"} {
		fmt.Fprintf(&env, "GEMINI_KEY_%s=%s-%s\n", id, exampleSecret, id)
	}
	if err := os.WriteFile(filepath.Join(dir, ".env"), []byte(env.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	d := &testDaemon{socket: filepath.Join(dir, "s.sock"), dir: dir, log: &testutil.SyncBuffer{}}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	o := Options{
		ConfigPath: filepath.Join(dir, "keys.json"), SocketPath: d.socket,
		StateDir: filepath.Join(dir, "state"), Log: d.log, LogLevel: slog.LevelDebug,
		Ready: func() { close(ready) },
	}
	opt(&o)
	go func() { done <- Run(ctx, o) }()
	select {
	case <-ready:
	case err := <-done:
		cancel()
		t.Fatalf("keyd did not start: %v\n%s", err, d.log)
	}
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", d.socket)
	}}
	d.http = &http.Client{Transport: tr}
	var once sync.Once
	var stopErr error
	d.stop = func() error {
		once.Do(func() {
			cancel()
			stopErr = <-done
			tr.CloseIdleConnections()
		})
		return stopErr
	}
	t.Cleanup(func() {
		if err := d.stop(); err != nil {
			t.Errorf("keyd stopped with %v", err)
		}
		if strings.Contains(d.log.String(), exampleSecret) {
			t.Errorf("a secret reached the log:\n%s", d.log)
		}
	})
	return d
}

func (d *testDaemon) do(t testing.TB, method, path, body string) (int, []byte) {
	t.Helper()
	req, _ := http.NewRequest(method, "http://keyd"+path, strings.NewReader(body))
	resp, err := d.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func errCode(t testing.TB, body []byte) string {
	t.Helper()
	var e api.ErrorBody
	if err := json.Unmarshal(body, &e); err != nil || e.Error == nil {
		t.Fatalf("not an error body: %s", body)
	}
	if e.Error.Message == "" {
		t.Fatalf("error without message: %s", body)
	}
	return e.Error.Code
}

const socketKeys = `{"keys":[{"key_id":"k1","model_name":"m","rpm":5,"tpm":100000},
	{"key_id":"nosecret","model_name":"m","rpm":5,"tpm":100000}]}`

func TestSocketAPIErrors(t *testing.T) {
	d := startDaemon(t, socketKeys)
	big := `{"model":"m","client":"` + strings.Repeat("x", maxBody) + `"}`
	cases := []struct {
		method, path, body string
		status             int
		code               string
	}{
		{"POST", "/v1/leases", `{"model":`, 400, api.CodeBadRequest},
		{"POST", "/v1/leases", ``, 400, api.CodeBadRequest},
		{"POST", "/v1/leases", `{"model":"m","tokns":5}`, 400, api.CodeBadRequest},
		{"POST", "/v1/leases", `{"model":"m"} {"model":"m"}`, 400, api.CodeBadRequest},
		{"POST", "/v1/leases", `{"model":"m","tokens":-1}`, 400, api.CodeBadRequest},
		{"POST", "/v1/leases", `{"model":"m","wait_ms":99999999999}`, 400, api.CodeBadRequest},
		{"POST", "/v1/leases", `{}`, 400, api.CodeBadRequest},
		{"POST", "/v1/leases", big, 413, api.CodeTooLarge},
		{"POST", "/v1/leases", `{"model":"nope"}`, 404, api.CodeUnknownModel},
		{"GET", "/v1/leases", ``, 405, api.CodeMethodNotAllowed},
		{"POST", "/v1/status", ``, 405, api.CodeMethodNotAllowed},
		{"GET", "/v2/status", ``, 404, api.CodeNotFound},
		{"POST", "/v1/leases/nope/report", `{"status":200}`, 404, api.CodeNotFound},
		{"POST", "/v1/leases/x/report", `{"status":700}`, 400, api.CodeBadRequest},
		{"POST", "/v1/leases/x/report", `{"outcome":"sent"}`, 400, api.CodeBadRequest},
		{"POST", "/v1/keys/zz/disable", ``, 404, api.CodeNotFound},
		{"POST", "/v1/keys/k1/explode", ``, 404, api.CodeNotFound},
		{"GET", "/v1/usage?since=yesterday", ``, 400, api.CodeBadRequest},
	}
	for _, tc := range cases {
		status, body := d.do(t, tc.method, tc.path, tc.body)
		if status != tc.status {
			t.Errorf("%s %s %.40q: status %d, want %d: %s", tc.method, tc.path, tc.body, status, tc.status, body)
			continue
		}
		if code := errCode(t, body); code != tc.code {
			t.Errorf("%s %s %.40q: code %s, want %s", tc.method, tc.path, tc.body, code, tc.code)
		}
	}
}

func TestSocketLeaseReportStatus(t *testing.T) {
	d := startDaemon(t, socketKeys)
	status, body := d.do(t, "POST", "/v1/leases", `{"model":"m","tokens":10,"client":"t"}`)
	if status != 200 {
		t.Fatalf("lease: %d %s", status, body)
	}
	var l api.Lease
	json.Unmarshal(body, &l)
	if l.KeyID != "k1" || l.Secret != exampleSecret+"-k1" || l.LeaseID == "" || l.ExpiresAt.Before(time.Now()) {
		t.Fatalf("lease %+v", l)
	}
	status, body = d.do(t, "POST", "/v1/leases/"+l.LeaseID+"/report", `{"status":200,"usage":{"prompt_tokens":8,"output_tokens":3}}`)
	if status != 200 || !strings.Contains(string(body), `"classification":"success"`) {
		t.Fatalf("report: %d %s", status, body)
	}
	status, body = d.do(t, "GET", "/v1/status", "")
	if status != 200 {
		t.Fatalf("status: %d %s", status, body)
	}
	if bytes.Contains(body, []byte(exampleSecret)) {
		t.Fatalf("status holds a secret: %s", body)
	}
	var st api.Status
	json.Unmarshal(body, &st)
	if st.Keys[0].State != api.StateReady || st.Keys[1].State != api.StateNoSecret || st.Buckets[0].TPM.Used != 8 {
		t.Fatalf("status %s", body)
	}
	if !strings.Contains(d.log.String(), "key nosecret: no secret: set GEMINI_KEY_nosecret") {
		t.Fatalf("the startup log does not name the key without a secret:\n%s", d.log)
	}
	status, body = d.do(t, "GET", "/v1/usage", "")
	if status != 200 || !strings.Contains(string(body), `"prompt_tokens":8`) {
		t.Fatalf("usage: %d %s", status, body)
	}
}

func TestSecondDaemonOnTheSameSocketIsRefused(t *testing.T) {
	d := startDaemon(t, socketKeys)
	err := Run(context.Background(), Options{ConfigPath: filepath.Join(d.dir, "keys.json"),
		SocketPath: d.socket, StateDir: filepath.Join(d.dir, "state2"), Log: io.Discard})
	if err == nil || !strings.Contains(err.Error(), "another keyd is already serving") {
		t.Fatalf("second keyd: %v", err)
	}
	err = Run(context.Background(), Options{ConfigPath: filepath.Join(d.dir, "keys.json"),
		SocketPath: d.socket + "2", StateDir: filepath.Join(d.dir, "state"), Log: io.Discard})
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("in use by another keyd (pid %d)", os.Getpid())) {
		t.Fatalf("second keyd on the same state dir: %v", err)
	}
}

func TestStaleSocketIsReplaced(t *testing.T) {
	dir := shortDir(t)
	path := filepath.Join(dir, "s.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close() // as after kill -9: the file stays, nobody answers
	ln2, err := listen(path, -1)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	defer ln2.Close()
	fi, _ := os.Stat(path)
	if fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket mode %v, want 0660", fi.Mode().Perm())
	}
	if _, err := listen(filepath.Join(dir, strings.Repeat("x", 120)), -1); err == nil || !strings.Contains(err.Error(), "shorter --socket") {
		t.Fatalf("long path: %v", err)
	}
}

func TestSlowAndVanishingClientsDoNotStall(t *testing.T) {
	d := startDaemon(t, socketKeys)
	// A client that sends half a request and stays.
	slow, err := net.Dial("unix", d.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	fmt.Fprintf(slow, "POST /v1/leases HTTP/1.1\r\nHost: k\r\nContent-Length: 100\r\n\r\n{\"mod")
	// A client that asks to wait and vanishes.
	gone, err := net.Dial("unix", d.socket)
	if err != nil {
		t.Fatal(err)
	}
	body := `{"model":"m","wait_ms":60000}`
	for range 5 {
		d.do(t, "POST", "/v1/leases", `{"model":"m"}`)
	}
	fmt.Fprintf(gone, "POST /v1/leases HTTP/1.1\r\nHost: k\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	time.Sleep(50 * time.Millisecond)
	gone.Close()
	if status, b := d.do(t, "GET", "/v1/health", ""); status != 200 {
		t.Fatalf("health behind a slow client: %d %s", status, b)
	}
}

func TestWaitersGetShuttingDown(t *testing.T) {
	d := startDaemon(t, socketKeys)
	for range 5 {
		d.do(t, "POST", "/v1/leases", `{"model":"m"}`)
	}
	got := make(chan []byte)
	go func() {
		_, b := d.do(t, "POST", "/v1/leases", `{"model":"m","wait_ms":60000}`)
		got <- b
	}()
	time.Sleep(100 * time.Millisecond) // let it queue; the answer does not depend on it
	if err := d.stop(); err != nil {
		t.Fatal(err)
	}
	if b := <-got; !bytes.Contains(b, []byte(api.CodeShuttingDown)) {
		t.Fatalf("waiter got %s", b)
	}
}

func FuzzDecodeLeaseRequest(f *testing.F) {
	for _, s := range append([]string{`{"model":1}`, `{"tokens":-1}`}, leaseBodies...) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body string) {
		checkLeaseBody(t, body) // the fast path agrees with encoding/json
		r := httptest.NewRequest("POST", "/v1/leases", strings.NewReader(body))
		req, err := decodeLeaseRequest(r)
		if (req == nil) == (err == nil) {
			t.Fatalf("req %v err %v", req, err)
		}
		if req != nil && (req.Model == "" || req.Tokens < 0 || req.WaitMS < 0) {
			t.Fatalf("invalid request accepted: %+v", req)
		}
		if err != nil && (err.Code == "" || err.HTTPStatus < 400) {
			t.Fatalf("bad error %+v", err)
		}
	})
}

func FuzzDecodeReportRequest(f *testing.F) {
	for _, s := range reportBodies {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body string) {
		checkReportBody(t, body) // the fast path agrees with encoding/json
		r := httptest.NewRequest("POST", "/v1/leases/x/report", strings.NewReader(body))
		rep, err := decodeReportRequest(r)
		if (rep == nil) == (err == nil) {
			t.Fatalf("rep %v err %v", rep, err)
		}
		if rep != nil && rep.Outcome == "" && (rep.Status < 0 || rep.Status > 599) {
			t.Fatalf("invalid report accepted: %+v", rep)
		}
	})
}
