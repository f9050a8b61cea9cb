package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/keyd/keyd/api"
)

var t0 = time.Date(2025, 3, 14, 10, 0, 0, 0, time.UTC)

func lease(id string, granted time.Time) Lease {
	return Lease{
		ID:        id,
		KeyID:     "k1",
		Project:   "p",
		Model:     "gemini-2.5-flash",
		Client:    "cli",
		Tokens:    1200,
		GrantedAt: granted,
		ExpiresAt: granted.Add(time.Minute),
		Day:       granted.Format(time.DateOnly),
	}
}

func commit(t testing.TB, db *DB, b *Batch) {
	t.Helper()
	if err := db.Commit(context.Background(), b); err != nil {
		t.Fatalf("Commit: %v", err)
	}
}

func load(t testing.TB, db *DB, since time.Time, days ...string) *State {
	t.Helper()
	st, err := db.Load(since, days)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	return st
}

func TestRoundTrip(t *testing.T) {
	db, dir := openTest(t, "")
	reported := lease("L2", t0.Add(time.Second))
	reported.Reported = true
	reported.ReportedAt = t0.Add(2 * time.Second)
	reported.Classification = "ok"
	reported.Action = "none"
	reported.PromptTokens = -1
	reported.OutputTokens = 77
	want := &State{
		Leases: []Lease{lease("L1", t0), reported},
		Buckets: []Bucket{
			{Project: "p", Model: "m1", State: api.StateCooling, Until: t0.Add(time.Minute), Reason: "429", Streak: 2},
			{Project: "p", Model: "m2", State: api.StateDisabled, Reason: "admin"},
		},
		Keys: []Key{
			{KeyID: "k1", Reason: "invalid", By: "upstream", At: t0, SecretHash: "abcd"},
			{KeyID: "k2", Reason: "maintenance", By: "admin", At: t0},
		},
		Days: []Day{
			{Project: "p", Model: "m1", Day: "2025-03-13", Count: 5},
			{Project: "p", Model: "m1", Day: "2025-03-14", Count: 9},
		},
	}
	// Extra rows that Load must leave out or that later batches delete.
	commit(t, db, &Batch{
		Leases:  []Lease{lease("L0", t0.Add(-time.Hour)), lease("Lgone", t0)},
		Buckets: []Bucket{{Project: "gone", Model: "m", State: api.StateExhausted, Reason: "day"}},
		Keys:    []Key{{KeyID: "gone", Reason: "x", By: "admin", At: t0}},
		Days:    []Day{{Project: "p", Model: "m1", Day: "2025-03-01", Count: 1}},
	})
	commit(t, db, &Batch{
		Leases:        want.Leases,
		DeleteLeases:  []string{"Lgone"},
		Buckets:       want.Buckets,
		DeleteBuckets: []BucketKey{{Project: "gone", Model: "m"}},
		Keys:          want.Keys,
		DeleteKeys:    []string{"gone"},
		Days:          want.Days,
		Usage:         []UsageDelta{{Hour: t0, Project: "p", Model: "m1", KeyID: "k1", Requests: 1}},
	})
	check := func(db *DB) {
		t.Helper()
		got := load(t, db, t0, "2025-03-13", "2025-03-14")
		if !reflect.DeepEqual(got, want) {
			t.Errorf("Load:\n got %+v\nwant %+v", got, want)
		}
		rows, err := db.Usage(t0, "")
		if err != nil {
			t.Fatal(err)
		}
		wantRows := []api.UsageRow{{Hour: t0, Project: "p", Model: "m1", KeyID: "k1", Requests: 1}}
		if !reflect.DeepEqual(rows, wantRows) {
			t.Errorf("Usage:\n got %+v\nwant %+v", rows, wantRows)
		}
	}
	check(db)
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db2, _ := openTest(t, dir)
	check(db2)
}

func TestLoadOrdersByGrantTime(t *testing.T) {
	db, _ := openTest(t, "")
	// IDs out of time order: Load must sort by GrantedAt, then ID.
	commit(t, db, &Batch{Leases: []Lease{
		lease("c", t0.Add(2*time.Second)),
		lease("a", t0.Add(3*time.Second)),
		lease("z", t0),
		lease("b", t0.Add(2*time.Second)),
		lease("old", t0.Add(-time.Nanosecond)),
	}})
	var ids []string
	for _, l := range load(t, db, t0).Leases {
		ids = append(ids, l.ID)
	}
	if got, want := strings.Join(ids, ","), "z,b,c,a"; got != want {
		t.Errorf("lease order %s, want %s", got, want)
	}
}

