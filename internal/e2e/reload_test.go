package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/client"
	"github.com/keyd/keyd/internal/testutil"
)

// Reloads against a real keyd: the file watcher (internal/watch), SIGHUP
// and POST /v1/reload share one code path, so these tests mostly edit the
// files and let the watcher notice, the way an operator's edit would.
//
// The watcher waits for 100 ms of quiet after the last event before it
// reloads (daemon.watchDebounce), so a valid edit is in effect well within
// 1 s. The tests poll keyd's status and allow reloadBound for that, to
// absorb the noise of a loaded CI machine under -race: the bound says
// "it happened, promptly", not how fast; each poll logs the time it took.
// A directory that disappears is watched again by a retry once a second,
// so edits that replace the directory itself are seen within ~1.1 s.
const reloadBound = 3 * time.Second

// rig is a keyd started on a keys.json and a .env file that a test edits.
type rig struct {
	t    *testing.T
	cfg  string // keys.json, as keyd was given it
	env  string // the .env file, as keyd was given it
	args []string
	k    *keydProc
	c    *client.Client
}

// startRig starts keyd on cfg and env, which must exist, with its state and
// socket in directories of their own.
func startRig(t *testing.T, cfg, env string) *rig {
	t.Helper()
	sock := filepath.Join(shortTempDir(t, "krl"), "s.sock")
	args := []string{"--config", cfg, "--env-file", env, "--state-dir", filepath.Join(t.TempDir(), "state")}
	k := startKeyd(t, sock, args...)
	c := client.New(sock)
	t.Cleanup(c.CloseIdleConnections)
	r := &rig{t: t, cfg: cfg, env: env, args: args, k: k, c: c}
	r.awaitWatching()
	return r
}

// awaitWatching waits until keyd watches the directories of its files:
// keyd starts its watcher only after it serves, and an edit made before
// is missed (TestReloadEditDuringStart). It reads keyd's inotify watches
// in /proc/PID/fdinfo.
func (r *rig) awaitWatching() {
	r.t.Helper()
	dirs := map[string]bool{}
	for _, f := range []string{r.cfg, r.env} {
		abs, err := filepath.Abs(f)
		if err != nil {
			r.t.Fatal(err)
		}
		dirs[filepath.Dir(abs)] = true
	}
	pid := r.k.cmd.Process.Pid
	deadline := time.Now().Add(10 * time.Second)
	for inotifyWatches(pid) < len(dirs) {
		if time.Now().After(deadline) {
			r.t.Fatalf("keyd (pid %d) does not watch the %d directories of its files after 10 s; its log:\n%s", pid, len(dirs), r.k.log)
		}
		time.Sleep(time.Millisecond)
	}
}

// inotifyWatches counts the inotify watches process pid holds.
func inotifyWatches(pid int) int {
	fdDir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, _ := os.ReadDir(fdDir)
	n := 0
	for _, fd := range fds {
		if link, _ := os.Readlink(filepath.Join(fdDir, fd.Name())); link != "anon_inode:inotify" {
			continue
		}
		info, _ := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, fd.Name()))
		n += strings.Count(string(info), "inotify wd:")
	}
	return n
}

// restart stops keyd cleanly and starts it again on the same files,
// state and socket.
func (r *rig) restart() {
	r.t.Helper()
	r.c.CloseIdleConnections()
	r.k.stop()
	r.k = startKeyd(r.t, r.k.sock, r.args...)
	r.awaitWatching()
}

// fixture reads a Gemini error body of internal/gemini/testdata.
func fixture(t testing.TB, name string) rawJSON {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "gemini", "testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return rawJSON(b)
}

// newRig writes keys and secrets as keys.json and keyd.env in a fresh
// directory, and starts keyd on them.
func newRig(t *testing.T, keys, secrets string) *rig {
	t.Helper()
	dir := t.TempDir()
	cfg, env := filepath.Join(dir, "keys.json"), filepath.Join(dir, "keyd.env")
	writeFile(t, cfg, keys)
	writeFile(t, env, secrets)
	return startRig(t, cfg, env)
}

// oneKey is a keys.json of key a alone, in bucket p/m, with the given rpm.
func oneKey(rpm int) string {
	return fmt.Sprintf(`{"keys": [{"key_id": "a", "project": "p", "model_name": "m", "rpm": %d, "tpm": 1000000}]}`+"\n", rpm)
}

// ctx returns a context for one call to keyd.
func (r *rig) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	r.t.Cleanup(cancel)
	return ctx
}

func (r *rig) status() *api.Status {
	r.t.Helper()
	st, err := r.c.Status(r.ctx())
	if err != nil {
		r.t.Fatalf("status: %v; keyd's log:\n%s", err, r.k.log)
	}
	return st
}

func (r *rig) lease(model string) *api.Lease {
	r.t.Helper()
	l, err := r.c.Lease(r.ctx(), api.LeaseRequest{Model: model})
	if err != nil {
		r.t.Fatalf("lease %s: %v", model, err)
	}
	return l
}

