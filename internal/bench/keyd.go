package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/client"
)

// BuildKeyd builds cmd/keyd into dir with the go command and returns the
// binary's path. It must run inside the keyd module.
func BuildKeyd(ctx context.Context, dir string) (string, error) {
	bin := filepath.Join(dir, "keyd")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/keyd/keyd/cmd/keyd")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build cmd/keyd: %v\n%s", err, out)
	}
	return bin, nil
}

// KeydFiles are the files one keyd process uses.
type KeydFiles struct {
	Config   string // keys.json
	EnvFile  string // .env with the secrets
	StateDir string // the store's directory
	Socket   string // the Unix socket (a short path)
	Log      string // keyd's stderr goes here
}

// Keyd is a running keyd process.
type Keyd struct {
	Files   KeydFiles
	Client  *client.Client
	Startup time.Duration // from exec to the first answer of GET /v1/health
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
}

// StartKeyd execs the keyd binary bin on files and waits until GET
// /v1/health answers over its socket; Startup is that time.
func StartKeyd(ctx context.Context, bin string, f KeydFiles) (*Keyd, error) {
	logf, err := os.OpenFile(f.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, "--config", f.Config, "--env-file", f.EnvFile,
		"--state-dir", f.StateDir, "--socket", f.Socket, "--log-level", "info")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = childAttr()
	// Nothing of this process's environment may reach keyd's secrets or
	// systemd notification: only what a service would have.
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	k := &Keyd{Files: f, cmd: cmd, exited: make(chan struct{})}
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	go func() { k.waitErr = cmd.Wait(); close(k.exited) }()
	k.Client = client.New(f.Socket)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		hctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := k.Client.Health(hctx)
		cancel()
		if err == nil {
			k.Startup = time.Since(t0)
			return k, nil
		}
		select {
		case <-k.exited:
			return nil, fmt.Errorf("keyd exited at start (%v): %s", k.waitErr, tail(f.Log))
		default:
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			k.Stop()
			return nil, fmt.Errorf("keyd did not answer on %s: %v: %s", f.Socket, err, tail(f.Log))
		}
		if !errors.Is(err, client.ErrNotRunning) {
			var ae *api.Error
			if errors.As(err, &ae) {
				k.Stop()
				return nil, fmt.Errorf("keyd health: %w", err)
			}
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// PID is keyd's process ID.
func (k *Keyd) PID() int { return k.cmd.Process.Pid }

// Memory reads keyd's resident memory.
func (k *Keyd) Memory() (Memory, error) { return procMemory(k.PID()) }

// Stop stops keyd with SIGTERM, as systemd does, and waits for it to
// exit (SIGKILL after 20 s).
func (k *Keyd) Stop() error {
	k.Client.CloseIdleConnections()
	select {
	case <-k.exited:
		return k.waitErr
	default:
	}
	k.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-k.exited:
	case <-time.After(20 * time.Second):
		k.cmd.Process.Kill()
		<-k.exited
		return fmt.Errorf("keyd did not stop on SIGTERM within 20 s: killed")
	}
	if k.waitErr != nil {
		return fmt.Errorf("keyd exited with %v: %s", k.waitErr, tail(k.Files.Log))
	}
	return nil
}

// tail returns the last lines of a log file, for error messages.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-5):], "\n")
}

// keydPair returns a PairFunc doing one lease and its report through c.
func keydPair(c *client.Client, model string) PairFunc {
	rep := api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: 900, OutputTokens: 100}}
	req := api.LeaseRequest{Model: model, Tokens: 1000, Client: "bench"}
	return func(ctx context.Context) (time.Duration, time.Duration, error) {
		t0 := time.Now()
		l, err := c.Lease(ctx, req)
		if err != nil {
			return 0, 0, err
		}
		t1 := time.Now()
		if _, err := c.Report(ctx, l.LeaseID, rep); err != nil {
			return 0, 0, err
		}
		return t1.Sub(t0), time.Since(t1), nil
	}
}
