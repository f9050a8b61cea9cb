package bench

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

// These are the smoke tests CI runs so that the benchmarks cannot rot:
// every code path of `keyd-loadtest redis` and `keyd-loadtest scale` on
// tiny sizes and durations, and the Redis limiter's bookkeeping checked
// against what keyd would decide. The Redis ones skip, saying so, when
// redis-server is not installed.

var (
	keydOnce sync.Once
	keydBin  string
	keydErr  error
	keydDir  string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if keydDir != "" {
		os.RemoveAll(keydDir)
	}
	os.Exit(code)
}

// builtKeyd builds cmd/keyd once per test binary.
func builtKeyd(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("go"); err != nil {
		t.Skipf("skipping: the go command is not on $PATH to build keyd: %v", err)
	}
	keydOnce.Do(func() {
		keydDir, keydErr = os.MkdirTemp("", "bench-keyd")
		if keydErr == nil {
			keydBin, keydErr = BuildKeyd(context.Background(), keydDir)
		}
	})
	if keydErr != nil {
		t.Fatalf("building keyd: %v", keydErr)
	}
	return keydBin
}

func needRedis(t *testing.T) string {
	t.Helper()
	bin, err := HaveRedis()
	if err != nil {
		t.Skipf("skipping the Redis comparison: %v", err)
	}
	return bin
}

// shortDir is a temp dir whose paths fit a Unix socket address.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "bt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func smokeDur() (dur, warm time.Duration) {
	if testing.Short() {
		return 50 * time.Millisecond, 20 * time.Millisecond
	}
	return 200 * time.Millisecond, 50 * time.Millisecond
}

func TestParseGoBench(t *testing.T) {
	out := `goos: linux
BenchmarkLeaseBreakdown/socket-health-2         	    1000	     31023 ns/op	        22.65 p50-us	       111.2 p99-us
BenchmarkChooseKeys/keys=10/projects=1/select-2 	    1000	       849.4 ns/op	         0.7460 p50-us	         0.8850 p99-us
PASS
ok  	github.com/keyd/keyd/internal/daemon	5.992s
`
	bs := ParseGoBench(out)
	if len(bs) != 2 {
		t.Fatalf("parsed %d benchmarks, want 2: %+v", len(bs), bs)
	}
	if m := find(bs, "LeaseBreakdown/socket-health"); m == nil || m["p50-us"] != 22.65 || m["p99-us"] != 111.2 || m["ns/op"] != 31023 {
		t.Errorf("socket-health: %v", m)
	}
	if m := find(bs, "ChooseKeys/keys=10/projects=1/select"); m == nil || m["p50-us"] != 0.746 {
		t.Errorf("select: %v", m)
	}
}

// TestRedisLimiter checks that the Lua scripts decide as keyd does: per
// (project, model) bucket, priority then least recently used, rpm, tpm
// (reconciled by the report) and rpd, the sliding window, and the report's
// duplicates and unknown leases.
func TestRedisLimiter(t *testing.T) {
	bin := needRedis(t)
	ctx := context.Background()
	for _, durable := range []bool{false, true} {
		s, err := StartRedis(ctx, bin, t.TempDir(), durable)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := s.Stop(); err != nil {
				t.Error(err)
			}
		})
		if !durable {
			testLimiter(t, s)
			continue
		}
		// The durable server runs with the AOF fsynced at every write.
		l, err := NewRedisLimiter(ctx, s.Addr, GenKeys(2, 1, "m"), 2)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		cfg, err := l.Client().ConfigGet(ctx, "append*").Result()
		if err != nil {
			t.Fatal(err)
		}
		if cfg["appendonly"] != "yes" || cfg["appendfsync"] != "always" {
			t.Errorf("durable Redis runs with %v", cfg)
		}
		if _, err := l.Lease(ctx, time.Now(), "m", 10, "t"); err != nil {
			t.Fatal(err)
		}
	}
}