// await polls status until cond holds, for at most reloadBound, and
// returns the status that satisfied it.
func (r *rig) await(what string, cond func(*api.Status) bool) *api.Status {
	r.t.Helper()
	start := time.Now()
	for {
		st := r.status()
		if cond(st) {
			r.t.Logf("%s: seen after %v", what, time.Since(start).Round(time.Millisecond))
			return st
		}
		if time.Since(start) > reloadBound {
			b, _ := json.MarshalIndent(st, "", "  ")
			r.t.Fatalf("%s: not seen within %v; status:\n%s\nkeyd's log:\n%s", what, reloadBound, b, r.k.log)
		}
		time.Sleep(10 * time.Millisecond) // a poll, bounded above
	}
}

// awaitRPM waits until bucket p/m has the rpm limit want.
func (r *rig) awaitRPM(want int64) *api.Status {
	r.t.Helper()
	return r.await(fmt.Sprintf("rpm %d in effect", want), func(st *api.Status) bool {
		b := bucketOf(st, "p", "m")
		return b != nil && b.RPM.Limit == want && st.Config.LastError == ""
	})
}

// awaitError waits until status shows a last reload error matching re.
func (r *rig) awaitError(re string) *api.Status {
	r.t.Helper()
	rx := regexp.MustCompile(re)
	return r.await("reload error "+re, func(st *api.Status) bool { return rx.MatchString(st.Config.LastError) })
}

func bucketOf(st *api.Status, project, model string) *api.BucketState {
	for i := range st.Buckets {
		if st.Buckets[i].Project == project && st.Buckets[i].Model == model {
			return &st.Buckets[i]
		}
	}
	return nil
}

func keyOf(st *api.Status, id string) *api.KeyStatus {
	for i := range st.Keys {
		if st.Keys[i].KeyID == id {
			return &st.Keys[i]
		}
	}
	return nil
}

// keyctl runs keyctl against r's keyd and returns its output and exit code.
func (r *rig) keyctl(args ...string) (stdout, stderr string, code int) {
	r.t.Helper()
	cmd := exec.Command("keyctl", append([]string{"--socket", r.k.sock}, args...)...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		r.t.Fatalf("keyctl %s: %v", strings.Join(args, " "), err)
	}
	return o.String(), e.String(), code
}

// writeAtomic replaces path the way editors save: a new file in the same
// directory, renamed over the old one.
func writeAtomic(t testing.TB, path, data string) {
	t.Helper()
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(data); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		t.Fatal(err)
	}
}

