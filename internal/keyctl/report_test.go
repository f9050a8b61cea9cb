package keyctl

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestReportFlags(t *testing.T) {
	f := newFake(t)
	errFile := filepath.Join(t.TempDir(), "err.json")
	os.WriteFile(errFile, []byte(`{"error":{"code":429}}`), 0o600)
	for _, args := range [][]string{
		{},
		{"L1"},
		{"L1", "L2", "--unused"},
		{"L1", "--status", "200", "--unused"},
		{"L1", "--unused", "--prompt-tokens", "5"},
		{"L1", "--unused", "--error-file", errFile},
		{"L1", "--status", "200", "--error-file", errFile},
		{"L1", "--status", "700"},
		{"L1", "--status", "42"},
		{"L1", "--status", "-1"},
		{"L1", "--status", "200", "--prompt-tokens", "-5"},
		{"L1", "--status", "abc"},
		{"--error-file", errFile},
	} {
		r := keyctl(t, nil, "", append([]string{"--socket", f.sock, "report"}, args...)...)
		if r.code != exitUsage || !strings.Contains(r.stderr, "usage: keyctl report LEASE_ID") {
			t.Errorf("report %q: exit %d, stderr:\n%s", args, r.code, r.stderr)
		}
	}
	if got := f.requests(); len(got) != 0 {
		t.Errorf("bad reports reached keyd: %v", got)
	}
}

func TestReport(t *testing.T) {
	f := newFake(t)
	const answer = `{"lease_id":"L-1","key_id":"flash_01","classification":"rate_minute","action":"bucket proj-a/gemini-2.5-flash cooling for 1m0s"}`
	f.on("POST", "/v1/leases/L-1/report", 200, answer)
	dir := t.TempDir()
	errFile := filepath.Join(dir, "err.json")
	geminiErr := `{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"22s"}]}}`
	os.WriteFile(errFile, []byte(geminiErr+"\n"), 0o600)
	htmlFile := filepath.Join(dir, "err.html")
	os.WriteFile(htmlFile, []byte("<html>502 Bad Gateway</html>"), 0o600)

	last := func() string {
		reqs := f.requests()
		r := reqs[len(reqs)-1]
		if r.method != "POST" || r.path != "/v1/leases/L-1/report" {
			t.Errorf("request %s %s", r.method, r.path)
		}
		return r.body
	}
	for _, tt := range []struct {
		args  []string
		stdin string
		body  string
	}{
		{[]string{"L-1", "--status", "429", "--error-file", errFile}, "", `{"status":429,"error":` + geminiErr + `}`},
		{[]string{"--status", "429", "--error-file", "-", "L-1"}, geminiErr, `{"status":429,"error":` + geminiErr + `}`},
		{[]string{"L-1", "--status=502", "--error-file", htmlFile}, "", `{"status":502,"error":"<html>502 Bad Gateway</html>"}`},
		{[]string{"L-1", "--status", "200", "--prompt-tokens", "1800", "--output-tokens", "200"}, "", `{"status":200,"usage":{"prompt_tokens":1800,"output_tokens":200,"total_tokens":2000}}`},
		{[]string{"L-1", "--status", "0"}, "", `{"status":0}`},
		{[]string{"L-1", "--unused"}, "", `{"outcome":"unused","status":0}`},
	} {
		r := keyctl(t, nil, tt.stdin, append([]string{"--socket", f.sock, "report"}, tt.args...)...).want(t, 0)
		sameJSON(t, last(), tt.body)
		if r.stdout != "lease L-1 (key flash_01): rate_minute\naction: bucket proj-a/gemini-2.5-flash cooling for 1m0s\n" {
			t.Errorf("report %q: stdout = %q", tt.args, r.stdout)
		}
	}

	r := keyctl(t, nil, "", "--socket", f.sock, "report", "L-1", "--unused", "--json").want(t, 0)
	sameJSON(t, r.stdout, answer)

	f.on("POST", "/v1/leases/L-1/report", 200, `{"lease_id":"L-1","key_id":"flash_01","classification":"success","duplicate":true}`)
	r = keyctl(t, nil, "", "--socket", f.sock, "report", "L-1", "--status", "200").want(t, 0)
	contains(t, "duplicate", r.stdout, "lease L-1 (key flash_01): success\n", "already reported")

	r = keyctl(t, nil, "", "--socket", f.sock, "report", "L-1", "--status", "429", "--error-file", filepath.Join(dir, "missing")).want(t, exitError)
	contains(t, "stderr", r.stderr, "keyctl: --error-file: open ")
	f.on("POST", "/v1/leases/nope/report", 404, `{"error":{"code":"not_found","message":"lease nope is unknown or expired"}}`)
	r = keyctl(t, nil, "", "--socket", f.sock, "report", "nope", "--unused").want(t, exitError)
	if r.stderr != "keyctl: lease nope is unknown or expired\n" {
		t.Errorf("stderr = %q", r.stderr)
	}
}
