package keyctl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keyd/keyd/api"
)

// watchStatuses are what a fake keyd answers, one per frame: flash_02 and
// its bucket go from ready to cooling, keyd goes away and comes back, and
// a reload fails.
func watchStatuses(t *testing.T) []*api.Status {
	t.Helper()
	var base api.Status
	if err := json.Unmarshal([]byte(statusJSON), &base); err != nil {
		t.Fatal(err)
	}
	clone := func(s *api.Status) *api.Status {
		b, _ := json.Marshal(s)
		var c api.Status
		json.Unmarshal(b, &c)
		return &c
	}
	s0 := clone(&base)
	s0.Config.LastError = ""
	s0.Keys[1].State, s0.Keys[1].Reason, s0.Keys[1].Until = api.StateReady, "", nil
	s0.Buckets[0].State, s0.Buckets[0].Reason, s0.Buckets[0].Until = api.StateReady, "", nil
	s1 := clone(&base) // flash_02 and proj-a/gemini-2.5-flash cooling, a reload failed
	s2 := clone(s1)
	s2.UptimeS += 3
	return []*api.Status{s0, s1, nil, s2}
}

var escapes = regexp.MustCompile(`\x1b\[[0-9;?]*[A-Za-z]`)

// runWatcher runs a watcher over statuses (nil: keyd does not answer),
// one a second from now, and returns what it wrote.
func runWatcher(t *testing.T, tty bool, cols, rows int, statuses []*api.Status) string {
	t.Helper()
	var out bytes.Buffer
	clock := now
	e := &env{stdout: &out, getenv: func(string) string { return "" }, now: func() time.Time { return clock }, loc: time.UTC}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	i := 0
	w := &watcher{
		e: e, out: &out, tty: tty, interval: time.Millisecond,
		size: func() (int, int) { return cols, rows },
		fetch: func(context.Context) (*api.Status, error) {
			if i == len(statuses) {
				cancel()
				return nil, context.Canceled
			}
			st := statuses[i]
			clock = now.Add(time.Duration(i) * time.Second)
			i++
			if st == nil {
				return nil, errors.New("keyd is not running? (socket /s)")
			}
			return st, nil
		},
	}
	if err := w.run(ctx); err != nil {
		t.Fatal(err)
	}
	return out.String()
}

func checkWidth(t *testing.T, frame string, cols int) {
	t.Helper()
	for _, l := range strings.Split(frame, "\n") {
		l = strings.ReplaceAll(escapes.ReplaceAllString(l, ""), "\r", "") // a pty adds one
		if n := len([]rune(l)); n > cols {
			t.Errorf("line of %d columns, over %d: %q", n, cols, l)
		}
	}
}

func TestWatchPlainFrames(t *testing.T) {
	out := runWatcher(t, false, 80, 0, watchStatuses(t))
	if strings.Contains(out, "\x1b") {
		t.Errorf("escape sequences off a terminal:\n%q", out)
	}
	checkWidth(t, out, 80)
	frames := strings.SplitAfter(out, "\n\n"+"keyctl watch")
	if len(frames) != 4 {
		t.Fatalf("%d frames, want 4:\n%s", len(frames), out)
	}
	contains(t, "first frame", frames[0],
		"keyctl watch, every 1ms: 10:00:00\n",
		"KEYS: 4 (2 ready, 1 exhausted, 1 no_secret)",
		"CHANGES: none since 10:00:00")
	// 80 columns: the keys table has no SECRET column, and fits.
	contains(t, "first frame", frames[0], "\nKEY       PROJECT  MODELS               STATE      IN-FLIGHT  REASON/UNTIL\n")
	lacks(t, "first frame", frames[0], "SECRET", "…abcd")
	contains(t, "second frame", frames[1],
		"CHANGES (3):\n",
		"10:00:01 reload failed: reload: /etc/keyd/keys.json:4:7: key flash_09: field \"t…\n",
		"10:00:01 flash_02 ready → cooling (429 per-minute quota)\n",
		"10:00:01 proj-a/gemini-2.5-flash ready → cooling (429 per-minute)\n",
	)
	contains(t, "third frame", frames[2],
		"! keyd does not answer since 10:00:02: keyd is not running? (socket /s)\n",
		"! the status below is from 10:00:01\n",
		"10:00:02 keyd does not answer: keyd is not running? (socket /s)\n",
		"KEYS: 4 (1 ready, 1 cooling, 1 exhausted, 1 no_secret)")
	contains(t, "fourth frame", frames[3], "10:00:03 keyd answers again\n", "CHANGES (5):")
	lacks(t, "fourth frame", frames[3], "! keyd does not answer")
	lacks(t, "watch", out, "AIza", "FULLLOOKING")
}

