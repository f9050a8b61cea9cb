package keyctl

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/client"
)

// Exit codes of keyctl run besides the command's own.
const (
	exitCannotRun = 127 // CMD could not start (as a shell's "command not found")
	exitSignal    = 128 // + N: CMD, or keyctl before CMD started, died of signal N
)

// forwarded are the signals keyctl run passes on to CMD. While CMD runs,
// keyctl itself ignores them otherwise: it must outlive CMD to report.
var forwarded = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT}

// notifySignals and stopSignals are signal.Notify and signal.Stop; tests
// replace them to send signals without signalling the test process.
var (
	notifySignals = func(c chan<- os.Signal) { signal.Notify(c, forwarded...) }
	stopSignals   = func(c chan<- os.Signal) { signal.Stop(c) }
)

// inTerminalForeground reports whether keyctl's process group is the
// foreground group of its controlling terminal: then the terminal sends
// Ctrl-C and Ctrl-\ to CMD (in the same group) directly. A variable for
// tests.
var inTerminalForeground = func() bool {
	tty, err := os.Open("/dev/tty")
	if err != nil {
		return false // no controlling terminal
	}
	defer tty.Close()
	pgrp, err := unix.IoctlGetInt(int(tty.Fd()), unix.TIOCGPGRP)
	return err == nil && pgrp == unix.Getpgrp()
}

var runCmd = &command{
	name:    "run",
	args:    "--model M [--tokens N] [--wait D] [--workload W] [--client NAME] [--] CMD [ARGS...]",
	short:   "lease a key, run a command with it in GEMINI_API_KEY, report by its exit status",
	rawArgs: true,
	long: `Run leases a key for one call to the model, runs CMD with the lease in its
environment, reports the outcome when CMD exits, and exits with CMD's exit
status. keyctl's flags come before CMD; everything from CMD on (or after
"--") is CMD's. CMD's environment is keyctl's plus:
  GEMINI_API_KEY  the key's secret (also GOOGLE_API_KEY, when that is set:
                  the Google SDKs prefer it to GEMINI_API_KEY)
  KEYD_LEASE_ID   the lease, for 'keyctl report "$KEYD_LEASE_ID" ...'
  KEYD_KEY_ID     the key's id
  KEYD_MODEL      the model
  KEYD_SOCKET     keyd's socket, so that a keyctl run by CMD finds this keyd
CMD's stdin, stdout and stderr are keyctl's; keyctl itself prints nothing
unless something goes wrong, and never the secret.

A lease is for ONE call to the model. When CMD exits, keyctl reports:
  exit status 0          status 200: success (without usage)
  other status, killed   status 0: outcome unknown, counted without penalty
  CMD could not start    unused: the reservation is refunded (exit 127)
A CMD that knows more (a 429 and its body, the real usage) reports the
lease itself before it exits, e.g.
  keyctl report "$KEYD_LEASE_ID" --status 429 --error-file body.json
and keyctl's own report then changes nothing and says nothing.

SIGINT, SIGTERM, SIGHUP and SIGQUIT are passed on to CMD, and keyctl waits
for CMD to exit. Ctrl-C and Ctrl-\ typed at a terminal already reach CMD
from the terminal when keyctl runs in its foreground, so they are not sent
twice. A signal while keyctl waits for a lease ends it: the lease, if one
came, is reported unused.

Exit status: CMD's; 128+N when signal N killed CMD (or keyctl before CMD
started); 127 when CMD could not start; 3 when no key had capacity within
--wait; 1 or 2 for keyctl's own errors.`,
	setup: func(e *env, fs *flag.FlagSet) func(context.Context, []string) error {
		var req api.LeaseRequest
		fs.StringVar(&req.Model, "model", "", "Gemini model `M` CMD will call, e.g. gemini-2.5-flash (required)")
		fs.Int64Var(&req.Tokens, "tokens", 0, "estimated input tokens `N` of the call (default: the config's default_tokens)")
		wait := fs.Duration("wait", 0, "how long `D` to wait for capacity, e.g. 30s (at most 10m; default: answer at once)")
		fs.StringVar(&req.WorkloadType, "workload", "", "lease only keys whose workload_type is `W`")
		fs.StringVar(&req.Client, "client", "", "`NAME` of the caller in keyd's logs and usage (default: keyctl-run:CMD)")
		return func(ctx context.Context, args []string) error {
			switch {
			case len(args) == 0:
				return usagef("run", "missing CMD")
			case req.Model == "":
				return usagef("run", "--model is required")
			case req.Tokens < 0:
				return usagef("run", "--tokens must be >= 0, got %d", req.Tokens)
			case *wait < 0 || *wait > api.MaxWait:
				return usagef("run", "--wait must be between 0 and %s, got %s", api.MaxWait, *wait)
			}
			req.WaitMS = wait.Milliseconds()
			if *wait > 0 && req.WaitMS == 0 {
				req.WaitMS = 1
			}
			if req.Client == "" {
				req.Client = "keyctl-run:" + args[0]
			}
			return e.runCommand(ctx, req, *wait, args)
		}
	},
}

