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

// Listeners returns the sockets systemd passed by socket activation
// (sd_listen_fds(3)): LISTEN_FDS descriptors from fd 3 on, when
// LISTEN_PID is this process. It unsets the variables so that children do
// not inherit them. Without activation it returns nil.
func Listeners() ([]net.Listener, error) {
	defer func() {
		os.Unsetenv("LISTEN_PID")
		os.Unsetenv("LISTEN_FDS")
		os.Unsetenv("LISTEN_FDNAMES")
	}()
	if os.Getenv("LISTEN_PID") != strconv.Itoa(os.Getpid()) {
		return nil, nil
	}
	n, err := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if err != nil || n <= 0 {
		return nil, nil
	}
	var lns []net.Listener
	for fd := 3; fd < 3+n; fd++ {
		f := os.NewFile(uintptr(fd), "LISTEN_FD_"+strconv.Itoa(fd))
		ln, err := net.FileListener(f)
		f.Close() // FileListener dups it
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, fmt.Errorf("socket activation: fd %d: %w", fd, err)
		}
		lns = append(lns, ln)
	}
	return lns, nil
}
