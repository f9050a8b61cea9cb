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
		return "/run/keyd/keyd.sock"
	}
	if d := getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "keyd", "keyd.sock")
	}
	return filepath.Join(os.TempDir(), "keyd-"+strconv.Itoa(uid), "keyd.sock")
}