// TestReload edits keyd's files in every way an operator or a deployment
// does, and checks that keyd runs the new config promptly when it is
// valid, keeps the running one when it is not, and keeps watching.
func TestReload(t *testing.T) {
	const secrets = "GEMINI_KEY_a=AIzaFAKE-reload-a-0001\n"

	t.Run("atomic rename", func(t *testing.T) {
		t.Parallel()
		r := newRig(t, oneKey(10), secrets)
		writeAtomic(t, r.cfg, oneKey(11))
		r.awaitRPM(11)
		writeAtomic(t, r.cfg, oneKey(12))
		r.awaitRPM(12)
	})

	t.Run("in-place write", func(t *testing.T) {
		t.Parallel()
		r := newRig(t, oneKey(10), secrets)
		writeFile(t, r.cfg, oneKey(11)) // O_TRUNC, then write: same inode
		r.awaitRPM(11)
		writeFile(t, r.cfg, oneKey(12))
		r.awaitRPM(12)
	})

	t.Run("invalid then fixed", func(t *testing.T) {
		t.Parallel()
		r := newRig(t, oneKey(10), secrets)
		bad := `{"keys": [
  {"key_id": "a", "project": "p", "model_name": "m", "rpm": 20, "tpm": "lots"}
]}
`
		writeFile(t, r.cfg, bad)
		// file:line:column of the bad value, the way keyctl check says it.
		where := regexp.QuoteMeta(r.cfg) + `:2:72: key a: field "tpm": want a whole number, got string "lots"`
		st := r.awaitError(`^` + where + `$`)
		if b := bucketOf(st, "p", "m"); b == nil || b.RPM.Limit != 10 {
			t.Errorf("after a bad edit the running config should stay (rpm 10); bucket %+v", b)
		}
		if l := r.lease("m"); l.KeyID != "a" {
			t.Errorf("the running config should still serve m: %+v", l)
		}
		// The log names the same place (its quotes escaped, as slog does).
		logged := `level=ERROR msg="reload failed; the running configuration stays" err="` + strings.ReplaceAll(where, `"`, `\\"`) + `"`
		if !regexp.MustCompile(logged).MatchString(r.k.log.String()) {
			t.Errorf("keyd's log lacks the reload error at file:line:column:\n%s", r.k.log)
		}
		// keyctl status shows it, in text and JSON.
		out, errOut, code := r.keyctl("status")
		if code != 0 || !regexp.MustCompile(`(?m)^LAST ERROR \(keyd kept the config above\):\n  `+where+`$`).MatchString(out) {
			t.Errorf("keyctl status (exit %d) does not show the reload error:\n%s%s", code, out, errOut)
		}
		out, _, _ = r.keyctl("status", "--json")
		var js api.Status
		if err := json.Unmarshal([]byte(out), &js); err != nil || !regexp.MustCompile(`^`+where+`$`).MatchString(js.Config.LastError) {
			t.Errorf("keyctl status --json: config.last_error is %q (%v); want the error at file:line:column", js.Config.LastError, err)
		}
		// keyctl reload reloads the same bad file: it fails, exit 1, saying why.
		out, errOut, code = r.keyctl("reload")
		if code != 1 || out != "" || !regexp.MustCompile(`^keyctl: reload failed, the running configuration stays: `+where+"\n$").MatchString(errOut) {
			t.Errorf("keyctl reload on a bad file: exit %d, stdout %q, stderr %q; want exit 1 and the error at file:line:column", code, out, errOut)
		}

		// A bad write: the editor's first half, then, after the watcher
		// has reloaded the half, the rest.
		good := oneKey(13)
		writeFile(t, r.cfg, good[:len(good)/2])
		r.awaitError(`^` + regexp.QuoteMeta(r.cfg) + `:1:\d+: invalid JSON: the file ends early`)
		f, err := os.OpenFile(r.cfg, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteString(good[len(good)/2:])
		f.Close()
		r.awaitRPM(13) // also: last_error is cleared
		out, _, code = r.keyctl("status")
		if code != 0 || strings.Contains(out, "LAST ERROR") {
			t.Errorf("keyctl status still shows an error after the fix (exit %d):\n%s", code, out)
		}
		out, errOut, code = r.keyctl("reload")
		if code != 0 || !strings.Contains(out, "unchanged") {
			t.Errorf("keyctl reload of the fixed file: exit %d: %s%s", code, out, errOut)
		}
	})

	t.Run("delete then recreate", func(t *testing.T) {
		t.Parallel()
		r := newRig(t, oneKey(10), secrets)
		if err := os.Remove(r.cfg); err != nil {
			t.Fatal(err)
		}
		r.awaitError(`^config file ` + regexp.QuoteMeta(r.cfg) + ` does not exist`)
		if l := r.lease("m"); l.KeyID != "a" {
			t.Errorf("with keys.json gone the running config should still serve: %+v", l)
		}
		writeFile(t, r.cfg, oneKey(14))
		r.awaitRPM(14)
		// And once more, to show the watcher is still there.
		os.Remove(r.cfg)
		r.awaitError(`does not exist`)
		writeAtomic(t, r.cfg, oneKey(15))
		r.awaitRPM(15)
	})

	t.Run("kubernetes configmap symlink swap", func(t *testing.T) {
		t.Parallel()
		// A ConfigMap volume: keys.json -> ..data/keys.json, ..data -> a
		// timestamped directory. An update writes a new directory and
		// renames a new ..data symlink over the old one; keys.json, the
		// path keyd was given, never changes.
		dir := t.TempDir()
		mount := filepath.Join(dir, "config")
		version := func(n int, keys string) {
			v := fmt.Sprintf("..2026_01_0%d_00_00_00.%d", n, n)
			if err := os.MkdirAll(filepath.Join(mount, v), 0o755); err != nil {
				t.Fatal(err)
			}
			writeFile(t, filepath.Join(mount, v, "keys.json"), keys)
			tmp := filepath.Join(mount, "..data_tmp")
			if err := os.Symlink(v, tmp); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(tmp, filepath.Join(mount, "..data")); err != nil {
				t.Fatal(err)
			}
			if n > 1 {
				old := fmt.Sprintf("..2026_01_0%d_00_00_00.%d", n-1, n-1)
				if err := os.RemoveAll(filepath.Join(mount, old)); err != nil {
					t.Fatal(err)
				}
			}
		}
		version(1, oneKey(10))
		if err := os.Symlink(filepath.Join("..data", "keys.json"), filepath.Join(mount, "keys.json")); err != nil {
			t.Fatal(err)
		}
		env := filepath.Join(dir, "keyd.env")
		writeFile(t, env, secrets)
		r := startRig(t, filepath.Join(mount, "keys.json"), env)
		version(2, oneKey(11))
		r.awaitRPM(11)
		version(3, oneKey(12))
		r.awaitRPM(12)
	})

	t.Run("directory replaced", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		conf := filepath.Join(dir, "conf")
		os.Mkdir(conf, 0o755)
		cfg, env := filepath.Join(conf, "keys.json"), filepath.Join(conf, "keyd.env")
		writeFile(t, cfg, oneKey(10))
		writeFile(t, env, secrets)
		r := startRig(t, cfg, env)

		// A deploy that builds the new directory beside the old one and
		// swaps them with two renames.
		next := filepath.Join(dir, "conf.next")
		os.Mkdir(next, 0o755)
		writeFile(t, filepath.Join(next, "keys.json"), oneKey(11))
		writeFile(t, filepath.Join(next, "keyd.env"), secrets)
		if err := os.Rename(conf, filepath.Join(dir, "conf.old")); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(next, conf); err != nil {
			t.Fatal(err)
		}
		os.RemoveAll(filepath.Join(dir, "conf.old"))
		r.awaitRPM(11)
		// A later edit in the new directory is seen too: at the latest
		// when the watcher's once-a-second retry has watched it.
		writeAtomic(t, cfg, oneKey(12))
		r.awaitRPM(12)

		// rm -rf and recreate.
		if err := os.RemoveAll(conf); err != nil {
			t.Fatal(err)
		}
		time.Sleep(150 * time.Millisecond) // let the watcher see it gone
		os.Mkdir(conf, 0o755)
		writeFile(t, env, secrets)
		writeFile(t, cfg, oneKey(13))
		r.awaitRPM(13)
		writeFile(t, cfg, oneKey(14))
		r.awaitRPM(14)
	})

	t.Run("env change picks up new secrets", func(t *testing.T) {
		t.Parallel()
		// The .env file lives in another directory than keys.json (as
		// /etc/keyd/keyd.env might): both are watched.
		cfg := filepath.Join(t.TempDir(), "keys.json")
		env := filepath.Join(t.TempDir(), "keyd.env")
		writeFile(t, cfg, `{"keys": [
  {"key_id": "a", "project": "p", "model_name": "m", "rpm": 100, "tpm": 1000000},
  {"key_id": "b", "project": "q", "model_name": "m", "rpm": 100, "tpm": 1000000}
]}
`)
		writeFile(t, env, "GEMINI_KEY_a=AIzaFAKE-env-a-0001\n")
		r := startRig(t, cfg, env)
		if k := keyOf(r.status(), "b"); k == nil || k.State != api.StateNoSecret {
			t.Fatalf("key b without a secret: %+v", k)
		}
		writeAtomic(t, env, "GEMINI_KEY_a=AIzaFAKE-env-a-0002\nGEMINI_KEY_b=AIzaFAKE-env-b-0003\n")
		r.await("new secret of a, first secret of b", func(st *api.Status) bool {
			a, b := keyOf(st, "a"), keyOf(st, "b")
			return a.SecretHint == "…0002" && b.State == api.StateReady && b.SecretHint == "…0003"
		})
		seen := map[string]string{}
		for range 2 {
			l := r.lease("m")
			seen[l.KeyID] = l.Secret
		}
		if seen["a"] != "AIzaFAKE-env-a-0002" || seen["b"] != "AIzaFAKE-env-b-0003" {
			t.Errorf("leases after the .env change carry %v; want the new secrets", seen)
		}
		// In place, too.
		writeFile(t, env, "GEMINI_KEY_a=AIzaFAKE-env-a-0004\nGEMINI_KEY_b=AIzaFAKE-env-b-0003\n")
		r.await("secret of a written in place", func(st *api.Status) bool { return keyOf(st, "a").SecretHint == "…0004" })
		// A .env that does not parse is a failed reload: the secrets stay.
		writeFile(t, env, "GEMINI_KEY_a=\"AIzaFAKE-env-a-0005\n")
		r.awaitError(`\.env file ` + regexp.QuoteMeta(env) + `: line 1 does not parse`)
		if strings.Contains(r.k.log.String(), "AIzaFAKE") {
			t.Errorf("keyd logged a secret:\n%s", r.k.log)
		}
		if k := keyOf(r.status(), "a"); k.SecretHint != "…0004" || k.State != api.StateReady {
			t.Errorf("after a bad .env key a should keep its secret: %+v", k)
		}
	})

	t.Run("key disabled as invalid is re-enabled by a new secret", func(t *testing.T) {
		t.Parallel()
		r := newRig(t, oneKey(100), secrets)
		l := r.lease("m")
		rep, err := r.c.Report(r.ctx(), l.LeaseID, api.ReportRequest{Status: 400, Error: fixture(t, "400_api_key_invalid.json")})
		if err != nil || rep.Classification != api.ClassKeyInvalid {
			t.Fatalf("report of API_KEY_INVALID: %+v, %v", rep, err)
		}
		if k := keyOf(r.status(), "a"); k.State != api.StateDisabled {
			t.Fatalf("key a after API_KEY_INVALID: %+v", k)
		}
		// A reload that leaves the secret alone leaves the key disabled.
		writeAtomic(t, r.cfg, oneKey(101))
		st := r.awaitRPM(101)
		if k := keyOf(st, "a"); k.State != api.StateDisabled {
			t.Errorf("a reload with the same secret re-enabled the invalid key: %+v", k)
		}
		// The same secret rewritten (same bytes): still disabled.
		writeAtomic(t, r.env, secrets)
		writeAtomic(t, r.cfg, oneKey(102))
		st = r.awaitRPM(102)
		if k := keyOf(st, "a"); k.State != api.StateDisabled {
			t.Errorf("rewriting the same secret re-enabled the invalid key: %+v", k)
		}
		// A new secret lifts it.
		writeAtomic(t, r.env, "GEMINI_KEY_a=AIzaFAKE-reload-a-0002\n")
		r.await("key a re-enabled by its new secret", func(st *api.Status) bool {
			k := keyOf(st, "a")
			return k.State == api.StateReady && k.SecretHint == "…0002"
		})
		if l := r.lease("m"); l.Secret != "AIzaFAKE-reload-a-0002" {
			t.Errorf("lease after the new secret: %+v", l)
		}
		if !strings.Contains(r.k.log.String(), `msg="key re-enabled: its secret changed" key=a`) {
			t.Errorf("keyd's log does not say why key a came back:\n%s", r.k.log)
		}
		// The store forgot the verdict: a restart keeps the key enabled.
		r.restart()
		if k := keyOf(r.status(), "a"); k.State != api.StateReady {
			t.Errorf("key a after a restart: %+v", k)
		}
	})

	t.Run("reload keeps state", func(t *testing.T) {
		t.Parallel()
		r := newRig(t, `{"keys": [
  {"key_id": "a", "project": "p", "model_name": "m", "rpm": 10, "rpd": 100, "tpm": 1000000},
  {"key_id": "b", "project": "q", "model_name": "m", "rpm": 10, "rpd": 100, "tpm": 1000000}
]}
`, "GEMINI_KEY_a=AIzaFAKE-keep-a\nGEMINI_KEY_b=AIzaFAKE-keep-b\n")
		var leases []*api.Lease
		for range 4 {
			leases = append(leases, r.lease("m"))
		}
		// A per-minute 429 on one bucket cools it.
		var cooled *api.Lease
		for _, l := range leases {
			if l.KeyID == "a" {
				cooled = l
				break
			}
		}
		rep, err := r.c.Report(r.ctx(), cooled.LeaseID, api.ReportRequest{Status: 429, Error: fixture(t, "429_paid_rpm.json")})
		if err != nil || rep.Classification != api.ClassRateMinute {
			t.Fatalf("report 429: %+v %v", rep, err)
		}
		before := r.status()
		// Change b's limits and add a key: p/m and q/m both stay.
		writeAtomic(t, r.cfg, `{"keys": [
  {"key_id": "a", "project": "p", "model_name": "m", "rpm": 10, "rpd": 100, "tpm": 1000000},
  {"key_id": "b", "project": "q", "model_name": "m", "rpm": 20, "rpd": 200, "tpm": 1000000},
  {"key_id": "c", "project": "r", "model_name": "m", "rpm": 10, "tpm": 1000000}
]}
`)
		after := r.await("key c added", func(st *api.Status) bool { return len(st.Keys) == 3 })
		for _, p := range []string{"p", "q"} {
			b0, b1 := bucketOf(before, p, "m"), bucketOf(after, p, "m")
			if b1.RPM.Used != b0.RPM.Used || b1.RPD.Used != b0.RPD.Used || b1.TPM.Used != b0.TPM.Used || b1.InFlight != b0.InFlight || b1.State != b0.State {
				t.Errorf("bucket %s/m changed in a reload: before %+v, after %+v", p, b0, b1)
			}
		}
		if b := bucketOf(after, "q", "m"); b.RPM.Limit != 20 || b.RPD.Limit != 200 {
			t.Errorf("bucket q/m: new limits not in effect: %+v", b)
		}
		if b := bucketOf(after, "p", "m"); b.State != api.StateCooling {
			t.Errorf("bucket p/m lost its cooldown in the reload: %+v", b)
		}
		// Leases open before the reload are reported as usual.
		for _, l := range leases {
			if l == cooled {
				continue
			}
			if _, err := r.c.Report(r.ctx(), l.LeaseID, api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: 5}}); err != nil {
				t.Errorf("report of lease %s, open across the reload: %v", l.LeaseID, err)
			}
		}
	})

	t.Run("raised limit wakes waiters", func(t *testing.T) {
		t.Parallel()
		r := newRig(t, oneKey(1), secrets)
		r.lease("m") // the minute's one request
		got := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			_, err := r.c.Lease(ctx, api.LeaseRequest{Model: "m", WaitMS: 15000})
			got <- err
		}()
		time.Sleep(100 * time.Millisecond) // the request waits (its window frees in 60 s)
		start := time.Now()
		writeAtomic(t, r.cfg, oneKey(2))
		select {
		case err := <-got:
			if err != nil {
				t.Fatalf("the waiting lease failed: %v", err)
			}
			t.Logf("the waiter was granted %v after the write", time.Since(start).Round(time.Millisecond))
		case <-time.After(reloadBound):
			t.Fatalf("a raised limit did not reach the waiting request within %v; keyd's log:\n%s", reloadBound, r.k.log)
		}
	})
}

