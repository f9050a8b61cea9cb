package sdnotify

import (
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestSendReachesNotifySocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "n.sock")
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	t.Setenv("NOTIFY_SOCKET", path)
	if err := Send("READY=1\nSTATUS=ok"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 256)
	ln.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := ln.Read(buf)
	if err != nil || string(buf[:n]) != "READY=1\nSTATUS=ok" {
		t.Fatalf("got %q, %v", buf[:n], err)
	}
}

func TestNoSocketIsANoOp(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	if err := Send("READY=1"); err != nil {
		t.Fatal(err)
	}
	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "missing"))
	if err := Send("READY=1"); err == nil {
		t.Fatal("a missing notify socket went unreported")
	}
}

func TestReloadingCarriesMonotonicTime(t *testing.T) {
	m := Reloading()
	if !strings.HasPrefix(m, "RELOADING=1\nMONOTONIC_USEC=") || strings.HasSuffix(m, "=0") {
		t.Fatalf("got %q", m)
	}
}

func TestWatchdogInterval(t *testing.T) {
	t.Setenv("WATCHDOG_USEC", "10000000")
	t.Setenv("WATCHDOG_PID", "")
	if d := WatchdogInterval(); d != 5*time.Second {
		t.Fatalf("got %v", d)
	}
	t.Setenv("WATCHDOG_PID", "1")
	if d := WatchdogInterval(); d != 0 {
		t.Fatalf("watchdog for another pid: %v", d)
	}
	t.Setenv("WATCHDOG_USEC", "")
	if d := WatchdogInterval(); d != 0 {
		t.Fatalf("no watchdog: %v", d)
	}
}
