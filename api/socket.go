package api

import (
	"os"
	"path/filepath"
	"strconv"
)

// DefaultSocketPath resolves the socket path the way keyd, keyctl and the
// client all do, when no --socket flag is given:
//
//  1. $KEYD_SOCKET
//  2. $RUNTIME_DIRECTORY/keyd.sock (systemd RuntimeDirectory=keyd)
//  3. /run/keyd/keyd.sock for root
//  4. $XDG_RUNTIME_DIR/keyd/keyd.sock
//  5. /tmp/keyd-$UID/keyd.sock when XDG_RUNTIME_DIR is unset
func DefaultSocketPath() string {
	return SocketPathFrom(os.Getenv, os.Getuid())
}

// SystemSocketPath is where the system service (systemd/keyd.service) listens.
const SystemSocketPath = "/run/keyd/keyd.sock"

// ClientSocketPath is DefaultSocketPath for clients: when neither
// $KEYD_SOCKET nor $RUNTIME_DIRECTORY is set and the user's own socket does
// not exist, it is the system service's socket if that exists, so that a
// generator run by any user finds the system keyd without configuration.
func ClientSocketPath() string {
	return ClientSocketPathFrom(os.Getenv, os.Getuid(), exists)
}

// ClientSocketPathFrom is ClientSocketPath with the environment, uid and
// file test given.
func ClientSocketPathFrom(getenv func(string) string, uid int, exists func(string) bool) string {
	p := SocketPathFrom(getenv, uid)
	if getenv("KEYD_SOCKET") != "" || getenv("RUNTIME_DIRECTORY") != "" || p == SystemSocketPath {
		return p
	}
	if !exists(p) && exists(SystemSocketPath) {
		return SystemSocketPath
	}
	return p
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// SocketPathFrom is DefaultSocketPath with the environment and uid given.
func SocketPathFrom(getenv func(string) string, uid int) string {
	if p := getenv("KEYD_SOCKET"); p != "" {
		return p
	}
	if d := getenv("RUNTIME_DIRECTORY"); d != "" {
		// systemd may list several directories separated by colons.
		for i := 0; i < len(d); i++ {
			if d[i] == ':' {
				d = d[:i]
				break
			}
		}
		return filepath.Join(d, "keyd.sock")
	}
	if uid == 0 {
		return SystemSocketPath
	}
	if d := getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "keyd", "keyd.sock")
	}
	return filepath.Join(os.TempDir(), "keyd-"+strconv.Itoa(uid), "keyd.sock")
}