// runCommand is keyctl run once its command line is checked.
func (e *env) runCommand(ctx context.Context, req api.LeaseRequest, wait time.Duration, args []string) error {
	// Find CMD before leasing: a typo must not cost a lease.
	path, err := exec.LookPath(args[0])
	if err != nil {
		return &exitCodeError{code: exitCannotRun, msg: fmt.Sprintf("run: %v", err)}
	}
	sigs := make(chan os.Signal, 8)
	notifySignals(sigs)
	defer stopSignals(sigs)

	c := e.client()
	defer c.CloseIdleConnections()
	l, sig, err := leaseInterruptibly(ctx, c, req, wait, sigs)
	if sig != nil {
		if l != nil {
			e.reportRun(c, l, api.ReportRequest{Outcome: api.OutcomeUnused})
		}
		return &exitCodeError{code: exitSignal + signalNumber(sig), msg: fmt.Sprintf("run: interrupted by %v before %s started", sig, args[0])}
	}
	if err != nil {
		return err
	}

	cmd := exec.Command(path, args[1:]...)
	cmd.Args[0] = args[0]
	cmd.Env = childEnv(os.Environ(), l, e.socketPath())
	cmd.Stdin, cmd.Stdout, cmd.Stderr = e.stdin, e.stdout, e.stderr
	if err := cmd.Start(); err != nil {
		e.reportRun(c, l, api.ReportRequest{Outcome: api.OutcomeUnused})
		return &exitCodeError{code: exitCannotRun, msg: fmt.Sprintf("run: %v", err)}
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var waitErr error
wait:
	for {
		select {
		case s := <-sigs:
			if s == syscall.SIGINT || s == syscall.SIGQUIT {
				if inTerminalForeground() {
					continue // the terminal sent it to CMD too
				}
			}
			_ = cmd.Process.Signal(s)
		case waitErr = <-done:
			break wait
		}
	}
	code := exitCode(cmd.ProcessState, waitErr)
	rep := api.ReportRequest{Status: 0}
	if code == 0 {
		rep.Status = 200
	}
	e.reportRun(c, l, rep)
	if code == 0 {
		return nil
	}
	return &exitCodeError{code: code}
}

// leaseInterruptibly takes a lease, giving up when one of the forwarded
// signals arrives first: it then returns the signal, and the lease if
// keyd granted one all the same.
func leaseInterruptibly(ctx context.Context, c *client.Client, req api.LeaseRequest, wait time.Duration, sigs <-chan os.Signal) (*api.Lease, os.Signal, error) {
	ctx, cancel := context.WithTimeout(ctx, wait+callTimeout)
	defer cancel()
	type result struct {
		l   *api.Lease
		err error
	}
	ch := make(chan result, 1)
	go func() {
		l, err := c.Lease(ctx, req)
		ch <- result{l, err}
	}()
	select {
	case r := <-ch:
		return r.l, nil, r.err
	case s := <-sigs:
		cancel()
		r := <-ch
		return r.l, s, nil
	}
}

// reportRun reports the lease of keyctl run. A duplicate (CMD reported
// the lease itself) is fine and silent; a failure is a warning, not a
// change of the exit status.
func (e *env) reportRun(c *client.Client, l *api.Lease, rep api.ReportRequest) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	if _, err := c.Report(ctx, l.LeaseID, rep); err != nil {
		fmt.Fprintf(e.stderr, "keyctl: warning: reporting lease %s: %v\n", clean(l.LeaseID), err)
	}
}

// childEnv is environ with the lease's variables set (replacing any that
// were there) for CMD.
func childEnv(environ []string, l *api.Lease, socket string) []string {
	set := map[string]string{
		"GEMINI_API_KEY": l.Secret,
		"KEYD_LEASE_ID":  l.LeaseID,
		"KEYD_KEY_ID":    l.KeyID,
		"KEYD_MODEL":     l.Model,
		"KEYD_SOCKET":    socket,
	}
	out := make([]string, 0, len(environ)+len(set))
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		if name == "GOOGLE_API_KEY" {
			out = append(out, "GOOGLE_API_KEY="+l.Secret)
			continue
		}
		if _, ok := set[name]; ok {
			continue
		}
		out = append(out, kv)
	}
	for _, name := range []string{"GEMINI_API_KEY", "KEYD_LEASE_ID", "KEYD_KEY_ID", "KEYD_MODEL", "KEYD_SOCKET"} {
		out = append(out, name+"="+set[name])
	}
	return out
}

// exitCode is CMD's exit status as keyctl passes it on: its exit code, or
// 128+N when signal N killed it.
func exitCode(ps *os.ProcessState, waitErr error) int {
	if ps == nil {
		if waitErr != nil {
			return exitError
		}
		return 0
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return exitSignal + int(ws.Signal())
	}
	if code := ps.ExitCode(); code >= 0 {
		return code
	}
	return exitError
}

func signalNumber(s os.Signal) int {
	if n, ok := s.(syscall.Signal); ok {
		return int(n)
	}
	return 0
}
