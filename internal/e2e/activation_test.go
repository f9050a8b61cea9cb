package e2e

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/client"
	"github.com/keyd/keyd/internal/testutil"
)

// TestSocketActivation passes keyd its listening socket the way systemd's
// keyd.socket does (fd 3, LISTEN_FDS=1, LISTEN_PID=its pid): keyd serves
// it, and on exit leaves the socket file alone, since it is systemd's.
func TestSocketActivation(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "keys.json")
	writeFile(t, cfg, `{"keys": [{"key_id": "a", "model_name": "m", "rpm": 10, "tpm": 100000}]}`+"\n")
	writeFile(t, filepath.Join(dir, ".env"), "GEMINI_KEY_a=AIzaFAKE-activation\n")
	sock := filepath.Join(shortTempDir(t, "kact"), "s.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	defer ln.Close()
	f, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	run := func() *exec.Cmd {
		// sh sets LISTEN_PID to its own pid, which exec hands to keyd.
		// --socket names another path: an activated socket wins.
		cmd := exec.Command("sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec keyd "$@"`, "sh",
			"--config", cfg, "--state-dir", filepath.Join(dir, "state"), "--socket", sock+".unused")
		cmd.ExtraFiles = []*os.File{f}
		log := &testutil.SyncBuffer{}
		cmd.Stdout, cmd.Stderr = log, log
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		c := client.New(sock)
		defer c.CloseIdleConnections()
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		if err := c.Wait(ctx); err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("keyd did not serve the activated socket: %v\n%s", err, log)
		}
		if _, err := c.Lease(ctx, leaseReq("m")); err != nil {
			t.Fatalf("lease on the activated socket: %v", err)
		}
		if _, err := os.Stat(sock + ".unused"); err == nil {
			t.Fatal("keyd opened its own socket besides the activated one")
		}
		return cmd
	}
	for i := range 2 { // a restart reuses the same socket
		cmd := run()
		cmd.Process.Signal(os.Interrupt)
		if err := cmd.Wait(); err != nil {
			t.Fatalf("run %d: keyd exited with %v", i, err)
		}
		if _, err := os.Stat(sock); err != nil {
			t.Fatalf("run %d: keyd removed the activated socket: %v", i, err)
		}
	}
}

func leaseReq(model string) api.LeaseRequest { return api.LeaseRequest{Model: model} }