func testLimiter(t *testing.T, s *RedisServer) {
	ctx := context.Background()
	keys := []Key{
		{ID: "a1", Project: "pa", Model: "m", Priority: 2, RPM: 3, TPM: 5000, RPD: 4, Secret: "sa1"},
		{ID: "a2", Project: "pa", Model: "m", Priority: 2, RPM: 3, TPM: 5000, RPD: 4, Secret: "sa2"},
		{ID: "b1", Project: "pb", Model: "m", Priority: 1, RPM: 3, TPM: 5000, RPD: 4, Secret: "sb1"},
	}
	l, err := NewRedisLimiter(ctx, s.Addr, keys, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	t0 := time.Date(2026, 3, 10, 12, 0, 0, 0, time.UTC)
	lease := func(at time.Duration, tokens int64, want string) *RedisLease {
		t.Helper()
		ls, err := l.Lease(ctx, t0.Add(at), "m", tokens, "test")
		if want == "" {
			if !errors.Is(err, ErrNoCapacity) {
				t.Fatalf("lease at %v of %d tokens: got %+v, %v; want no capacity", at, tokens, ls, err)
			}
			return nil
		}
		if err != nil {
			t.Fatalf("lease at %v of %d tokens: %v; want key %s", at, tokens, err, want)
		}
		if ls.KeyID != want {
			t.Fatalf("lease at %v of %d tokens: key %s, want %s", at, tokens, ls.KeyID, want)
		}
		if ls.Secret != "s"+want {
			t.Fatalf("lease secret %q", ls.Secret)
		}
		return ls
	}
	// Priority 2 first (bucket pa), least recently used key of it next.
	lease(0, 1000, "a1")
	lease(time.Millisecond, 1000, "a2")
	lease(2*time.Millisecond, 1000, "a1")
	// pa is at rpm 3/3: pb's key.
	l4 := lease(3*time.Millisecond, 1000, "b1")
	lease(4*time.Millisecond, 4000, "b1") // pb: 1000+4000 = tpm 5000/5000
	lease(5*time.Millisecond, 1, "")      // pa rpm 3/3, pb tpm full
	// The report brings the real prompt tokens: pb frees 900 tokens.
	if c, err := l.Report(ctx, t0.Add(6*time.Millisecond), l4.ID, 200, 100, 50); err != nil || c != "success" {
		t.Fatalf("report: %q, %v", c, err)
	}
	lease(7*time.Millisecond, 900, "b1") // pb: 100+4000+900 = 5000, rpm 3/3
	lease(8*time.Millisecond, 1, "")
	// A repeated report changes nothing; an unknown lease is an error.
	if c, err := l.Report(ctx, t0.Add(9*time.Millisecond), l4.ID, 200, 0, 0); err != nil || c != "duplicate" {
		t.Fatalf("second report: %q, %v", c, err)
	}
	if _, err := l.Report(ctx, t0, "lnope", 200, 1, 1); err == nil {
		t.Fatal("report of an unknown lease succeeded")
	}
	// The window slides: a minute after the first grant it has left pa's
	// window, which has room for one more grant, and its day count (rpd 4)
	// for one.
	lease(time.Minute, 1000, "a2")
	// pa is at rpd 4/4; pb's grants at 3 and 4 ms have left its window.
	lease(time.Minute+5*time.Millisecond, 1000, "b1")
	// pb is at rpd 4/4 too: nothing until the day ends.
	lease(2*time.Minute, 1000, "")
	// The next day (in America/Los_Angeles) starts a new count.
	next := t0.Add(24 * time.Hour)
	if ls, err := l.Lease(ctx, next, "m", 10, "t"); err != nil || ls.KeyID != "a1" || ls.DayCount != 1 {
		t.Fatalf("lease the next day: %+v, %v", ls, err)
	}
	// The lease record and the usage row are there.
	rec, err := l.Client().HGetAll(ctx, "l:"+l4.ID).Result()
	if err != nil || rec["key"] != "b1" || rec["reported"] != "1" || rec["prompt_tokens"] != "100" || rec["class"] != "success" {
		t.Fatalf("lease record %v, %v", rec, err)
	}
	if _, err := l.Lease(ctx, t0, "other", 1, "t"); err == nil || !strings.Contains(err.Error(), "not configured") {
		t.Fatalf("unknown model: %v", err)
	}
}

// TestCompareSmoke runs the whole comparison on tiny durations.
func TestCompareSmoke(t *testing.T) {
	redisBin := needRedis(t)
	if FSOf("/dev/shm") == "?" || !strings.HasPrefix(FSOf("/dev/shm"), "tmpfs") {
		t.Skip("skipping: /dev/shm is not tmpfs here")
	}
	bin := builtKeyd(t)
	dur, warm := smokeDur()
	res, err := RunCompare(context.Background(), CompareConfig{
		KeydBin: bin, RedisBin: redisBin, Clients: []int{1, 3}, Rounds: 1, Duration: dur, Warmup: warm,
		DiskDir: shortDir(t), Command: "go test ./internal/bench/", Log: testWriter{t},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{1, 3} {
		for _, sys := range Systems {
			runs := res.Runs[n][sys]
			if len(runs) != 1 || runs[0].Pairs == 0 || len(runs[0].Lease) != runs[0].Pairs {
				t.Errorf("%d clients, %s: %+v", n, sys, runs)
			}
		}
	}
	md := res.Markdown()
	for _, want := range []string{"| 3 | Redis, durable (AOF, appendfsync always, on disk) |", "### Ratios", "## Where a lone lease's time goes", "go test ./internal/bench/"} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
}

// TestScaleSmoke runs the whole scale measurement on tiny sizes.
func TestScaleSmoke(t *testing.T) {
	bin := builtKeyd(t)
	dur, warm := smokeDur()
	res, err := RunScale(context.Background(), ScaleConfig{
		KeydBin: bin, Keys: []int{10, 200}, Projects: []int{1, 100}, Clients: []int{1, 2},
		Duration: dur, Warmup: warm, StartupRuns: 2, HealthCalls: 5, RestoreLeases: []int{3000}, Dir: shortDir(t),
		Command: "go test ./internal/bench/", Log: testWriter{t},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Rows) != 4 {
		t.Fatalf("%d rows, want 4", len(res.Rows))
	}
	for _, r := range res.Rows {
		if len(r.Startup) != 2 || r.StartMem[0].RSS == 0 || r.Leases == 0 || r.AfterMem.RSS == 0 || len(r.Restart) != 2 || r.Runs[2] == nil {
			t.Errorf("row %+v", r)
		}
	}
	if r := res.Rows[1]; r.Keys != 10 || r.Projects != 10 || r.AskedProjects != 100 {
		t.Errorf("10 keys in 100 projects: %+v", r)
	}
	if len(res.Restores) != 2 || !res.Restores[0].Reported || res.Restores[1].Reported {
		t.Errorf("restores %+v", res.Restores)
	}
	for _, r := range res.Restores {
		if r.Leases != 3000 || len(r.Startup) != 2 {
			t.Errorf("restore %+v", r)
		}
	}
	md := res.Markdown()
	for _, want := range []string{"| 200 | 100 |", "## Startup with leases in the store", "Startup pays for every row in the store",
		"| 3000 | yes | 2–5/s |", "| 3000 | no | 1–1/s |", "leaves up to 1,260,000 of them", "never reported leave 4,860,000 rows", "10 (asked 100: one key each)", "## Startup and memory"} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