func TestGroupCommit(t *testing.T) {
	const goroutines, perG = 64, 200
	db, dir := openTest(t, "")
	var wg sync.WaitGroup
	errs := make(chan error, goroutines)
	for g := range goroutines {
		wg.Go(func() {
			for i := range perG {
				id := fmt.Sprintf("g%02d-%04d", g, i)
				if err := db.Commit(context.Background(), &Batch{Leases: []Lease{lease(id, t0.Add(time.Duration(i)*time.Millisecond))}}); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	st := db.Stats()
	t.Logf("%d commits in %d transactions", st.Commits, st.Transactions)
	if st.Commits != goroutines*perG || st.Failed != 0 {
		t.Errorf("stats %+v", st)
	}
	if st.Transactions >= st.Commits {
		t.Errorf("no grouping: %d transactions for %d commits", st.Transactions, st.Commits)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	db2, _ := openTest(t, dir)
	got := map[string]bool{}
	for _, l := range load(t, db2, time.Time{}).Leases {
		got[l.ID] = true
	}
	for g := range goroutines {
		for i := range perG {
			if id := fmt.Sprintf("g%02d-%04d", g, i); !got[id] {
				t.Fatalf("lease %s missing after reopen (%d present)", id, len(got))
			}
		}
	}
	if len(got) != goroutines*perG {
		t.Errorf("%d leases, want %d", len(got), goroutines*perG)
	}
}

func TestCommitOrderSequential(t *testing.T) {
	db, _ := openTest(t, "")
	commit(t, db, &Batch{Leases: []Lease{lease("x", t0)}})
	commit(t, db, &Batch{DeleteLeases: []string{"x"}})
	commit(t, db, &Batch{Leases: []Lease{lease("y", t0)}})
	commit(t, db, &Batch{DeleteLeases: []string{"y"}})
	y := lease("y", t0)
	y.Tokens = 2
	commit(t, db, &Batch{Leases: []Lease{y}})
	st := load(t, db, time.Time{})
	if len(st.Leases) != 1 || st.Leases[0].ID != "y" || st.Leases[0].Tokens != 2 {
		t.Errorf("leases %+v, want only y with 2 tokens", st.Leases)
	}
}

// blockWriter makes the writer stall before its next group; release lets
// it go on.
func blockWriter(t *testing.T, db *DB) (release func()) {
	t.Helper()
	stop := make(chan struct{})
	hook := func() { <-stop }
	db.stallHook.Store(&hook)
	var once sync.Once
	release = func() {
		once.Do(func() {
			db.stallHook.Store(nil)
			close(stop)
		})
	}
	t.Cleanup(release)
	return release
}

// waitQueued waits until n requests are queued for the writer.
func waitQueued(t *testing.T, db *DB, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for len(db.reqs) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d requests queued, want %d", len(db.reqs), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestCommitOrderInGroup puts several batches into one transaction and
// checks that they are applied in enqueue order.
func TestCommitOrderInGroup(t *testing.T) {
	db, _ := openTest(t, "")
	release := blockWriter(t, db)
	a2 := lease("a", t0)
	a2.Tokens = 2
	batches := []*Batch{
		{Leases: []Lease{lease("first", t0)}}, // taken alone; the writer then stalls
		{Leases: []Lease{lease("a", t0)}},
		{DeleteLeases: []string{"a"}},
		{Leases: []Lease{a2}}, // a survives with 2 tokens
		{Leases: []Lease{lease("b", t0)}},
		{DeleteLeases: []string{"b"}}, // b is gone
	}
	errs := make([]error, len(batches))
	var wg sync.WaitGroup
	for i, b := range batches {
		wg.Go(func() { errs[i] = db.Commit(context.Background(), b) })
		if i == 0 {
			// Wait for the writer to take it and stall.
			waitQueued(t, db, 0)
			time.Sleep(20 * time.Millisecond)
		} else {
			waitQueued(t, db, i)
		}
	}
	txsBefore := db.Stats().Transactions
	release()
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("Commit %d: %v", i, err)
		}
	}
	// Normally 2 (the stalled one and the group); 1 if the writer had not
	// taken the first batch before the others were queued.
	if n := db.Stats().Transactions - txsBefore; n > 2 {
		t.Errorf("%d transactions for batches queued together, want at most 2", n)
	}
	st := load(t, db, time.Time{})
	var got []string
	for _, l := range st.Leases {
		got = append(got, l.ID+":"+strconv.FormatInt(l.Tokens, 10))
	}
	if g, w := strings.Join(got, ","), "a:2,first:1200"; g != w {
		t.Errorf("leases %s, want %s", g, w)
	}
}

func TestCommitContext(t *testing.T) {
	db, dir := openTest(t, "")

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := db.Commit(ctx, &Batch{Leases: []Lease{lease("never", t0)}}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Commit with a done ctx: %v", err)
	}

	release := blockWriter(t, db)
	ctx, cancel = context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := db.Commit(ctx, &Batch{Leases: []Lease{lease("late", t0)}})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Commit: %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("Commit waited %v", d)
	}
	release()
	// The abandoned batch is still applied (documented).
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db2, _ := openTest(t, dir)
	st := load(t, db2, time.Time{})
	if len(st.Leases) != 1 || st.Leases[0].ID != "late" {
		t.Errorf("leases %+v, want only late", st.Leases)
	}
}

func TestInvalidBatch(t *testing.T) {
	db, _ := openTest(t, "")
	for _, b := range []*Batch{
		nil,
		{Leases: []Lease{{}}},
		{DeleteLeases: []string{""}},
		{Keys: []Key{{}}},
		{DeleteKeys: []string{""}},
		{Buckets: []Bucket{{Project: "a\x00b", Model: "m"}}},
		{Days: []Day{{Project: "p", Model: "m", Day: "\x00"}}},
		{Usage: []UsageDelta{{Project: "p", Model: "m", KeyID: strings.Repeat("k", bolt.MaxKeySize)}}},
	} {
		if err := db.Commit(context.Background(), b); err == nil {
			t.Errorf("Commit(%+v) succeeded", b)
		}
	}
	commit(t, db, &Batch{Leases: []Lease{lease("ok", t0)}})
	if st := db.Stats(); st.Commits != 1 || st.Failed != 0 {
		t.Errorf("stats %+v", st)
	}
}

func TestLocked(t *testing.T) {
	db, dir := openTest(t, "")
	_ = db
	b, err := os.ReadFile(filepath.Join(dir, PIDFileName))
	if err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(os.Getpid()) {
		t.Fatalf("pid file %q, %v", b, err)
	}
	start := time.Now()
	db2, err := Open(dir, Options{})
	if err == nil {
		db2.Close()
		t.Fatal("second Open succeeded")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("second Open took %v", d)
	}
	if !errors.Is(err, ErrLocked) {
		t.Errorf("error %v does not wrap ErrLocked", err)
	}
	want := fmt.Sprintf("state dir %s is in use by another keyd (pid %d): stop it or use another --state-dir", dir, os.Getpid())
	if err.Error() != want {
		t.Errorf("error %q\nwant %q", err, want)
	}
	var le *LockedError
	if !errors.As(err, &le) || le.PID != os.Getpid() || !le.Running {
		t.Errorf("LockedError %+v", le)
	}

	// A stale pid file is reported as such.
	if err := os.WriteFile(filepath.Join(dir, PIDFileName), []byte("999999999\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = Open(dir, Options{Timeout: 100 * time.Millisecond})
	if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "pid 999999999, which is not running here") {
		t.Errorf("stale pid: %v", err)
	}
}

func TestPIDFileRemoved(t *testing.T) {
	db, dir := openTest(t, "")
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, PIDFileName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pid file after Close: %v", err)
	}
	fi, err := os.Stat(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	if m := fi.Mode().Perm(); m != 0o600 {
		t.Errorf("file mode %v", m)
	}
}

func TestCreatesDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "state")
	openTest(t, dir)
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if m := fi.Mode().Perm(); m != 0o700 {
		t.Errorf("dir mode %v", m)
	}
}

func TestNewerSchema(t *testing.T) {
	db, dir := openTest(t, "")
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, FileName)
	bdb, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = bdb.Update(func(tx *bolt.Tx) error {
		if v := string(tx.Bucket(bucketMeta).Get(keySchema)); v != strconv.Itoa(SchemaVersion) {
			t.Errorf("schema %q", v)
		}
		return tx.Bucket(bucketMeta).Put(keySchema, []byte(strconv.Itoa(SchemaVersion+1)))
	})
	bdb.Close()
	if err != nil {
		t.Fatal(err)
	}
	_, err = Open(dir, Options{})
	if !errors.Is(err, ErrNewerSchema) {
		t.Fatalf("Open: %v, want ErrNewerSchema", err)
	}
	want := path + " has schema version 4, this keyd understands up to 3: upgrade keyd, or move keyd.db, keyd.0.wal and keyd.1.wal out of " + dir + " to start with an empty state"
	if err.Error() != want {
		t.Errorf("error %q\nwant %q", err, want)
	}
	if _, err := os.Stat(filepath.Join(dir, PIDFileName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pid file left by a refused Open: %v", err)
	}
}

func TestUsageAccumulates(t *testing.T) {
	db, dir := openTest(t, "")
	h0, h1 := t0, t0.Add(time.Hour)
	commit(t, db, &Batch{Usage: []UsageDelta{
		{Hour: h0, Project: "p", Model: "m", KeyID: "k1", Requests: 1, PromptTokens: 10, OutputTokens: 5},
		{Hour: h1.Add(-time.Hour - time.Minute), Project: "p", Model: "m", KeyID: "k1", Requests: 100}, // an hour before h0
		{Hour: h1, Project: "p", Model: "m", KeyID: "k2", RateMinute: 1},
	}})
	commit(t, db, &Batch{Usage: []UsageDelta{
		{Hour: h0.Add(30 * time.Minute), Project: "p", Model: "m", KeyID: "k1", Requests: 2, PromptTokens: 20, OutputTokens: 1, RateDay: 1, Other429: 2, Errors: 3, Unused: 4},
		{Hour: h1.In(time.FixedZone("X", 3600)), Project: "a", Model: "m", KeyID: "k1", Requests: 1},
	}})
	commit(t, db, &Batch{Usage: []UsageDelta{
		{Hour: h1, Project: "p", Model: "m", KeyID: "k2", RateMinute: 2},
	}})
	all := []api.UsageRow{
		{Hour: h0, Project: "p", Model: "m", KeyID: "k1", Requests: 3, PromptTokens: 30, OutputTokens: 6, RateDay: 1, Other429: 2, Errors: 3, Unused: 4},
		{Hour: h1, Project: "a", Model: "m", KeyID: "k1", Requests: 1},
		{Hour: h1, Project: "p", Model: "m", KeyID: "k2", RateMinute: 3},
	}
	for _, tc := range []struct {
		since time.Time
		key   string
		want  []api.UsageRow
	}{
		{h0, "", all},
		{h0.Add(-time.Hour), "", append([]api.UsageRow{{Hour: h0.Add(-time.Hour), Project: "p", Model: "m", KeyID: "k1", Requests: 100}}, all...)},
		{h0.Add(time.Second), "", all[1:]},
		{h0, "k1", all[:2]},
		{h0, "k2", all[2:]},
		{h1.Add(time.Hour), "", nil},
	} {
		rows, err := db.Usage(tc.since, tc.key)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(rows, tc.want) {
			t.Errorf("Usage(%v, %q):\n got %+v\nwant %+v", tc.since, tc.key, rows, tc.want)
		}
	}
	db.Close()
	db2, _ := openTest(t, dir)
	rows, err := db2.Usage(h0, "")
	if err != nil || !reflect.DeepEqual(rows, all) {
		t.Errorf("after reopen: %+v, %v", rows, err)
	}
}

func TestPrune(t *testing.T) {
	db, _ := openTest(t, "")
	// Reported leases go by their report time, whenever granted.
	reported := func(l Lease, at time.Time) Lease {
		l.Reported, l.ReportedAt, l.Classification = true, at, "success"
		return l
	}
	commit(t, db, &Batch{
		Leases: []Lease{lease("old", t0.Add(-time.Nanosecond)), lease("new", t0), lease("newer", t0.Add(time.Hour)),
			reported(lease("reported-old", t0), t0.Add(-time.Nanosecond)),
			reported(lease("reported-new", t0), t0),
			reported(lease("reported-old-granted", t0.Add(-time.Hour)), t0)},
		Days: []Day{
			{Project: "p", Model: "m", Day: "2025-03-10", Count: 1},
			{Project: "p", Model: "m", Day: "2025-03-11", Count: 1},
			{Project: "p", Model: "m", Day: "2025-03-14", Count: 1},
		},
		Usage: []UsageDelta{
			{Hour: t0.Add(-2 * time.Hour), Project: "p", Model: "m", KeyID: "k", Requests: 1},
			{Hour: t0.Add(-time.Hour), Project: "p", Model: "m", KeyID: "k", Requests: 1},
			{Hour: t0, Project: "p", Model: "m", KeyID: "k", Requests: 1},
		},
	})
	if err := db.Prune(t0, t0, t0.Add(-time.Hour)); err != nil {
		t.Fatal(err)
	}
	st := load(t, db, time.Time{}, "2025-03-10", "2025-03-11", "2025-03-14")
	var ids []string
	for _, l := range st.Leases {
		ids = append(ids, l.ID)
	}
	if want := []string{"reported-old-granted", "new", "reported-new", "newer"}; !slices.Equal(ids, want) {
		t.Errorf("leases %q, want %q", ids, want)
	}
	if len(st.Days) != 2 || st.Days[0].Day != "2025-03-11" {
		t.Errorf("days %+v (want the 11th and 14th: 3 days before the 14th are kept)", st.Days)
	}
	rows, err := db.Usage(time.Time{}, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 2 || !rows[0].Hour.Equal(t0.Add(-time.Hour)) {
		t.Errorf("usage %+v", rows)
	}
}

func TestPruneAlongsideCommit(t *testing.T) {
	db, _ := openTest(t, "")
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 50 {
				id := fmt.Sprintf("%d-%d", g, i)
				if err := db.Commit(context.Background(), &Batch{Leases: []Lease{lease(id, t0.Add(time.Duration(i%2)*time.Hour))}}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Go(func() {
		for range 20 {
			if err := db.Prune(t0.Add(time.Minute), t0, t0); err != nil {
				t.Error(err)
				return
			}
		}
	})
	wg.Wait()
	if err := db.Prune(t0.Add(time.Minute), t0, t0); err != nil {
		t.Fatal(err)
	}
	if n := len(load(t, db, time.Time{}).Leases); n != 8*25 {
		t.Errorf("%d leases after prune, want %d", n, 8*25)
	}
}

func TestClose(t *testing.T) {
	db, _ := openTest(t, "")
	commit(t, db, &Batch{Leases: []Lease{lease("a", t0)}})
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := db.Commit(context.Background(), &Batch{Leases: []Lease{lease("b", t0)}}); !errors.Is(err, ErrClosed) {
		t.Errorf("Commit after Close: %v", err)
	}
	if _, err := db.Load(t0, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Load after Close: %v", err)
	}
	if _, err := db.Usage(t0, ""); !errors.Is(err, ErrClosed) {
		t.Errorf("Usage after Close: %v", err)
	}
	if err := db.Prune(t0, t0, t0); !errors.Is(err, ErrClosed) {
		t.Errorf("Prune after Close: %v", err)
	}
}

// TestCloseDuringCommits checks that every Commit racing Close either
// returns nil (and its lease is durable) or ErrClosed, and none hangs.
func TestCloseDuringCommits(t *testing.T) {
	db, dir := openTest(t, "")
	var (
		mu    sync.Mutex
		acked []string
		wg    sync.WaitGroup
	)
	for g := range 16 {
		wg.Go(func() {
			for i := 0; ; i++ {
				id := fmt.Sprintf("%d-%d", g, i)
				err := db.Commit(context.Background(), &Batch{Leases: []Lease{lease(id, t0)}})
				if errors.Is(err, ErrClosed) {
					return
				}
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				acked = append(acked, id)
				mu.Unlock()
			}
		})
	}
	time.Sleep(50 * time.Millisecond)
	var cwg sync.WaitGroup
	for range 3 {
		cwg.Go(func() {
			if err := db.Close(); err != nil {
				t.Error(err)
			}
		})
	}
	cwg.Wait()
	wg.Wait()
	db2, _ := openTest(t, dir)
	got := map[string]bool{}
	for _, l := range load(t, db2, time.Time{}).Leases {
		got[l.ID] = true
	}
	for _, id := range acked {
		if !got[id] {
			t.Fatalf("acknowledged lease %s missing", id)
		}
	}
	t.Logf("%d acknowledged before Close", len(acked))
}
