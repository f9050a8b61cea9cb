package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"
	"go.uber.org/goleak"

	"github.com/keyd/keyd/client"
	"github.com/keyd/keyd/internal/daemon"
	"github.com/keyd/keyd/internal/keyctl"
	"github.com/keyd/keyd/internal/testutil"
)

// TestMain makes this test binary keyd and keyctl too: testscript.Main
// copies it into a directory on $PATH under each command's name, and a run
// under one of those names is that command. Scripts and plain tests alike
// start them as real processes (exec.Command("keyd", ...)).
func TestMain(m *testing.M) {
	// Under -race every process sleeps 1 s at exit (atexit_sleep_ms) to
	// catch late races: for scores of short keyctl runs that is minutes.
	// Children inherit GORACE; testscript passes it on to scripts.
	if g := os.Getenv("GORACE"); !strings.Contains(g, "atexit_sleep_ms") {
		os.Setenv("GORACE", strings.TrimSpace(g+" atexit_sleep_ms=10"))
	}
	testscript.Main(leakCheck{m}, map[string]func(){
		"keyd":   func() { os.Exit(daemon.Main(os.Args[1:])) },
		"keyctl": func() { os.Exit(keyctl.Main(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)) },
	})
}

// leakCheck runs the tests, then fails the run if goroutines were left
// behind (goleak.VerifyTestMain would os.Exit before testscript cleans up
// its directory of binaries, so the check is done here instead).
type leakCheck struct{ m *testing.M }

func (l leakCheck) Run() int {
	code := l.m.Run()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: goroutines left after the tests: %v\n", err)
			return 1
		}
	}
	return code
}

// TestScripts runs testdata/script/*.txtar. Each script gets $SOCK, a
// socket path in a short directory of its own ($WORK may be too long for
// a socket address), and the commands keyd, keyctl, exitcode and
// stdout2env.
func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir:                 filepath.Join("testdata", "script"),
		RequireExplicitExec: true,
		RequireUniqueNames:  true,
		Setup: func(env *testscript.Env) error {
			dir, err := os.MkdirTemp("", "ks")
			if err != nil {
				return err
			}
			env.Defer(func() { os.RemoveAll(dir) })
			env.Setenv("SOCK", filepath.Join(dir, "s.sock"))
			return nil
		},
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			"exitcode":   cmdExitCode,
			"stdout2env": cmdStdoutToEnv,
		},
	})
}

// cmdExitCode is "exitcode N PROG [ARGS...]": run PROG like exec and
// require exit code N. Its stdout and stderr are then checked as exec's.
func cmdExitCode(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 2 {
		ts.Fatalf("usage: exitcode N PROG [ARGS...]")
	}
	want, err := strconv.Atoi(args[0])
	if err != nil {
		ts.Fatalf("exitcode: %q is not a number", args[0])
	}
	err = ts.Exec(args[1], args[2:]...)
	got := 0
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		got = ee.ExitCode()
	case err != nil:
		ts.Fatalf("exitcode: %v", err)
	}
	if got != want {
		ts.Fatalf("%s exited with code %d, want %d", args[1], got, want)
	}
}

// cmdStdoutToEnv is "stdout2env VAR REGEXP": set $VAR to the first
// submatch of REGEXP in the last command's stdout.
func cmdStdoutToEnv(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 2 {
		ts.Fatalf("usage: stdout2env VAR REGEXP")
	}
	re, err := regexp.Compile(`(?m)` + args[1])
	if err != nil {
		ts.Fatalf("stdout2env: %v", err)
	}
	m := re.FindStringSubmatch(ts.ReadFile("stdout"))
	if len(m) < 2 {
		ts.Fatalf("stdout2env: no match for %q in stdout", args[1])
	}
	ts.Setenv(args[0], m[1])
}

// keydProc is a keyd process started by a plain Go test.
type keydProc struct {
	t    testing.TB
	cmd  *exec.Cmd
	sock string
	log  *testutil.SyncBuffer // keyd's stderr: its log
	done chan struct{}
	err  error // cmd.Wait's, once done is closed
}

// startKeyd starts keyd with args plus --socket sock, and waits until it
// answers on sock. The process is killed at cleanup if still running.
func startKeyd(t testing.TB, sock string, args ...string) *keydProc {
	t.Helper()
	k := &keydProc{t: t, sock: sock, log: &testutil.SyncBuffer{}, done: make(chan struct{})}
	k.cmd = exec.Command("keyd", append(args, "--socket", sock)...)
	k.cmd.Stdout = k.log
	k.cmd.Stderr = k.log
	if err := k.cmd.Start(); err != nil {
		t.Fatalf("starting keyd: %v", err)
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
	c := client.New(sock)
	defer c.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	for {
		err := c.Wait(ctx)
		if err == nil {
			return k
		}
		select {
		case <-k.done:
			t.Fatalf("keyd exited before answering (%v); its log:\n%s", k.err, k.log)
		default:
		}
		if ctx.Err() != nil {
			t.Fatalf("keyd did not answer on %s: %v; its log:\n%s", sock, err, k.log)
		}
		time.Sleep(20 * time.Millisecond) // a poll, bounded by ctx
	}
}

// kill9 kills keyd with SIGKILL and waits for it to be gone.
func (k *keydProc) kill9() {
	k.t.Helper()
	if err := k.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		k.t.Fatalf("kill -9 keyd: %v", err)
	}
	<-k.done
}

// stop stops keyd with SIGINT, as systemd's SIGTERM would, and requires a
// clean exit within 15 s.
func (k *keydProc) stop() {
	k.t.Helper()
	if err := k.cmd.Process.Signal(os.Interrupt); err != nil {
		k.t.Fatalf("interrupting keyd: %v", err)
	}
	select {
	case <-k.done:
	case <-time.After(15 * time.Second):
		k.cmd.Process.Kill()
		<-k.done
		k.t.Fatalf("keyd did not stop within 15s of SIGINT; its log:\n%s", k.log)
	}
	if k.err != nil {
		k.t.Fatalf("keyd exited with %v after SIGINT; its log:\n%s", k.err, k.log)
	}
}

// shortTempDir makes a directory under os.TempDir with a short path, for
// sockets, removed at cleanup.
func shortTempDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func writeFile(t testing.TB, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}
