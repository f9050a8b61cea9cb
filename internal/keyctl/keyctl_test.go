package keyctl

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// now is the fixed time every test runs at.
var now = time.Date(2026, 11, 29, 10, 0, 0, 0, time.UTC)

// fake is a keyd stand-in on a real Unix socket: it answers each route
// with a canned status and body, and records the requests.
type fake struct {
	sock string

	mu      sync.Mutex
	answers map[string]answer // "METHOD /path" → answer
	reqs    []request
}

type answer struct {
	status int
	body   string
}

type request struct {
	method, path, query, body string
}

func newFake(t *testing.T) *fake {
	t.Helper()
	dir, err := os.MkdirTemp("", "kc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	f := &fake{sock: filepath.Join(dir, "s"), answers: map[string]answer{}}
	ln, err := net.Listen("unix", f.sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: f}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return f
}

// on sets the answer to method and path.
func (f *fake) on(method, path string, status int, body string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.answers[method+" "+path] = answer{status, body}
}

func (f *fake) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	f.mu.Lock()
	f.reqs = append(f.reqs, request{r.Method, r.URL.Path, r.URL.RawQuery, string(b)})
	a, ok := f.answers[r.Method+" "+r.URL.Path]
	f.mu.Unlock()
	if !ok {
		a = answer{404, `{"error":{"code":"not_found","message":"no route ` + r.Method + " " + r.URL.Path + `"}}`}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(a.status)
	io.WriteString(w, a.body)
}

func (f *fake) requests() []request {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]request(nil), f.reqs...)
}

// result is the outcome of one keyctl run.
type result struct {
	code           int
	stdout, stderr string
}

// keyctl runs keyctl with args at the fixed time, in UTC, with the
// environment vars and stdin given.
func keyctl(t *testing.T, vars map[string]string, stdin string, args ...string) result {
	t.Helper()
	var out, errOut bytes.Buffer
	e := &env{
		stdin:  strings.NewReader(stdin),
		stdout: &out,
		stderr: &errOut,
		getenv: func(k string) string { return vars[k] },
		now:    func() time.Time { return now },
		loc:    time.UTC,
	}
	code := run(context.Background(), e, args)
	return result{code, out.String(), errOut.String()}
}

// want fails unless r exited with code.
func (r result) want(t *testing.T, code int) result {
	t.Helper()
	if r.code != code {
		t.Fatalf("exit code %d, want %d\nstdout:\n%s\nstderr:\n%s", r.code, code, r.stdout, r.stderr)
	}
	return r
}

func contains(t *testing.T, what, s string, subs ...string) {
	t.Helper()
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			t.Errorf("%s lacks %q:\n%s", what, sub, s)
		}
	}
}

func lacks(t *testing.T, what, s string, subs ...string) {
	t.Helper()
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			t.Errorf("%s holds %q:\n%s", what, sub, s)
		}
	}
}

func sameJSON(t *testing.T, got, want string) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal([]byte(got), &g); err != nil {
		t.Fatalf("%q is not JSON: %v", got, err)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatal(err)
	}
	gb, _ := json.Marshal(g)
	wb, _ := json.Marshal(w)
	if !bytes.Equal(gb, wb) {
		t.Errorf("JSON = %s\nwant   %s", gb, wb)
	}
}

