package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// permKeys has no access section: only root and keyd's own uid may lease.
const permKeys = `{"keys": [
  {"key_id": "k1", "model_name": "m", "rpm": 100, "tpm": 1000000}
]}
`

// permKeysLease grants uid %d the lease permission.
const permKeysLease = `{"keys": [
  {"key_id": "k1", "model_name": "m", "rpm": 100, "tpm": 1000000}
],
 "access": {"lease": {"uids": [%d]}}}
`

// TestSecondUIDPermissions runs keyd as root and keyctl as nobody: the
// socket's mode keeps nobody out until --socket-group lets it in; then
// nobody may read but not lease or administer, until the access section
// grants it lease (and still not admin).
func TestSecondUIDPermissions(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: runs keyd as root and keyctl as the user nobody")
	}
	nobody, err := user.Lookup("nobody")
	if err != nil {
		t.Skipf("needs the user nobody: %v", err)
	}
	uid64, err1 := strconv.ParseUint(nobody.Uid, 10, 32)
	gid64, err2 := strconv.ParseUint(nobody.Gid, 10, 32)
	if err := errors.Join(err1, err2); err != nil {
		t.Fatalf("user nobody: %v", err)
	}
	uid, gid := uint32(uid64), uint32(gid64)

	dir := t.TempDir() // keyd's files: root only
	cfg := filepath.Join(dir, "keys.json")
	env := filepath.Join(dir, "keyd.env")
	writeFile(t, cfg, permKeys)
	writeFile(t, env, "GEMINI_KEY_k1=AIzaFAKE-perm-k1-secret-0001\n")
	// The socket's directory must let nobody reach the socket.
	sockDir := shortTempDir(t, "kp")
	if err := os.Chmod(sockDir, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(sockDir, "s.sock")
	args := []string{"--config", cfg, "--env-file", env, "--state-dir", filepath.Join(dir, "state")}
	keyctlPath := keyctlForNobody(t)

	// asNobody runs keyctl as nobody, in a bare environment.
	asNobody := func(args ...string) (stdout, stderr string, code int) {
		t.Helper()
		cmd := exec.Command(keyctlPath, append([]string{"--socket", sock}, args...)...)
		cmd.Dir = "/"
		cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=/nonexistent", "GORACE=" + os.Getenv("GORACE")}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: []uint32{}}}
		var o, e bytes.Buffer
		cmd.Stdout, cmd.Stderr = &o, &e
		err := cmd.Run()
		var ee *exec.ExitError
		switch {
		case errors.As(err, &ee):
			code = ee.ExitCode()
		case err != nil:
			t.Fatalf("running keyctl as nobody: %v", err)
		}
		t.Logf("nobody$ keyctl %s: exit %d\n%s%s", strings.Join(args, " "), code, o.String(), e.String())
		return o.String(), e.String(), code
	}
	// asRoot runs keyctl as this test's user, root.
	asRoot := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("keyctl", append([]string{"--socket", sock}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("keyctl %s as root: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	want := func(what, s string, patterns ...string) {
		t.Helper()
		for _, p := range patterns {
			if !regexp.MustCompile(p).MatchString(s) {
				t.Errorf("%s does not match %q:\n%s", what, p, s)
			}
		}
	}

	// 1. The socket is 0660 root:root: nobody cannot even connect.
	k := startKeyd(t, sock, args...)
	checkSocket(t, sock, 0)
	_, stderr, code := asNobody("status")
	if code != 1 {
		t.Errorf("keyctl status as nobody on a root:root 0660 socket: exit %d, want 1", code)
	}
	want("keyctl status's stderr", stderr,
		`permission denied connecting to keyd's socket `+regexp.QuoteMeta(sock),
		`run as a member of the socket's group \(keyd --socket-group\) or as root`)
	k.stop()

	// 2. With --socket-group nobody's group, nobody connects: it may read,
	// not lease, not administer.
	k = startKeyd(t, sock, append(args, "--socket-group", strconv.Itoa(int(gid)))...)
	checkSocket(t, sock, gid)
	stdout, stderr, code := asNobody("status")
	if code != 0 {
		t.Errorf("keyctl status as nobody: exit %d, want 0 (any peer that connects may read)", code)
	}
	want("keyctl status's stdout", stdout, `(?m)^k1 +k1 +m +…0001 +ready`)
	if strings.Contains(stdout+stderr, "AIza") {
		t.Errorf("keyctl status shows a secret to nobody:\n%s", stdout)
	}
	stdout, stderr, code = asNobody("lease", "--model", "m")
	if code != 1 || stdout != "" {
		t.Errorf("keyctl lease as nobody without access: exit %d, stdout %q; want 1 and nothing", code, stdout)
	}
	forbidden := func(path, need string) []string {
		return []string{
			fmt.Sprintf(`uid %d may not %s \(not in access.lease or access.admin\)`, uid, path),
			fmt.Sprintf(`%s needs %s permission; add the uid or one of its groups to access\.%s in keys\.json`, path, need, need),
		}
	}
	want("keyctl lease's stderr", stderr, forbidden("/v1/leases", "lease")...)
	_, stderr, code = asNobody("reload")
	if code != 1 {
		t.Errorf("keyctl reload as nobody: exit %d, want 1", code)
	}
	want("keyctl reload's stderr", stderr, forbidden("/v1/reload", "admin")...)
	_, stderr, code = asNobody("disable", "k1")
	if code != 1 {
		t.Errorf("keyctl disable as nobody: exit %d, want 1", code)
	}
	want("keyctl disable's stderr", stderr, forbidden("/v1/keys/k1/disable", "admin")...)
	want("keyd's log", k.log.String(),
		fmt.Sprintf(`level=WARN msg="request denied" uid=%d pid=[0-9]+ path=/v1/leases need=lease why="not in access.lease or access.admin"`, uid),
		fmt.Sprintf(`level=WARN msg="request denied" uid=%d pid=[0-9]+ path=/v1/reload need=admin`, uid))

	// 3. access.lease grants nobody leases, by a reload as root; admin
	// stays root's.
	writeFile(t, cfg, fmt.Sprintf(permKeysLease, uid))
	want("keyctl reload as root", asRoot("reload"), `reloaded .*keys\.json: 1 key \(changed\)`)
	stdout, stderr, code = asNobody("lease", "--model", "m", "--json")
	if code != 0 {
		t.Fatalf("keyctl lease as nobody with access.lease: exit %d, want 0\n%s", code, stderr)
	}
	want("keyctl lease's stdout", stdout, `"key_id": "k1"`, `"secret": "AIzaFAKE-perm-k1-secret-0001"`)
	m := regexp.MustCompile(`"lease_id": "([^"]+)"`).FindStringSubmatch(stdout)
	if m == nil {
		t.Fatalf("no lease_id in keyctl lease --json:\n%s", stdout)
	}
	stdout, _, code = asNobody("report", m[1], "--status", "200")
	if code != 0 {
		t.Errorf("keyctl report as nobody with access.lease: exit %d, want 0", code)
	}
	want("keyctl report's stdout", stdout, `\(key k1\): success`)
	_, stderr, code = asNobody("reload")
	if code != 1 {
		t.Errorf("keyctl reload as nobody with only access.lease: exit %d, want 1", code)
	}
	want("keyctl reload's stderr", stderr,
		fmt.Sprintf(`uid %d may not /v1/reload \(access.lease.uids\): /v1/reload needs admin permission; add the uid or one of its groups to access\.admin in keys\.json`, uid))

	// 4. A group, by name, grants lease as well.
	grp, err := user.LookupGroupId(strconv.Itoa(int(gid)))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, cfg, fmt.Sprintf(`{"keys": [{"key_id": "k1", "model_name": "m", "rpm": 100, "tpm": 1000000}],
 "access": {"lease": {"groups": [%q]}}}`, grp.Name))
	want("keyctl reload as root", asRoot("reload"), `\(changed\)`)
	if _, stderr, code = asNobody("lease", "--model", "m"); code != 0 {
		t.Errorf("keyctl lease as nobody in access.lease.groups: exit %d, want 0\n%s", code, stderr)
	}

	// 5. access.admin: nobody may reload and disable, and lease (admin
	// implies lease).
	writeFile(t, cfg, fmt.Sprintf(`{"keys": [{"key_id": "k1", "model_name": "m", "rpm": 100, "tpm": 1000000}],
 "access": {"admin": {"uids": [%d]}}}`, uid))
	want("keyctl reload as root", asRoot("reload"), `\(changed\)`)
	if stdout, stderr, code = asNobody("reload"); code != 0 {
		t.Errorf("keyctl reload as nobody in access.admin.uids: exit %d, want 0\n%s", code, stderr)
	}
	want("keyctl reload's stdout", stdout, `reloaded .*keys\.json: 1 key \(unchanged`)
	if stdout, stderr, code = asNobody("disable", "k1"); code != 0 {
		t.Errorf("keyctl disable as nobody in access.admin.uids: exit %d, want 0\n%s", code, stderr)
	}
	want("keyctl disable's stdout", stdout, `^key k1: disabled\n$`)
	want("keyctl status's stdout", asRoot("status"), fmt.Sprintf(`(?m)^k1 .* disabled +[0-9]+ +disabled by admin uid %d$`, uid))
	if _, stderr, code = asNobody("enable", "k1"); code != 0 {
		t.Errorf("keyctl enable as nobody in access.admin.uids: exit %d, want 0\n%s", code, stderr)
	}
	if _, stderr, code = asNobody("lease", "--model", "m"); code != 0 {
		t.Errorf("keyctl lease as nobody in access.admin.uids: exit %d, want 0\n%s", code, stderr)
	}
	k.stop()
}

// checkSocket checks that the socket is mode 0660, owned by root and group gid.
func checkSocket(t *testing.T, sock string, gid uint32) {
	t.Helper()
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 || st.Uid != 0 || st.Gid != gid {
		t.Errorf("socket %s: mode %v, owner %d:%d; want a socket, 0660, 0:%d", sock, fi.Mode(), st.Uid, st.Gid, gid)
	}
}

// keyctlForNobody returns a keyctl that nobody can run. testscript's
// copies live in a directory only root can enter, so this copies one into
// a directory of mode 0755.
func keyctlForNobody(t *testing.T) string {
	t.Helper()
	src, err := exec.LookPath("keyctl")
	if err != nil {
		t.Fatal(err)
	}
	dir := shortTempDir(t, "kc")
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "keyctl")
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	return dst
}
