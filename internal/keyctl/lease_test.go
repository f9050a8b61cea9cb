package keyctl

import (
	"os/exec"
	"strings"
	"testing"
)

const leaseJSON = `{"lease_id":"L-1","key_id":"flash_01","project":"proj-a","model":"gemini-2.5-flash",
 "secret":"AIza'q\"$(touch /tmp/pwned) x","tokens":1500,"expires_at":"2026-11-29T10:10:00Z"}`

func TestLeaseRequest(t *testing.T) {
	f := newFake(t)
	f.on("POST", "/v1/leases", 200, leaseJSON)
	keyctl(t, nil, "", "--socket", f.sock, "lease", "--model", "gemini-2.5-flash", "--tokens", "1500",
		"--wait", "2.5s", "--workload", "light", "--client", "batch-7").want(t, 0)
	reqs := f.requests()
	sameJSON(t, reqs[len(reqs)-1].body, `{"model":"gemini-2.5-flash","tokens":1500,"workload_type":"light","wait_ms":2500,"client":"batch-7"}`)

	keyctl(t, nil, "", "lease", "--model=m", "--socket", f.sock).want(t, 0)
	reqs = f.requests()
	sameJSON(t, reqs[len(reqs)-1].body, `{"model":"m","client":"keyctl"}`)
}

func TestLeaseOutput(t *testing.T) {
	f := newFake(t)
	f.on("POST", "/v1/leases", 200, leaseJSON)
	secret := `AIza'q"$(touch /tmp/pwned) x`

	r := keyctl(t, nil, "", "--socket", f.sock, "lease", "--model", "m").want(t, 0)
	contains(t, "lease", r.stdout, "lease_id    L-1\n", "key_id      flash_01\n", "project     proj-a\n",
		"model       gemini-2.5-flash\n", "expires_at  2026-11-29T10:10:00Z (in 10m00s)\n", "secret      "+secret+"\n")
	contains(t, "lease stderr", r.stderr, "keyctl report L-1 --status")

	r = keyctl(t, nil, "", "--socket", f.sock, "lease", "--model", "m", "--json").want(t, 0)
	sameJSON(t, r.stdout, leaseJSON)

	r = keyctl(t, nil, "", "--socket", f.sock, "lease", "--model", "m", "--env").want(t, 0)
	want := `export GEMINI_API_KEY='AIza'\''q"$(touch /tmp/pwned) x'` + "\n" +
		"export KEYD_LEASE_ID='L-1'\n" +
		"export KEYD_KEY_ID='flash_01'\n"
	if r.stdout != want {
		t.Errorf("--env stdout =\n%s\nwant\n%s", r.stdout, want)
	}
	if r.stderr != "" {
		t.Errorf("--env stderr = %q, want nothing", r.stderr)
	}

	// What a shell makes of it.
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	out, err := exec.Command(sh, "-c", r.stdout+`printf '%s|%s|%s' "$GEMINI_API_KEY" "$KEYD_LEASE_ID" "$KEYD_KEY_ID"`).Output()
	if err != nil {
		t.Fatal(err)
	}
	if got := string(out); got != secret+"|L-1|flash_01" {
		t.Errorf("eval gives %q", got)
	}
}

func TestLeaseNoCapacity(t *testing.T) {
	f := newFake(t)
	f.on("POST", "/v1/leases", 429, `{"error":{"code":"no_capacity","message":"no key for gemini-2.5-flash has capacity: 2 cooling, 1 at RPM","retry_after_ms":2500}}`)
	r := keyctl(t, nil, "", "--socket", f.sock, "lease", "--model", "gemini-2.5-flash").want(t, exitNoCapacity)
	if want := "keyctl: no key for gemini-2.5-flash has capacity: 2 cooling, 1 at RPM (retry in 3s)\n"; r.stderr != want {
		t.Errorf("stderr = %q, want %q", r.stderr, want)
	}
	if r.stdout != "" {
		t.Errorf("stdout = %q", r.stdout)
	}

	f.on("POST", "/v1/leases", 429, `{"error":{"code":"no_capacity","message":"every bucket of m is disabled"}}`)
	r = keyctl(t, nil, "", "--socket", f.sock, "lease", "--model", "m", "--env").want(t, exitNoCapacity)
	if r.stderr != "keyctl: every bucket of m is disabled\n" {
		t.Errorf("stderr = %q", r.stderr)
	}

	// Other refusals are plain errors.
	f.on("POST", "/v1/leases", 404, `{"error":{"code":"unknown_model","message":"no key serves gemini-9: configured gemini-2.5-flash"}}`)
	r = keyctl(t, nil, "", "--socket", f.sock, "lease", "--model", "gemini-9").want(t, exitError)
	contains(t, "stderr", r.stderr, "keyctl: no key serves gemini-9")
	if strings.Contains(r.stderr, "usage:") {
		t.Errorf("an API error printed a usage hint: %q", r.stderr)
	}
}