// TestReloadKeyRemovedWithOpenLease removes a key from keys.json while
// leases on it are open: it gets no new lease, its open leases are
// reported as usual (and still count), and status lists it no more.
func TestReloadKeyRemovedWithOpenLease(t *testing.T) {
	t.Parallel()
	two := `{"keys": [
  {"key_id": "a", "project": "p", "model_name": "m", "rpm": 100, "tpm": 1000000, "priority": 9},
  {"key_id": "b", "project": "q", "model_name": "m", "rpm": 100, "tpm": 1000000},
  {"key_id": "c", "project": "r", "model_name": "m2", "rpm": 100, "tpm": 1000000}
]}
`
	r := newRig(t, two, "GEMINI_KEY_a=AIzaFAKE-rm-a\nGEMINI_KEY_b=AIzaFAKE-rm-b\nGEMINI_KEY_c=AIzaFAKE-rm-c\n")
	la1, la2, lc := r.lease("m"), r.lease("m"), r.lease("m2")
	if la1.KeyID != "a" || la2.KeyID != "a" || lc.KeyID != "c" {
		t.Fatalf("leases before the removal: %s %s %s; want a (priority 9), a, c", la1.KeyID, la2.KeyID, lc.KeyID)
	}
	// Remove a and c, the only key of m2.
	writeAtomic(t, r.cfg, `{"keys": [
  {"key_id": "b", "project": "q", "model_name": "m", "rpm": 100, "tpm": 1000000}
]}
`)
	st := r.await("keys a and c removed", func(st *api.Status) bool { return len(st.Keys) == 1 })
	if len(st.Buckets) != 1 || st.Buckets[0].Project != "q" {
		t.Errorf("buckets after the removal: %+v", st.Buckets)
	}
	for range 5 {
		if l := r.lease("m"); l.KeyID != "b" {
			t.Fatalf("a removed key was leased: %+v", l)
		}
	}
	if _, err := r.c.Lease(r.ctx(), api.LeaseRequest{Model: "m2"}); !client.IsUnknownModel(err) {
		t.Errorf("lease of m2, whose only key was removed: %v; want unknown_model", err)
	}
	if _, _, code := r.keyctl("disable", "a"); code != 1 {
		t.Errorf("keyctl disable of a removed key: exit %d, want 1 (not configured)", code)
	}
	for _, tc := range []struct {
		l   *api.Lease
		rep api.ReportRequest
	}{
		{la1, api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: 10}}},
		{la2, api.ReportRequest{Status: 429, Error: fixture(t, "429_paid_rpm.json")}},
		{lc, api.ReportRequest{Outcome: api.OutcomeUnused}},
	} {
		rep, err := r.c.Report(r.ctx(), tc.l.LeaseID, tc.rep)
		if err != nil || rep.KeyID != tc.l.KeyID || rep.Duplicate {
			t.Errorf("report of lease %s on removed key %s: %+v, %v", tc.l.LeaseID, tc.l.KeyID, rep, err)
		}
		if _, err := r.c.Health(r.ctx()); err != nil {
			t.Fatalf("keyd stopped answering after a report on a removed key: %v", err)
		}
	}
	// Reports on removed keys touch nothing in the config in effect.
	st = r.status()
	if len(st.Keys) != 1 || st.Keys[0].State != api.StateReady || st.Buckets[0].State != api.StateReady {
		t.Errorf("status after reports on removed keys: %+v", st)
	}
}

