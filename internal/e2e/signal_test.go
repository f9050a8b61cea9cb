package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keyd/keyd/client"
)

// TestSignals covers what testscript's kill cannot send: SIGHUP reloads
// the config (systemd's ExecReload), SIGTERM stops keyd cleanly (systemd's
// stop) and removes the socket.
func TestSignals(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "keys.json")
	env := filepath.Join(dir, "keyd.env")
	writeFile(t, cfg, `{"keys": [{"key_id": "a", "model_name": "m", "rpm": 10, "tpm": 100000}]}`+"\n")
	writeFile(t, env, "GEMINI_KEY_a=AIzaFAKE-signal-a\nGEMINI_KEY_b=AIzaFAKE-signal-b\n")
	sock := filepath.Join(shortTempDir(t, "ksig"), "s.sock")
	k := startKeyd(t, sock, "--config", cfg, "--env-file", env, "--state-dir", filepath.Join(dir, "state"))
	c := client.New(sock)
	defer c.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	writeFile(t, cfg, `{"keys": [{"key_id": "a", "model_name": "m", "rpm": 10, "tpm": 100000},
  {"key_id": "b", "model_name": "m", "rpm": 10, "tpm": 100000}]}`+"\n")
	if err := k.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	// A bounded poll: the reload is asynchronous to the signal.
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := c.Status(ctx)
		if err != nil {
			t.Fatalf("status: %v", err)
		}
		if len(st.Keys) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("SIGHUP did not reload the config: %d keys", len(st.Keys))
		}
		time.Sleep(20 * time.Millisecond)
	}

	if err := k.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-k.done:
	case <-time.After(15 * time.Second):
		t.Fatalf("keyd did not stop within 15s of SIGTERM; its log:\n%s", k.log)
	}
	if k.err != nil {
		t.Errorf("keyd exited with %v after SIGTERM; its log:\n%s", k.err, k.log)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("after SIGTERM the socket %s is still there (%v)", sock, err)
	}
	if log := k.log.String(); !strings.Contains(log, `msg="config reloaded"`) || !strings.Contains(log, `msg="keyd stopped"`) {
		t.Errorf("keyd's log lacks the reload or the stop:\n%s", log)
	}
}
