package watch

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// start runs Run on files and returns a channel that receives one value
// per callback.
func start(t *testing.T, files ...string) <-chan struct{} {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	calls := make(chan struct{}, 16)
	done := make(chan error)
	go func() {
		done <- Run(ctx, files, 20*time.Millisecond, slog.New(slog.NewTextHandler(io.Discard, nil)), func() { calls <- struct{}{} })
	}()
	t.Cleanup(func() { cancel(); <-done })
	// The first call comes once the watches are set up.
	expectCall(t, calls, "start")
	return calls
}

func expectCall(t *testing.T, calls <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-calls:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: no callback", what)
	}
	drain(calls)
}

func drain(calls <-chan struct{}) {
	for {
		select {
		case <-calls:
		case <-time.After(100 * time.Millisecond):
			return
		}
	}
}

func write(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestEditsAreSeen(t *testing.T) {
	dir := t.TempDir()
	keys := filepath.Join(dir, "keys.json")
	env := filepath.Join(dir, ".env")
	write(t, keys, "1")
	calls := start(t, keys, env)

	write(t, keys, "2") // in place
	expectCall(t, calls, "in-place write")

	tmp := filepath.Join(dir, ".keys.json.swp")
	write(t, tmp, "3")
	if err := os.Rename(tmp, keys); err != nil { // editors' atomic save
		t.Fatal(err)
	}
	expectCall(t, calls, "atomic rename")

	os.Remove(keys)
	expectCall(t, calls, "delete")
	write(t, keys, "4")
	expectCall(t, calls, "recreate")

	write(t, env, "GEMINI_KEY_a=x") // the .env, which did not exist at start
	expectCall(t, calls, ".env created")
}

func TestSymlinkSwapIsSeen(t *testing.T) {
	// The Kubernetes ConfigMap layout: keys.json -> ..data/keys.json,
	// ..data -> ..2026_11_29_v1; an update swaps ..data.
	dir := t.TempDir()
	for _, v := range []string{"v1", "v2"} {
		os.Mkdir(filepath.Join(dir, v), 0o755)
		write(t, filepath.Join(dir, v, "keys.json"), v)
	}
	must := func(err error) {
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Symlink("v1", filepath.Join(dir, "..data")))
	must(os.Symlink("..data/keys.json", filepath.Join(dir, "keys.json")))
	calls := start(t, filepath.Join(dir, "keys.json"))
	must(os.Symlink("v2", filepath.Join(dir, "..data_tmp")))
	must(os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")))
	expectCall(t, calls, "symlink swap")
}

func TestReplacedDirectoryIsWatchedAgain(t *testing.T) {
	parent := t.TempDir()
	dir := filepath.Join(parent, "etc")
	os.Mkdir(dir, 0o755)
	keys := filepath.Join(dir, "keys.json")
	write(t, keys, "1")
	calls := start(t, keys)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	expectCall(t, calls, "directory removed")
	os.Mkdir(dir, 0o755)
	write(t, keys, "2")
	expectCall(t, calls, "directory back")
	write(t, keys, "3")
	expectCall(t, calls, "write in the new directory")
}

func TestSymlinkedDirectorySwapIsSeen(t *testing.T) {
	// current -> releases/1, swapped to releases/2 with ln -sfn.
	root := t.TempDir()
	for _, r := range []string{"1", "2"} {
		os.MkdirAll(filepath.Join(root, "releases", r), 0o755)
		write(t, filepath.Join(root, "releases", r, "keys.json"), r)
	}
	cur := filepath.Join(root, "current")
	if err := os.Symlink("releases/1", cur); err != nil {
		t.Fatal(err)
	}
	calls := start(t, filepath.Join(cur, "keys.json"))
	tmp := filepath.Join(root, "current.tmp")
	os.Symlink("releases/2", tmp)
	if err := os.Rename(tmp, cur); err != nil {
		t.Fatal(err)
	}
	expectCall(t, calls, "directory symlink swapped")
	write(t, filepath.Join(root, "releases", "2", "keys.json"), "2b")
	expectCall(t, calls, "write in the new target")
}

func TestQuietDirectoryCallsNothing(t *testing.T) {
	dir := t.TempDir()
	keys := filepath.Join(dir, "keys.json")
	write(t, keys, "1")
	calls := start(t, keys)
	select {
	case <-calls:
		t.Fatal("callback without a change")
	case <-time.After(300 * time.Millisecond):
	}
}
