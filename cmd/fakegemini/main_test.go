package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keyd/keyd/internal/testutil"
)

const testConfig = `{
  "keys": [{"key": "k1", "project": "p1"}, {"key": "k2", "project": "p1"}, {"key": "leaky", "project": "p1", "state": "leaked"}],
  "models": [{"name": "gemini-2.5-flash", "rpm": 2, "tpm": 1000, "rpd": 100, "tier": "free"}],
  "quota_format": "newer",
  "clock": {"start": "2026-03-08T00:00:00-08:00", "frozen": true},
  "faults": [{"kind": "overloaded", "count": 1, "method": "countTokens"}]
}`

// start runs the command in-process and returns its base URL, a stop
// function returning the exit status, and its stderr.
func start(t *testing.T, args ...string) (string, func() int, *testutil.SyncBuffer) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	stderr := &testutil.SyncBuffer{}
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, args, pw, stderr)
		pw.Close()
	}()
	line, err := bufio.NewReader(pr).ReadString('\n')
	if err != nil {
		cancel()
		t.Fatalf("no address: %v; stderr: %s", err, stderr.String())
	}
	go io.Copy(io.Discard, pr)
	var once sync.Once
	status := -1
	stop := func() int {
		once.Do(func() {
			cancel()
			select {
			case status = <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("run did not return")
			}
		})
		return status
	}
	t.Cleanup(func() { stop() })
	return strings.TrimSpace(line), stop, stderr
}

func post(t *testing.T, url, body string) (int, map[string]any) {
	t.Helper()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, m
}

func TestServesConfig(t *testing.T) {
	cfgPath := filepath.Join(t.TempDir(), "fake.json")
	if err := os.WriteFile(cfgPath, []byte(testConfig), 0o600); err != nil {
		t.Fatal(err)
	}
	base, stop, stderr := start(t, "--listen", "127.0.0.1:0", "--config", cfgPath)
	if !strings.HasPrefix(base, "http://127.0.0.1:") {
		t.Fatalf("address line %q", base)
	}
	gen := base + "/v1beta/models/gemini-2.5-flash:generateContent?key="
	body := `{"contents":[{"parts":[{"text":"hi"}]}]}`
	for _, k := range []string{"k1", "k2"} {
		if code, m := post(t, gen+k, body); code != 200 {
			t.Fatalf("%s: %d %v", k, code, m)
		}
	}
	code, m := post(t, gen+"k1", body)
	msg, _ := m["error"].(map[string]any)["message"].(string)
	if code != 429 || !strings.HasSuffix(msg, "Please retry in 60s.") {
		t.Errorf("third request: %d %q", code, msg)
	}
	if code, _ := post(t, gen+"leaky", body); code != 403 {
		t.Errorf("leaked key: %d", code)
	}
	if code, _ := post(t, base+"/v1beta/models/gemini-2.5-flash:countTokens?key=k1", body); code != 503 {
		t.Errorf("configured fault: %d", code)
	}
	// The frozen clock moves only when told.
	if code, _ := post(t, base+"/_fake/clock", `{"advance":"60s"}`); code != 200 {
		t.Fatal("advance")
	}
	if code, _ := post(t, gen+"k1", body); code != 200 {
		t.Errorf("after advance: %d", code)
	}

	resp, err := http.Get(base + "/_fake/stats")
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Now         time.Time      `json:"now"`
		CountsByKey map[string]int `json:"counts_by_key"`
		Refused     map[string]int `json:"refused"`
		Violations  []string       `json:"violations"`
	}
	err = json.NewDecoder(resp.Body).Decode(&st)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if st.CountsByKey["k1"] != 2 || st.CountsByKey["k2"] != 1 || st.Refused["rpm"] != 1 || st.Violations == nil || len(st.Violations) != 0 ||
		!st.Now.Equal(time.Date(2026, 3, 8, 8, 1, 0, 0, time.UTC)) {
		t.Errorf("stats %+v", st)
	}
	if s := stop(); s != 0 {
		t.Errorf("exit status %d", s)
	}
	if !strings.Contains(stderr.String(), "stopped after 6 requests (3 admitted), 0 violations") {
		t.Errorf("stderr: %s", stderr.String())
	}
}

func TestDemoConfig(t *testing.T) {
	base, stop, _ := start(t)
	resp, err := http.Get(base + "/v1beta/models?key=fake-key-1")
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Models []struct{ Name string }
	}
	err = json.NewDecoder(resp.Body).Decode(&list)
	resp.Body.Close()
	if err != nil || len(list.Models) != 3 || list.Models[0].Name != "models/gemini-2.5-flash" {
		t.Errorf("models: %v %+v", err, list)
	}
	if code, m := post(t, base+"/v1beta/models/gemini-2.5-pro:generateContent?key=fake-key-1", `{"contents":[{"parts":[{"text":"hi"}]}]}`); code != 429 {
		t.Errorf("pro: %d %v", code, m)
	}
	if s := stop(); s != 0 {
		t.Errorf("exit status %d", s)
	}
}

func TestRefusals(t *testing.T) {
	bad := filepath.Join(t.TempDir(), "bad.json")
	if err := os.WriteFile(bad, []byte(`{"keys":[{"key":"k","projekt":"p"}],"models":[]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--listen", "0.0.0.0:0"}, "not a loopback address"},
		{[]string{"--listen", ":0"}, "not a loopback address"},
		{[]string{"--listen", "192.168.1.10:8080"}, "not a loopback address"},
		{[]string{"--listen", "example.com:80"}, "not a loopback address"},
		{[]string{"--listen", "127.0.0.1"}, "missing port"},
		{[]string{"--config", bad}, `unknown field "projekt"`},
		{[]string{"--config", filepath.Join(t.TempDir(), "none.json")}, "no such file"},
		{[]string{"extra"}, `unexpected argument "extra"`},
	} {
		var stdout, stderr bytes.Buffer
		if s := run(context.Background(), c.args, &stdout, &stderr); s != 2 || !strings.Contains(stderr.String(), c.want) || stdout.Len() != 0 {
			t.Errorf("%q: status %d, stderr %q", c.args, s, stderr.String())
		}
	}
}

// TestSignal runs the real binary (this test binary, re-executed) and stops
// it with SIGTERM.
func TestSignal(t *testing.T) {
	if os.Getenv("FAKEGEMINI_RUN_MAIN") == "1" {
		os.Args = append([]string{"fakegemini"}, strings.Fields(os.Getenv("FAKEGEMINI_ARGS"))...)
		main()
		return
	}
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestSignal$")
		cmd.Env = append(os.Environ(), "FAKEGEMINI_RUN_MAIN=1", "GORACE=atexit_sleep_ms=0", "FAKEGEMINI_ARGS=--listen 127.0.0.1:0")
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr testutil.SyncBuffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err != nil {
			cmd.Process.Kill()
			t.Fatalf("no address: %v %s", err, stderr.String())
		}
		if !strings.HasPrefix(line, "http://127.0.0.1:") {
			t.Errorf("address line %q", line)
		}
		resp, err := http.Get(strings.TrimSpace(line) + "/_fake/stats")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if err := cmd.Process.Signal(sig); err != nil {
			t.Fatal(err)
		}
		if err := cmd.Wait(); err != nil {
			t.Errorf("%v: %v; stderr %s", sig, err, stderr.String())
		}
		if !strings.Contains(stderr.String(), "stopped after 0 requests") {
			t.Errorf("stderr %s", stderr.String())
		}
	}
}
