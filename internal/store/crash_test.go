package store

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"
)

// crashHelperEnv makes the test binary run crashHelper instead of the
// tests; its value is the state dir.
const crashHelperEnv = "KEYD_STORE_CRASH_HELPER"

// crashSmallEnv makes crashHelper use a tiny write-ahead log, so that the
// kill lands on segment switches, running checkpoints and segments
// overwritten from their start as often as on plain appends.
const crashSmallEnv = "KEYD_STORE_CRASH_SMALL"

// smallLog are the log options of crashSmallEnv and of the tests that
// want many checkpoints.
var smallLog = Options{CheckpointBytes: 8 << 10, MaxSegmentBytes: 32 << 10, CheckpointInterval: 5 * time.Millisecond}

// crashHelper commits leases from several goroutines forever, printing
// each ID on stdout after its Commit returned nil. It is killed by its
// parent.
func crashHelper(dir string) {
	opts := Options{}
	if os.Getenv(crashSmallEnv) != "" {
		opts = smallLog
	}
	db, err := Open(dir, opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := 0; ; i++ {
				id := fmt.Sprintf("%d-g%d-%07d", os.Getpid(), g, i)
				now := time.Now()
				l := Lease{ID: id, KeyID: "k", Project: "p", Model: "m", GrantedAt: now, ExpiresAt: now.Add(time.Minute), Day: now.Format(time.DateOnly)}
				err := db.Commit(context.Background(), &Batch{
					Leases: []Lease{l},
					Usage:  []UsageDelta{{Hour: now, Project: "p", Model: "m", KeyID: "k", Requests: 1}},
				})
				if err != nil {
					fmt.Fprintln(os.Stderr, err)
					os.Exit(2)
				}
				// One write per line: lines from goroutines do not interleave.
				os.Stdout.WriteString(id + "\n")
			}
		})
	}
	wg.Wait()
	os.Exit(0)
}

func TestCrashKeepsAcknowledged(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a helper process")
	}
	dir := t.TempDir()
	for round := range 6 {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), crashHelperEnv+"="+dir)
		if round%2 == 1 {
			cmd.Env = append(cmd.Env, crashSmallEnv+"=1")
		}
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(out)
		var acked []string
		for len(acked) < 300*(round+1)+137*round && sc.Scan() {
			acked = append(acked, sc.Text())
		}
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		// Lines written before the kill were acknowledged too.
		for sc.Scan() {
			acked = append(acked, sc.Text())
		}
		cmd.Wait()
		if len(acked) < 300 {
			t.Fatalf("round %d: helper printed only %d IDs", round, len(acked))
		}

		db, err := Open(dir, Options{})
		if err != nil {
			t.Fatalf("reopening after kill -9: %v", err)
		}
		st, err := db.Load(time.Time{}, nil)
		if err != nil {
			t.Fatal(err)
		}
		// Every batch added its lease and one request together: a record
		// applied twice (replayed although keyd.db had it) or half would
		// show here.
		rows, err := db.Usage(time.Time{}, "")
		if err != nil {
			t.Fatal(err)
		}
		var requests int64
		for _, r := range rows {
			requests += r.Requests
		}
		if requests != int64(len(st.Leases)) {
			t.Errorf("round %d: usage counts %d requests for %d stored leases", round, requests, len(st.Leases))
		}
		if err := db.Close(); err != nil {
			t.Fatal(err)
		}
		checkFile(t, dir)
		present := make(map[string]bool, len(st.Leases))
		for _, l := range st.Leases {
			present[l.ID] = true
		}
		missing := 0
		for _, id := range acked {
			if !present[id] {
				missing++
				if missing <= 5 {
					t.Errorf("round %d: acknowledged lease %s missing after kill -9", round, id)
				}
			}
		}
		t.Logf("round %d: %d acknowledged, %d stored, %d missing", round, len(acked), len(st.Leases), missing)
	}
}
