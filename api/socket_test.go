package api

import "testing"

func TestSocketPathResolution(t *testing.T) {
	cases := []struct {
		env    map[string]string
		uid    int
		system bool // /run/keyd/keyd.sock exists
		daemon string
		client string
	}{
		{map[string]string{"KEYD_SOCKET": "/x.sock", "RUNTIME_DIRECTORY": "/r"}, 1000, true, "/x.sock", "/x.sock"},
		{map[string]string{"RUNTIME_DIRECTORY": "/run/keyd:/run/other"}, 0, false, "/run/keyd/keyd.sock", "/run/keyd/keyd.sock"},
		{map[string]string{}, 0, false, "/run/keyd/keyd.sock", "/run/keyd/keyd.sock"},
		{map[string]string{"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000, false, "/run/user/1000/keyd/keyd.sock", "/run/user/1000/keyd/keyd.sock"},
		// A user without a keyd of their own finds the system service.
		{map[string]string{"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000, true, "/run/user/1000/keyd/keyd.sock", "/run/keyd/keyd.sock"},
	}
	for _, tc := range cases {
		getenv := func(k string) string { return tc.env[k] }
		exists := func(p string) bool { return tc.system && p == SystemSocketPath }
		if got := SocketPathFrom(getenv, tc.uid); got != tc.daemon {
			t.Errorf("%v uid %d: daemon %s, want %s", tc.env, tc.uid, got, tc.daemon)
		}
		if got := ClientSocketPathFrom(getenv, tc.uid, exists); got != tc.client {
			t.Errorf("%v uid %d: client %s, want %s", tc.env, tc.uid, got, tc.client)
		}
	}
}