// TestReloadKeyReaddedKeepsState removes a key from keys.json and adds it
// back within the minute (an edit with a typo, then its fix; a key
// rotated out and back). What its bucket and the key went through is
// still true: the bucket's grants of the last 60 s were sent to Gemini,
// whose quota remembers them, a cooldown Gemini asked for still runs, and
// a secret Gemini called invalid still is. keyd's store still holds all
// of it, so a restart brings it back; a reload must not forget it either.
func TestReloadKeyReaddedKeepsState(t *testing.T) {
	t.Parallel()
	const both = `{"keys": [
  {"key_id": "a", "project": "p", "model_name": "m", "rpm": 3, "rpd": 50, "tpm": 1000000},
  {"key_id": "b", "project": "q", "model_name": "m", "rpm": 3, "rpd": 50, "tpm": 1000000}
]}
`
	const onlyB = `{"keys": [
  {"key_id": "b", "project": "q", "model_name": "m", "rpm": 3, "rpd": 50, "tpm": 1000000}
]}
`
	const secrets = "GEMINI_KEY_a=AIzaFAKE-readd-a\nGEMINI_KEY_b=AIzaFAKE-readd-b\n"
	// removeAndReadd drops key a from keys.json, then puts it back, and
	// returns the status once it is back. No lease of a is open meanwhile.
	removeAndReadd := func(r *rig) *api.Status {
		writeAtomic(t, r.cfg, onlyB)
		r.await("key a removed", func(st *api.Status) bool { return len(st.Keys) == 1 })
		writeAtomic(t, r.cfg, both)
		return r.await("key a back", func(st *api.Status) bool { return len(st.Keys) == 2 })
	}
	// leaseA takes a lease on key a (b is used up or gets the other half).
	leaseA := func(r *rig) *api.Lease {
		for range 4 {
			if l := r.lease("m"); l.KeyID == "a" {
				return l
			}
		}
		t.Fatal("no lease on key a in 4 tries")
		return nil
	}

	t.Run("window and day count", func(t *testing.T) {
		t.Parallel()
		r := newRig(t, both, secrets)
		n := 0
		for range 6 {
			l := r.lease("m")
			if l.KeyID == "a" {
				n++
			}
			if _, err := r.c.Report(r.ctx(), l.LeaseID, api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: 1}}); err != nil {
				t.Fatal(err)
			}
		}
		if b := bucketOf(r.status(), "p", "m"); n != 3 || b.RPM.Used != 3 || b.RPD.Used != 3 {
			t.Fatalf("bucket p/m before the edit: %d grants on a, %+v; want rpm 3/3, rpd 3/50", n, b)
		}
		st := removeAndReadd(r)
		if b := bucketOf(st, "p", "m"); b.RPM.Used != 3 || b.RPD.Used != 3 {
			t.Errorf("bucket p/m after key a came back within the minute: rpm %d/%d, rpd %d/%d used; want rpm 3/3, rpd 3/50: "+
				"its grants were forgotten", b.RPM.Used, b.RPM.Limit, b.RPD.Used, b.RPD.Limit)
		}
		if l, err := r.c.Lease(r.ctx(), api.LeaseRequest{Model: "m"}); err == nil {
			t.Errorf("a 7th lease in the minute was granted, on key %s: bucket p/m (rpm 3) granted 4 in 60 s", l.KeyID)
		}
		r.restart()
		if b := bucketOf(r.status(), "p", "m"); b.RPM.Used < 3 {
			t.Errorf("after a restart, bucket p/m: %+v", b)
		}
	})

	t.Run("cooldown", func(t *testing.T) {
		t.Parallel()
		r := newRig(t, both, secrets)
		l := leaseA(r)
		if rep, err := r.c.Report(r.ctx(), l.LeaseID, api.ReportRequest{Status: 429, Error: fixture(t, "429_paid_rpm.json")}); err != nil || rep.Classification != api.ClassRateMinute {
			t.Fatalf("report 429: %+v %v", rep, err)
		}
		if b := bucketOf(r.status(), "p", "m"); b.State != api.StateCooling {
			t.Fatalf("bucket p/m after a per-minute 429: %+v", b)
		}
		st := removeAndReadd(r)
		if b := bucketOf(st, "p", "m"); b.State != api.StateCooling {
			t.Errorf("bucket p/m lost the cooldown Gemini asked for (retryDelay 34s) when key a was removed and re-added: %+v", b)
		}
		r.restart()
		if b := bucketOf(r.status(), "p", "m"); b.State != api.StateCooling {
			t.Errorf("after a restart, bucket p/m: %+v", b)
		}
	})

	t.Run("disabled as invalid", func(t *testing.T) {
		t.Parallel()
		r := newRig(t, both, secrets)
		l := leaseA(r)
		if rep, err := r.c.Report(r.ctx(), l.LeaseID, api.ReportRequest{Status: 400, Error: fixture(t, "400_api_key_invalid.json")}); err != nil || rep.Classification != api.ClassKeyInvalid {
			t.Fatalf("report API_KEY_INVALID: %+v %v", rep, err)
		}
		st := removeAndReadd(r) // with the same secret
		if k := keyOf(st, "a"); k.State != api.StateDisabled {
			t.Errorf("key a, disabled as invalid, came back %s when removed and re-added with the same secret; "+
				"the store still disables it, so a restart flips it back", k.State)
		}
		r.restart()
		if k := keyOf(r.status(), "a"); k.State != api.StateDisabled {
			t.Errorf("after a restart, key a: %+v", k)
		}
	})
}