func TestUsageErrors(t *testing.T) {
	f := newFake(t)
	r := keyctl(t, nil, "").want(t, exitUsage)
	contains(t, "keyctl with no command", r.stderr, "usage: keyctl [--socket PATH] COMMAND", "commands:")
	for _, args := range [][]string{
		{"stauts"},
		{"--bogus", "status"},
		{"--socket", f.sock, "status", "--bogus"},
		{"--socket", f.sock, "status", "extra"},
		{"--socket", f.sock, "lease"},
		{"--socket", f.sock, "lease", "--model", "m", "--json", "--env"},
		{"--socket", f.sock, "lease", "--model", "m", "--wait", "11m"},
		{"--socket", f.sock, "lease", "--model", "m", "--wait", "soon"},
		{"--socket", f.sock, "lease", "--model", "m", "--tokens", "-1"},
		{"--socket", f.sock, "disable"},
		{"--socket", f.sock, "disable", "a", "b"},
		{"--socket", f.sock, "usage", "--since", "yesterday"},
		{"--socket", f.sock, "usage", "--since", "-2h"},
		{"--socket", f.sock, "wait", "--timeout", "0s"},
		{"check", "a.json", "b.json"},
		{"help", "nope"},
	} {
		r := keyctl(t, nil, "", args...)
		if r.code != exitUsage {
			t.Errorf("keyctl %q: exit code %d, want 2\nstderr:\n%s", args, r.code, r.stderr)
			continue
		}
		if !strings.HasPrefix(r.stderr, "keyctl: ") || !strings.Contains(r.stderr, "usage: keyctl") {
			t.Errorf("keyctl %q: stderr lacks the error or the usage hint:\n%s", args, r.stderr)
		}
	}
	if got := f.requests(); len(got) != 0 {
		t.Errorf("usage errors reached keyd: %v", got)
	}
	r = keyctl(t, nil, "", "stauts").want(t, exitUsage)
	contains(t, "stderr", r.stderr, `unknown command "stauts" (did you mean "status"?)`)
}

func TestHelp(t *testing.T) {
	r := keyctl(t, nil, "", "--help").want(t, 0)
	for _, c := range commands() {
		contains(t, "keyctl --help", r.stdout, "  "+c.name+" ")
	}
	r = keyctl(t, nil, "", "help").want(t, 0)
	contains(t, "keyctl help", r.stdout, "Exit codes")
	for _, c := range commands() {
		for _, args := range [][]string{{c.name, "--help"}, {c.name, "-h"}, {"help", c.name}} {
			r := keyctl(t, nil, "", args...).want(t, 0)
			contains(t, strings.Join(args, " "), r.stdout, "usage: keyctl "+c.name, "--socket PATH")
		}
	}
	r = keyctl(t, nil, "", "lease", "--help").want(t, 0)
	contains(t, "lease --help", r.stdout, "--model M", "--wait D", "--env", "--json", "--tokens N", "--workload W", "--client NAME")
}

func TestNotRunning(t *testing.T) {
	dir, err := os.MkdirTemp("", "kc")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "missing.sock")
	want := "keyctl: keyd is not running (socket " + sock + "): start it with `keyd --config keys.json` or `systemctl start keyd`\n"
	for _, args := range [][]string{
		{"--socket", sock, "status"},
		{"status", "--socket", sock},
		{"--socket", sock, "lease", "--model", "m"},
		{"--socket", sock, "wait", "--timeout", "100ms"},
	} {
		r := keyctl(t, nil, "", args...).want(t, exitError)
		if r.stderr != want {
			t.Errorf("keyctl %q: stderr = %q\nwant %q", args, r.stderr, want)
		}
	}
	// KEYD_SOCKET is the default.
	r := keyctl(t, map[string]string{"KEYD_SOCKET": sock}, "", "status").want(t, exitError)
	if r.stderr != want {
		t.Errorf("stderr = %q, want %q", r.stderr, want)
	}
	r = keyctl(t, nil, "", "--socket", sock, "version").want(t, 0)
	contains(t, "version", r.stdout, "keyctl "+Version, "not running")
}

func TestSocketBeforeOrAfter(t *testing.T) {
	f := newFake(t)
	f.on("GET", "/v1/health", 200, `{"ok":true,"version":"9.9","keys_ready":1,"keys_total":2}`)
	for _, args := range [][]string{
		{"--socket", f.sock, "version"},
		{"version", "--socket", f.sock},
		{"--socket=/nonexistent", "version", "--socket=" + f.sock},
	} {
		r := keyctl(t, nil, "", args...).want(t, 0)
		contains(t, "version", r.stdout, "keyd   9.9 (socket "+f.sock+")")
	}
}

func TestWait(t *testing.T) {
	f := newFake(t)
	f.on("GET", "/v1/health", 200, `{"ok":true,"version":"9.9","keys_ready":1,"keys_total":2}`)
	r := keyctl(t, nil, "", "--socket", f.sock, "wait").want(t, 0)
	contains(t, "wait", r.stdout, "keyd 9.9 is up: 1/2 keys ready")
}

