package daemon

import (
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSystemdNotify runs keyd against a fake NOTIFY_SOCKET: READY=1 only
// once the socket answers, RELOADING=1 with MONOTONIC_USEC then READY=1
// around a reload, STOPPING=1 at shutdown.
func TestSystemdNotify(t *testing.T) {
	path := filepath.Join(shortDir(t), "n.sock")
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	t.Setenv("NOTIFY_SOCKET", path)
	next := func() string {
		t.Helper()
		buf := make([]byte, 512)
		ln.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := ln.Read(buf)
		if err != nil {
			t.Fatalf("no notify message: %v", err)
		}
		return string(buf[:n])
	}
	d := startDaemon(t, socketKeys)
	if m := next(); m != "READY=1\nSTATUS=1/2 keys ready" {
		t.Fatalf("first message %q", m)
	}
	// READY came before Ready() returned, so the socket already answered.
	if status, _ := d.do(t, "POST", "/v1/reload", ""); status != 200 {
		t.Fatalf("reload: %d", status)
	}
	if m := next(); !strings.HasPrefix(m, "RELOADING=1\nMONOTONIC_USEC=") {
		t.Fatalf("reload opened with %q", m)
	}
	if m := next(); !strings.HasPrefix(m, "READY=1\n") {
		t.Fatalf("reload closed with %q", m)
	}
	d.stop()
	if m := next(); m != "STOPPING=1" {
		t.Fatalf("shutdown sent %q", m)
	}
}