// TestReloadLimitLoweredUnderLoad lowers a bucket's rpm from 1000 to 5
// while workers lease from it as fast as they can. From the moment status
// shows the new limit, no lease request may be granted: the window keeps
// the grants already in it, and they are far over 5.
func TestReloadLimitLoweredUnderLoad(t *testing.T) {
	r := newRig(t, oneKey(1000), "GEMINI_KEY_a=AIzaFAKE-lower-a-0001\n")
	// observed is when the new limit was first seen in status, as
	// UnixNano; zero before.
	var observed atomic.Int64
	type grant struct{ sent, got time.Time }
	var mu sync.Mutex
	var grants []grant
	var other []error
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			for {
				select {
				case <-stop:
					return
				default:
				}
				sent := time.Now()
				_, err := r.c.Lease(ctx, api.LeaseRequest{Model: "m", Tokens: 1, Client: fmt.Sprintf("lower-w%d", w)})
				if _, ok := client.IsNoCapacity(err); ok {
					time.Sleep(time.Millisecond)
					continue
				}
				mu.Lock()
				if err != nil {
					other = append(other, err)
				} else {
					grants = append(grants, grant{sent, time.Now()})
				}
				mu.Unlock()
				if err != nil {
					return
				}
			}
		})
	}
	time.Sleep(300 * time.Millisecond) // the load runs
	mu.Lock()
	before := len(grants)
	mu.Unlock()
	writeAtomic(t, r.cfg, oneKey(5))
	st := r.awaitRPM(5)
	observed.Store(time.Now().UnixNano())
	used := bucketOf(st, "p", "m").RPM.Used
	time.Sleep(2 * time.Second) // the load goes on under the new limit
	close(stop)
	wg.Wait()
	end := bucketOf(r.status(), "p", "m")

	if len(other) > 0 {
		t.Fatalf("lease errors other than no_capacity: %v", other)
	}
	if before < 5 || used < 5 {
		t.Fatalf("only %d grants before the edit (%d in the window at the reload): the load did not load", before, used)
	}
	obs := time.Unix(0, observed.Load())
	late := 0
	for _, g := range grants {
		if g.sent.After(obs) {
			late++
		}
	}
	t.Logf("%d grants before the edit, %d in the window when rpm 5 was seen, %d in all; %d requested after", before, used, len(grants), late)
	if late > 0 {
		t.Errorf("%d leases requested after status showed rpm 5 were granted, with %d grants already in the window", late, used)
	}
	if end.RPM.Used != used {
		t.Errorf("rpm used went from %d to %d under the lowered limit of 5", used, end.RPM.Used)
	}
}