func TestAPIErrorExit(t *testing.T) {
	f := newFake(t)
	f.on("POST", "/v1/reload", 422, `{"error":{"code":"reload_failed","message":"keys.json:3:5: bad: fix it"}}`)
	r := keyctl(t, nil, "", "--socket", f.sock, "reload").want(t, exitError)
	if r.stderr != "keyctl: keys.json:3:5: bad: fix it\n" {
		t.Errorf("stderr = %q", r.stderr)
	}
	f.on("POST", "/v1/keys/k1/disable", 403, `{"error":{"code":"forbidden","message":"uid 1000 may not /v1/keys/k1/disable"}}`)
	r = keyctl(t, nil, "", "--socket", f.sock, "disable", "k1").want(t, exitError)
	contains(t, "stderr", r.stderr, "keyctl: uid 1000 may not")
}

func TestReloadAndKeyActions(t *testing.T) {
	f := newFake(t)
	f.on("POST", "/v1/reload", 200, `{"path":"/etc/keyd/keys.json","changed":true,"keys":3,"warnings":["key a: unknown field \"rpn\" (did you mean \"rpm\"?)"]}`)
	r := keyctl(t, nil, "", "--socket", f.sock, "reload").want(t, 0)
	contains(t, "reload", r.stdout, "reloaded /etc/keyd/keys.json: 3 keys (changed)", "WARNINGS (1):", `! key a: unknown field "rpn"`)
	r = keyctl(t, nil, "", "--socket", f.sock, "reload", "--json").want(t, 0)
	sameJSON(t, r.stdout, `{"path":"/etc/keyd/keys.json","changed":true,"keys":3,"warnings":["key a: unknown field \"rpn\" (did you mean \"rpm\"?)"]}`)

	for _, action := range []string{"disable", "enable", "reset"} {
		f.on("POST", "/v1/keys/flash_01/"+action, 200, `{"key_id":"flash_01","state":"st-`+action+`"}`)
		r := keyctl(t, nil, "", "--socket", f.sock, action, "flash_01").want(t, 0)
		if r.stdout != "key flash_01: st-"+action+"\n" {
			t.Errorf("%s: stdout = %q", action, r.stdout)
		}
		r = keyctl(t, nil, "", action, "--json", "flash_01", "--socket", f.sock).want(t, 0)
		sameJSON(t, r.stdout, `{"key_id":"flash_01","state":"st-`+action+`"}`)
	}
}

func TestUsage(t *testing.T) {
	f := newFake(t)
	f.on("GET", "/v1/usage", 200, `{"rows":[
		{"hour":"2026-11-29T08:00:00Z","project":"p1","model":"gemini-2.5-flash","key_id":"flash_01","requests":12,"prompt_tokens":123456,"output_tokens":900,"rate_minute_429s":2,"rate_day_429s":0,"other_429s":1,"errors":1,"unused":3},
		{"hour":"2026-11-29T09:00:00Z","project":"p1","model":"gemini-2.5-flash","requests":3,"prompt_tokens":100,"output_tokens":10}]}`)
	r := keyctl(t, nil, "", "--socket", f.sock, "usage", "--since", "2h", "--key", "flash_01").want(t, 0)
	reqs := f.requests()
	if q := reqs[len(reqs)-1].query; q != "key=flash_01&since=2026-11-29T08%3A00%3A00Z" {
		t.Errorf("query = %q", q)
	}
	contains(t, "usage", r.stdout, "HOUR", "11-29 08:00", "flash_01", "123k", "2/0/1", "TOTAL", "15")
	for _, l := range strings.Split(r.stdout, "\n") {
		if len([]rune(l)) > 100 {
			t.Errorf("line over 100 columns: %q", l)
		}
	}

	keyctl(t, nil, "", "--socket", f.sock, "usage", "--since", "2026-11-01T00:00:00Z").want(t, 0)
	reqs = f.requests()
	if q := reqs[len(reqs)-1].query; q != "since=2026-11-01T00%3A00%3A00Z" {
		t.Errorf("query = %q", q)
	}
	keyctl(t, nil, "", "--socket", f.sock, "usage").want(t, 0)
	reqs = f.requests()
	if q := reqs[len(reqs)-1].query; q != "since=2026-11-28T10%3A00%3A00Z" {
		t.Errorf("default query = %q", q)
	}

	f.on("GET", "/v1/usage", 200, `{"rows":[]}`)
	r = keyctl(t, nil, "", "--socket", f.sock, "usage", "--since", "7d").want(t, 0)
	if r.stdout != "no usage since 2026-11-22 10:00\n" {
		t.Errorf("stdout = %q", r.stdout)
	}
}