func TestWatchOnATerminal(t *testing.T) {
	out := runWatcher(t, true, 80, 24, watchStatuses(t))
	if !strings.HasPrefix(out, enterScreen) {
		t.Errorf("does not start with the alternate screen: %q", out[:min(len(out), 40)])
	}
	if !strings.HasSuffix(out, leaveScreen) {
		t.Errorf("does not end by restoring the screen: %q", out[max(0, len(out)-40):])
	}
	frames := strings.Split(strings.TrimSuffix(strings.TrimPrefix(out, enterScreen), leaveScreen), homeCursor)[1:]
	if len(frames) != 4 {
		t.Fatalf("%d frames, want 4", len(frames))
	}
	for i, f := range frames {
		if !strings.HasSuffix(f, clearBelow) {
			t.Errorf("frame %d does not clear what is below it", i)
		}
		lines := strings.Split(f, "\r\n")
		if len(lines) > 24 {
			t.Errorf("frame %d has %d lines, over 24", i, len(lines))
		}
		checkWidth(t, f, 80)
	}
	// The rows that changed are highlighted, as are the recent changes.
	f := frames[1]
	contains(t, "second frame", f,
		clearLine+reverse+"flash_02  proj-a",
		clearLine+reverse+"proj-a   gemini-2.5-flash  cooling",
		clearLine+bold+"10:00:01 flash_02 ready → cooling (429 per-minute quota)"+plain,
		" (Ctrl-C quits)")
	lacks(t, "second frame", f, reverse+"flash_01")
	// 24 rows hold it all; 12 rows show the newest changes and cut the status.
	contains(t, "fourth frame", frames[3], "CHANGES (5):", "BUCKETS: 2", "10:00:03 keyd answers again")
	lacks(t, "fourth frame", frames[3], "more lines")
	small := runWatcher(t, true, 80, 12, watchStatuses(t))
	contains(t, "12 rows", small, "more lines: enlarge the terminal", "CHANGES (last 3 of 5):")
	for i, f := range strings.Split(small, homeCursor)[1:] {
		if n := len(strings.Split(f, "\r\n")); n > 12 {
			t.Errorf("frame %d of %d lines on 12 rows", i, n)
		}
	}
}

func TestWatchOnce(t *testing.T) {
	f := newFake(t)
	f.on("GET", "/v1/status", 200, statusJSON)
	r := keyctl(t, map[string]string{"COLUMNS": "72"}, "", "--socket", f.sock, "watch", "--once").want(t, 0)
	contains(t, "watch --once", r.stdout, "keyctl watch, every 1s: 10:00:00\n", "KEYS: 4", "BUCKETS: 2", "CHANGES: none")
	checkWidth(t, r.stdout, 72)
	if strings.Contains(r.stdout, "\x1b") {
		t.Errorf("escape sequences in --once output")
	}
	keyctl(t, nil, "", "--socket", f.sock, "watch", "--interval", "10ms").want(t, exitUsage)
	keyctl(t, nil, "", "--socket", f.sock, "watch", "now").want(t, exitUsage)
	r = keyctl(t, nil, "", "--socket", f.sock+"-gone", "watch", "--once").want(t, exitError)
	contains(t, "watch --once without keyd", r.stderr, "keyd")
}

// TestWatchOnAPseudoTerminal runs keyctl watch on a real terminal (a pty
// of 80x24) and interrupts it as Ctrl-C does: the screen must be restored.
func TestWatchOnAPseudoTerminal(t *testing.T) {
	master, slave := openPTY(t)
	if err := unix.IoctlSetWinsize(int(slave.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: 24, Col: 80}); err != nil {
		t.Skipf("cannot size the pty: %v", err)
	}
	var mu sync.Mutex
	var got bytes.Buffer
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		buf := make([]byte, 4096)
		for {
			n, err := master.Read(buf)
			mu.Lock()
			got.Write(buf[:n])
			mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	output := func() string { mu.Lock(); defer mu.Unlock(); return got.String() }

	f := newFake(t)
	f.on("GET", "/v1/status", 200, statusJSON)
	e := &env{stdin: strings.NewReader(""), stdout: slave, stderr: io.Discard,
		getenv: func(string) string { return "" }, now: func() time.Time { return now }, loc: time.UTC}
	done := make(chan int)
	go func() {
		done <- run(context.Background(), e, []string{"--socket", f.sock, "watch", "--interval", "100ms"})
	}()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(output(), "CHANGES") {
		if time.Now().After(deadline) {
			t.Fatalf("no frame on the terminal:\n%q", output())
		}
		time.Sleep(10 * time.Millisecond)
	}
	syscall.Kill(os.Getpid(), syscall.SIGINT) // what Ctrl-C sends
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("exit code %d after Ctrl-C", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("watch did not stop on SIGINT")
	}
	slave.Close()
	<-readDone
	out := output()
	if !strings.HasPrefix(out, enterScreen) || !strings.HasSuffix(out, leaveScreen) {
		t.Errorf("the terminal was not restored: starts %q, ends %q", out[:min(len(out), 20)], out[max(0, len(out)-20):])
	}
	for _, frame := range strings.Split(out, homeCursor)[1:] {
		checkWidth(t, frame, 80)
	}
	fmt.Fprint(io.Discard, out)
}

// openPTY opens a pseudo-terminal pair, or skips the test.
func openPTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pty: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Skipf("no pty: %v", err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Skipf("no pty: %v", err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pty: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return m, s
}
