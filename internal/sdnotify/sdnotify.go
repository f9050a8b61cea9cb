// Package sdnotify speaks systemd's notify protocol (sd_notify(3)): one
// datagram of newline-separated VARIABLE=value lines to $NOTIFY_SOCKET.
//
// Every function is a no-op returning nil when NOTIFY_SOCKET is unset, so
// keyd behaves the same under systemd, under another supervisor, and in
// tests. Safe for concurrent use.
package sdnotify

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"time"
)

// Send sends state, e.g. "READY=1\nSTATUS=8/8 keys ready", to the socket
// named by $NOTIFY_SOCKET ("@" starts an abstract address).
func Send(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if path[0] == '@' {
		path = "\x00" + path[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("notifying systemd: %w", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("notifying systemd: %w", err)
	}
	return nil
}

// Reloading is the message that opens a reload: RELOADING=1 with the
// monotonic time systemd needs to match it (systemd.service(5)).
func Reloading() string {
	return "RELOADING=1\nMONOTONIC_USEC=" + strconv.FormatInt(monotonicUsec(), 10)
}

// WatchdogInterval returns half of $WATCHDOG_USEC — how often to send
// WATCHDOG=1 — or 0 when the watchdog is off or meant for another pid.
func WatchdogInterval() time.Duration {
	usec, err := strconv.ParseInt(os.Getenv("WATCHDOG_USEC"), 10, 64)
	if err != nil || usec <= 0 {
		return 0
	}
	if pid := os.Getenv("WATCHDOG_PID"); pid != "" && pid != strconv.Itoa(os.Getpid()) {
		return 0
	}
	return time.Duration(usec) * time.Microsecond / 2
}