func TestParseSince(t *testing.T) {
	for in, want := range map[string]time.Time{
		"24h":                       now.Add(-24 * time.Hour),
		"90m":                       now.Add(-90 * time.Minute),
		"2d":                        now.Add(-48 * time.Hour),
		"2026-11-01T00:00:00Z":      time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC),
		"2026-11-01T00:00:00+01:00": time.Date(2026, 10, 31, 23, 0, 0, 0, time.UTC),
	} {
		got, err := parseSince(in, now)
		if err != nil || !got.Equal(want) {
			t.Errorf("parseSince(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "x", "-1h", "2026-11-01", "d"} {
		if _, err := parseSince(in, now); err == nil {
			t.Errorf("parseSince(%q) succeeded", in)
		}
	}
}

func TestFormat(t *testing.T) {
	for d, want := range map[time.Duration]string{
		-time.Second:                      "0s",
		0:                                 "0s",
		41*time.Second + time.Millisecond: "42s",
		42 * time.Second:                  "42s",
		4*time.Minute + 5*time.Second:     "4m05s",
		7*time.Hour + 3*time.Minute:       "7h03m",
		55 * time.Hour:                    "2d07h",
	} {
		if got := fmtDuration(d); got != want {
			t.Errorf("fmtDuration(%v) = %q, want %q", d, got, want)
		}
	}
	for n, want := range map[int64]string{0: "0", 9999: "9999", 12345: "12.3k", 250000: "250k", 1000000: "1M", 4500000: "4.5M", 123456789: "123M"} {
		if got := human(n); got != want {
			t.Errorf("human(%d) = %q, want %q", n, got, want)
		}
	}
	for in, want := range map[string]string{"": "-", "…abcd": "…abcd", "…ab": "…ab", "AIzaSyFULLSECRET1234abcd": "…abcd", "…AIzaSyXYZ9": "…XYZ9"} {
		if got := hint(in); got != want {
			t.Errorf("hint(%q) = %q, want %q", in, got, want)
		}
	}
	if got := clean("a\tb\nc\x1b[31md"); got != "a b c?[31md" {
		t.Errorf("clean = %q", got)
	}
	if got := nearest("lese", []string{"status", "lease"}); got != "lease" {
		t.Errorf("nearest = %q", got)
	}
	if got := nearest("xyzzy", []string{"status", "lease"}); got != "" {
		t.Errorf("nearest = %q", got)
	}
}

// TestDependencies keeps keyctl and the client away from the daemon and
// its store: the client needs only api, internal/fastjson (the JSON
// scanner it shares with keyd, itself standard library only) and the
// standard library.
func TestDependencies(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command")
	}
	deps := func(pkg string) []string {
		out, err := exec.Command(goBin, "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", pkg).Output()
		if err != nil {
			t.Fatalf("go list %s: %v", pkg, err)
		}
		return strings.Fields(string(out))
	}
	for _, d := range deps("github.com/keyd/keyd/cmd/keyctl") {
		for _, bad := range []string{"go.etcd.io/bbolt", "github.com/keyd/keyd/internal/daemon", "github.com/keyd/keyd/internal/store", "github.com/keyd/keyd/internal/limiter"} {
			if d == bad {
				t.Errorf("keyctl depends on %s", d)
			}
		}
	}
	for _, d := range deps("github.com/keyd/keyd/client") {
		if d != "github.com/keyd/keyd/client" && d != "github.com/keyd/keyd/api" && d != "github.com/keyd/keyd/internal/fastjson" {
			t.Errorf("client depends on %s: it may import only api, internal/fastjson and the standard library", d)
		}
	}
}