// TestReloadSymlinkedDirSwap gives keyd its config through a symlinked
// directory, current -> releases/1, and deploys the next release the way
// Capistrano or `ln -sfn` does: a new symlink renamed over current, the
// old release kept for rollback. Nothing in releases/1, the directory the
// watcher resolved at start, changes; the change is in current's parent.
// The new config must still be seen, as the ConfigMap swap is.
func TestReloadSymlinkedDirSwap(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	for i, rpm := range []int{10, 11} {
		d := filepath.Join(dir, "releases", fmt.Sprint(i+1))
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(d, "keys.json"), oneKey(rpm))
		writeFile(t, filepath.Join(d, "keyd.env"), "GEMINI_KEY_a=AIzaFAKE-release-a\n")
	}
	current := filepath.Join(dir, "current")
	if err := os.Symlink(filepath.Join("releases", "1"), current); err != nil {
		t.Fatal(err)
	}
	r := startRig(t, filepath.Join(current, "keys.json"), filepath.Join(current, "keyd.env"))
	if err := os.Symlink(filepath.Join("releases", "2"), current+".tmp"); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(current+".tmp", current); err != nil {
		t.Fatal(err)
	}
	r.awaitRPM(11)
}

// TestReloadEditDuringStart edits keys.json at the moment keyd has loaded
// it (its log says "config loaded"), while keyd is still opening its store
// and socket. The edit must be in effect once keyd is up: a config
// manager that writes the file as the service starts, or just after
// systemd saw READY=1, must not have its edit ignored until the next one.
func TestReloadEditDuringStart(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cfg, env := filepath.Join(dir, "keys.json"), filepath.Join(dir, "keyd.env")
	writeFile(t, cfg, oneKey(10))
	writeFile(t, env, "GEMINI_KEY_a=AIzaFAKE-start-a\n")
	sock := filepath.Join(shortTempDir(t, "kes"), "s.sock")
	k := &keydProc{t: t, sock: sock, log: &testutil.SyncBuffer{}, done: make(chan struct{})}
	k.cmd = exec.Command("keyd", "--config", cfg, "--env-file", env, "--state-dir", filepath.Join(dir, "state"), "--socket", sock)
	k.cmd.Stdout, k.cmd.Stderr = k.log, k.log
	if err := k.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		k.err = k.cmd.Wait()
		close(k.done)
	}()
	t.Cleanup(func() {
		select {
		case <-k.done:
		default:
			k.cmd.Process.Kill()
			<-k.done
		}
	})
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(k.log.String(), `msg="config loaded"`) {
		if time.Now().After(deadline) {
			t.Fatalf("keyd never loaded its config; its log:\n%s", k.log)
		}
		time.Sleep(50 * time.Microsecond) // a tight poll: the window is short
	}
	writeFile(t, cfg, oneKey(11))
	c := client.New(sock)
	t.Cleanup(c.CloseIdleConnections)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := c.Wait(ctx); err != nil {
		t.Fatalf("keyd did not come up: %v; its log:\n%s", err, k.log)
	}
	r := &rig{t: t, cfg: cfg, env: env, k: k, c: c}
	r.awaitRPM(11)
}
