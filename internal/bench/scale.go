package bench

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/keyd/keyd/internal/store"
)

// ScaleModel is the one model every generated key serves.
const ScaleModel = "gemini-2.5-flash"

// ScaleConfig configures the scale measurement.
type ScaleConfig struct {
	KeydBin     string
	Keys        []int // key counts, e.g. 10, 1000, 10000
	Projects    []int // project counts, e.g. 1, 100 (at most one per key)
	Clients     []int // client counts of the lease runs, e.g. 1, 8
	Duration    time.Duration
	Warmup      time.Duration
	StartupRuns int    // fresh starts timed per size
	HealthCalls int    // GET /v1/health calls timed per size
	Dir         string // parent of the state dirs (default os.TempDir())
	// RestoreLeases are the numbers of leases written into a store (granted
	// over the last hour, reported) before keyd starts on it with 10 keys.
	RestoreLeases []int
	// ChooseTime is the -benchtime of BenchmarkChooseKeys
	// (internal/daemon), e.g. "300x"; empty skips it.
	ChooseTime string
	Command    string
	Log        io.Writer
}

// ScaleRow is what was measured for one (keys, projects).
type ScaleRow struct {
	Keys, Projects, AskedProjects int
	ConfigBytes, EnvBytes         int64
	Startup                       []time.Duration // fresh starts on an empty store
	StartMem                      []Memory        // right after each fresh start
	Health                        []time.Duration // sorted
	Runs                          map[int]*Run    // by clients
	Leases                        int64           // leases granted in all runs, warm-up included
	AfterMem                      Memory          // after the runs
	Restart                       []time.Duration // starts on the store of the runs
	RestartMem                    []Memory
}

// RestoreRow is keyd's start on a store already holding Leases leases.
type RestoreRow struct {
	Leases    int
	FileBytes int64
	Write     time.Duration // writing them with internal/store
	Startup   []time.Duration
	Mem       []Memory
}

// ScaleResult is what RunScale measured.
type ScaleResult struct {
	Config    ScaleConfig
	Machine   Machine
	Revision  string
	DiskFS    string
	Started   time.Time
	Took      time.Duration
	Load      []float64
	Rows      []*ScaleRow
	Restores  []*RestoreRow
	Choose    []GoBench
	ChooseCmd string
}

func (c *ScaleConfig) logf(format string, args ...any) {
	if c.Log != nil {
		fmt.Fprintf(c.Log, format+"\n", args...)
	}
}

// RunScale measures keyd's startup time, memory and lease latency for
// every (keys, projects) of cfg.
func RunScale(ctx context.Context, cfg ScaleConfig) (*ScaleResult, error) {
	if cfg.Dir == "" {
		cfg.Dir = os.TempDir()
	}
	cfg.StartupRuns = max(cfg.StartupRuns, 1)
	res := &ScaleResult{Config: cfg, Machine: ThisMachine(), Revision: Revision(), DiskFS: FSOf(cfg.Dir), Started: time.Now()}
	load := StartLoadSampler(5 * time.Second)
	for _, n := range cfg.Keys {
		for _, p := range cfg.Projects {
			row, err := cfg.measure(ctx, n, p)
			if err != nil {
				load.Stop()
				return nil, fmt.Errorf("%d keys, %d projects: %w", n, p, err)
			}
			res.Rows = append(res.Rows, row)
		}
	}
	for _, n := range cfg.RestoreLeases {
		row, err := cfg.measureRestore(ctx, n)
		if err != nil {
			load.Stop()
			return nil, fmt.Errorf("restoring %d leases: %w", n, err)
		}
		res.Restores = append(res.Restores, row)
	}
	res.Load = load.Stop()
	if cfg.ChooseTime != "" {
		cfg.logf("choose: BenchmarkChooseKeys -benchtime=%s", cfg.ChooseTime)
		bs, line, err := RunGoBench(ctx, "./internal/daemon/", "^BenchmarkChooseKeys$", cfg.ChooseTime)
		if err != nil {
			return nil, err
		}
		res.Choose, res.ChooseCmd = bs, line
	}
	res.Took = time.Since(res.Started)
	return res, nil
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

func (c *ScaleConfig) measure(ctx context.Context, n, projects int) (row *ScaleRow, err error) {
	dir, err := os.MkdirTemp(c.Dir, "ks")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	keys := GenKeys(n, projects, ScaleModel)
	config, env, err := WriteKeys(dir, keys)
	if err != nil {
		return nil, err
	}
	row = &ScaleRow{Keys: n, Projects: max(1, min(projects, n)), AskedProjects: projects,
		ConfigBytes: fileSize(config), EnvBytes: fileSize(env), Runs: map[int]*Run{}}
	files := func(state string) KeydFiles {
		return KeydFiles{Config: config, EnvFile: env, StateDir: filepath.Join(dir, state),
			Socket: filepath.Join(dir, "s.sock"), Log: filepath.Join(dir, "keyd.log")}
	}
	var k *Keyd
	defer func() {
		if k != nil {
			if serr := k.Stop(); err == nil && serr != nil {
				err = serr
			}
		}
	}()
	for i := range c.StartupRuns {
		if k != nil {
			if err := k.Stop(); err != nil {
				k = nil
				return nil, err
			}
		}
		k, err = StartKeyd(ctx, c.KeydBin, files(fmt.Sprintf("state%d", i)))
		if err != nil {
			return nil, err
		}
		m, err := k.Memory()
		if err != nil {
			return nil, err
		}
		row.Startup = append(row.Startup, k.Startup)
		row.StartMem = append(row.StartMem, m)
	}
	for range max(c.HealthCalls, 1) {
		t0 := time.Now()
		if _, err := k.Client.Health(ctx); err != nil {
			return nil, err
		}
		row.Health = append(row.Health, time.Since(t0))
	}
	slices.Sort(row.Health)
	var leases atomic.Int64
	pair := keydPair(k.Client, ScaleModel)
	counted := func(ctx context.Context) (time.Duration, time.Duration, error) {
		a, b, err := pair(ctx)
		if err == nil {
			leases.Add(1)
		}
		return a, b, err
	}
	for _, cl := range c.Clients {
		run, err := RunPairs(ctx, cl, c.Warmup, c.Duration, k.PID(), counted)
		if err != nil {
			return nil, err
		}
		row.Runs[cl] = run
	}
	row.Leases = leases.Load()
	if row.AfterMem, err = k.Memory(); err != nil {
		return nil, err
	}
	state := k.Files.StateDir
	err = k.Stop()
	k = nil
	if err != nil {
		return nil, err
	}
	for i := range c.StartupRuns {
		if i > 0 {
			err = k.Stop()
			k = nil
			if err != nil {
				return nil, err
			}
		}
		k, err = StartKeyd(ctx, c.KeydBin, files(filepath.Base(state)))
		if err != nil {
			return nil, err
		}
		m, err := k.Memory()
		if err != nil {
			return nil, err
		}
		row.Restart = append(row.Restart, k.Startup)
		row.RestartMem = append(row.RestartMem, m)
	}
	c.logf("keys=%-5d projects=%-3d startup %v  RSS %.1f MiB  health p50 %.2f ms  lease p50 %s  after %d leases RSS %.1f MiB  restart %v",
		n, row.Projects, medianDur(row.Startup).Round(time.Millisecond/10), mib(row.StartMem[len(row.StartMem)-1].RSS),
		Ms(Pct(row.Health, 50)), row.leaseP50s(c.Clients), row.Leases, mib(row.AfterMem.RSS), medianDur(row.Restart).Round(time.Millisecond/10))
	return row, nil
}

// RestoreKeys is the key count of the restore measurement.
const RestoreKeys = 10

// measureRestore writes n reported leases, granted over the last hour,
// into a fresh store with internal/store, then times keyd's start on it.
func (c *ScaleConfig) measureRestore(ctx context.Context, n int) (row *RestoreRow, err error) {
	dir, err := os.MkdirTemp(c.Dir, "kr")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	keys := GenKeys(RestoreKeys, 1, ScaleModel)
	config, env, err := WriteKeys(dir, keys)
	if err != nil {
		return nil, err
	}
	state := filepath.Join(dir, "state")
	row = &RestoreRow{Leases: n}
	t0 := time.Now()
	if err := populateStore(ctx, state, keys, n, time.Now()); err != nil {
		return nil, err
	}
	row.Write = time.Since(t0)
	row.FileBytes = fileSize(filepath.Join(state, store.FileName))
	for range c.StartupRuns {
		k, err := StartKeyd(ctx, c.KeydBin, KeydFiles{Config: config, EnvFile: env, StateDir: state,
			Socket: filepath.Join(dir, "s.sock"), Log: filepath.Join(dir, "keyd.log")})
		if err != nil {
			return nil, err
		}
		m, merr := k.Memory()
		if serr := k.Stop(); serr != nil {
			return nil, serr
		}
		if merr != nil {
			return nil, merr
		}
		row.Startup = append(row.Startup, k.Startup)
		row.Mem = append(row.Mem, m)
	}
	c.logf("restore: %d leases in the store (%.1f MiB): startup %v, RSS %.1f MiB", n, mib(row.FileBytes),
		medianDur(row.Startup).Round(time.Millisecond), mib(row.Mem[len(row.Mem)-1].RSS))
	return row, nil
}

// populateStore writes n reported leases of keys, granted evenly over the
// hour before now, and the day's count, as keyd would have recorded them.
func populateStore(ctx context.Context, dir string, keys []Key, n int, now time.Time) error {
	db, err := store.Open(dir, store.Options{})
	if err != nil {
		return err
	}
	const batch = 2000
	day := now.In(mustLA()).Format(time.DateOnly)
	for i := 0; i < n; i += batch {
		b := &store.Batch{}
		for j := i; j < min(i+batch, n); j++ {
			k := keys[j%len(keys)]
			at := now.Add(-time.Hour + time.Duration(j)*time.Hour/time.Duration(n))
			b.Leases = append(b.Leases, store.Lease{ID: newLeaseID(at), KeyID: k.ID, Project: k.Project, Model: k.Model,
				Client: "bench", Tokens: 1000, GrantedAt: at, ExpiresAt: at.Add(10 * time.Minute), Day: day,
				Reported: true, ReportedAt: at.Add(time.Second), Classification: "success", PromptTokens: 900, OutputTokens: 100})
		}
		if err := db.Commit(ctx, b); err != nil {
			db.Close()
			return err
		}
	}
	perProject := map[string]int64{}
	for j := range n {
		perProject[keys[j%len(keys)].Project]++
	}
	b := &store.Batch{}
	for p, cnt := range perProject {
		b.Days = append(b.Days, store.Day{Project: p, Model: ScaleModel, Day: day, Count: cnt})
	}
	if err := db.Commit(ctx, b); err != nil {
		db.Close()
		return err
	}
	return db.Close()
}

func mustLA() *time.Location {
	loc, err := time.LoadLocation("America/Los_Angeles")
	if err != nil {
		return time.UTC
	}
	return loc
}

func (r *ScaleRow) leaseP50s(clients []int) string {
	var s []string
	for _, cl := range clients {
		if run := r.Runs[cl]; run != nil {
			s = append(s, fmt.Sprintf("%d:%.3fms", cl, Ms(Pct(run.Lease, 50))))
		}
	}
	return strings.Join(s, " ")
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

func medianDur(ds []time.Duration) time.Duration {
	var xs []float64
	for _, d := range ds {
		xs = append(xs, float64(d))
	}
	return time.Duration(median(xs))
}

func durMs(ds []time.Duration) []float64 {
	var xs []float64
	for _, d := range ds {
		xs = append(xs, Ms(d))
	}
	return xs
}

func (r *ScaleRow) projectsLabel() string {
	if r.Projects != r.AskedProjects {
		return fmt.Sprintf("%d (asked %d: one key each)", r.Projects, r.AskedProjects)
	}
	return fmt.Sprint(r.Projects)
}

// Markdown renders the result as docs/bench/scale.md.
func (res *ScaleResult) Markdown() string {
	c := res.Config
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("# keyd at scale: keys, projects, startup and memory\n\n")
	w("Generated by `cmd/keyd-loadtest scale` (`internal/bench`); do not edit by hand: rerun the command.\n\n")
	w("keyd's lease latency, startup time and resident memory with %s keys of one model spread\n", joinInts(c.Keys))
	w("round-robin over %s projects (so %s buckets; a project cannot have fewer than one key, so 10 keys make\n", joinInts(c.Projects), joinInts(c.Projects))
	w("at most 10 projects).\n\n")
	w("## Reproduce\n\n```sh\n%s\n```\n\n", c.Command)
	w("## The run\n\n")
	w("%s", res.Machine.Markdown())
	w("- keyd at %s, the binary (not `go run`), log level info; its state directories in `%s`: %s\n", res.Revision, c.Dir, res.DiskFS)
	w("- 1-minute load average during the run: %s\n", LoadSummary(res.Load))
	w("- total %v, started %s\n\n", res.Took.Round(time.Second), res.Started.UTC().Format("2006-01-02 15:04 UTC"))
	w("Each size gets a generated keys.json (one entry per key: key_id, project, model_name, rpm 10⁹, tpm 10¹²)\n")
	w("and a .env with one `GEMINI_KEY_<id>` secret per key. keyd is exec'd %d times on an empty state directory;\n", c.StartupRuns)
	w("*startup* is from exec to the first answer of `GET /v1/health` on its socket (config and secrets loaded,\n")
	w("bbolt opened, state restored, socket listening), median [min–max]. *RSS* is VmRSS from /proc/PID/status\n")
	w("(peak: VmHWM). Then %d `GET /v1/health` one after another, then lease+report pairs for %v (after %v\n", c.HealthCalls, c.Duration, c.Warmup)
	w("of warm-up) at each client count, through the public client on the socket, with the durable store. Last,\n")
	w("keyd is stopped (SIGTERM) and started again, %d times, on the store those leases left: *restart* is that\n", c.StartupRuns)
	w("startup, which restores every lease of the last 70 minutes (lease_ttl + 1 h).\n\n")

	w("## Lease latency\n\n")
	w("| keys | projects | lease p50 ms | lease p99 ms | pair p50 ms | pairs/s | keyd CPU µs/pair |")
	w(" `GET /v1/health` p50 ms |\n|---:|---|---|---|---|---|---|---:|\n")
	for _, r := range res.Rows {
		var l50, l99, p50, tp, cpu []string
		for _, cl := range c.Clients {
			run := r.Runs[cl]
			if run == nil {
				continue
			}
			l50 = append(l50, fmt.Sprintf("%.3f", Ms(Pct(run.Lease, 50))))
			l99 = append(l99, fmt.Sprintf("%.3f", Ms(Pct(run.Lease, 99))))
			p50 = append(p50, fmt.Sprintf("%.3f", Ms(Pct(run.Pair, 50))))
			tp = append(tp, fmt.Sprintf("%.0f", run.PairsPerSec()))
			cpu = append(cpu, fmt.Sprintf("%.0f", run.ServerCPUPerPair()))
		}
		j := func(s []string) string { return strings.Join(s, " / ") }
		w("| %d | %s | %s | %s | %s | %s | %s | %.3f |\n", r.Keys, r.projectsLabel(), j(l50), j(l99), j(p50), j(tp), j(cpu), Ms(Pct(r.Health, 50)))
	}
	w("\nEach cell with several numbers gives them for %s clients, in that order.\n\n", joinInts(c.Clients))

	w("## Startup and memory\n\n")
	w("| keys | projects | keys.json + .env | startup ms | RSS after start MiB | leases granted | RSS after them MiB (peak) | restart ms | RSS after restart MiB |\n")
	w("|---:|---|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range res.Rows {
		var rss []float64
		for _, m := range r.StartMem {
			rss = append(rss, mib(m.RSS))
		}
		var rrss []float64
		for _, m := range r.RestartMem {
			rrss = append(rrss, mib(m.RSS))
		}
		w("| %d | %s | %.0f KiB + %.0f KiB | %s | %s | %d | %.1f (%.1f) | %s | %s |\n", r.Keys, r.projectsLabel(),
			float64(r.ConfigBytes)/1024, float64(r.EnvBytes)/1024, spread("%.1f", durMs(r.Startup)), spread("%.1f", rss),
			r.Leases, mib(r.AfterMem.RSS), mib(r.AfterMem.HWM), spread("%.1f", durMs(r.Restart)), spread("%.1f", rrss))
	}
	w("\n")
	res.restoreMarkdown(&b)
	res.chooseMarkdown(&b)
	res.findings(&b)
	return b.String()
}

// chooseMarkdown writes the in-process key-choice table.
func (res *ScaleResult) chooseMarkdown(b *strings.Builder) {
	w := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	w("## The key choice alone\n\n")
	if len(res.Choose) == 0 {
		w("(Not measured in this run: `--choose` was empty.)\n\n")
		return
	}
	w("`BenchmarkChooseKeys` (`internal/daemon/breakdown_test.go`) times keyd's own code in-process, without\n")
	w("socket or store: *select* is `choose` under the pool's mutex, *in-memory lease* is `pool.lease` (choose,\n")
	w("then the grant's bookkeeping) with a store that commits nothing. Both run under the pool's one mutex, so\n")
	w("1 / (in-memory lease) bounds the leases per second of the whole daemon, whatever the cores.\n\n")
	w("```sh\n%s\n```\n\n", res.ChooseCmd)
	w("| keys | projects | select p50 µs | select p99 µs | in-memory lease p50 µs | ns per key (select p50 ÷ keys) | lease ceiling /s (1 ÷ in-memory lease p50) |\n")
	w("|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, g := range res.Choose {
		name, ok := strings.CutSuffix(g.Name, "/select")
		if !ok {
			continue
		}
		var n, p int
		fmt.Sscanf(strings.TrimPrefix(name, "ChooseKeys/"), "keys=%d/projects=%d", &n, &p)
		lease := find(res.Choose, name+"/grant-nostore")
		sel := g.Metrics["p50-us"]
		ceiling := "–"
		if lease != nil && lease["p50-us"] > 0 {
			ceiling = fmt.Sprintf("%.0f", 1e6/lease["p50-us"])
		}
		perKey := 0.0
		if n > 0 {
			perKey = sel * 1000 / float64(n)
		}
		w("| %d | %d | %.1f | %.1f | %.1f | %.0f | %s |\n", n, p, sel, g.Metrics["p99-us"], lease["p50-us"], perKey, ceiling)
	}
	w("\n")
}

// findings states what the numbers show about growth with the key count.
func (res *ScaleResult) findings(b *strings.Builder) {
	w := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	w("## Findings\n\n")
	sel := func(n, p int) float64 {
		if m := find(res.Choose, fmt.Sprintf("ChooseKeys/keys=%d/projects=%d/select", n, p)); m != nil {
			return m["p50-us"]
		}
		return 0
	}
	keys := slices.Clone(res.Config.Keys)
	slices.Sort(keys)
	if len(keys) >= 2 && len(res.Choose) > 0 {
		lo, hi := keys[len(keys)-2], keys[len(keys)-1]
		if a, z := sel(lo, 1), sel(hi, 1); a > 0 && z > 0 {
			w("- **The key choice is linear in the keys of the model.** `choose` visits every key that serves the\n")
			w("  requested model on every lease, and for each does two map lookups keyed by strings (the bucket, then\n")
			w("  the per-request bucket cache), even when all keys share one bucket. From %d to %d keys (×%.0f) in one\n", lo, hi, float64(hi)/float64(lo))
			w("  project, select's p50 went from %.1f µs to %.1f µs (×%.1f), about %.0f ns per key. It runs under\n", a, z, z/a, z*1000/float64(hi))
			w("  the pool's single mutex, so at %d keys it alone caps keyd near %.0f leases/s however many cores or\n", hi, 1e6/z)
			w("  clients there are, and every lease and report waits behind it. Spreading the keys over more projects\n")
			w("  does not help (more buckets to check, each once).\n")
		}
	}
	var one []*ScaleRow
	for _, r := range res.Rows {
		if r.AskedProjects == 1 && r.Runs[1] != nil {
			one = append(one, r)
		}
	}
	if len(one) >= 2 {
		a, z := one[0], one[len(one)-1]
		w("- End to end, one client, one project: lease p50 %.3f ms with %d keys, %.3f ms with %d keys.\n",
			Ms(Pct(a.Runs[1].Lease, 50)), a.Keys, Ms(Pct(z.Runs[1].Lease, 50)), z.Keys)
		if len(res.Config.Clients) > 1 {
			cl := res.Config.Clients[len(res.Config.Clients)-1]
			if a.Runs[cl] != nil && z.Runs[cl] != nil {
				w("  At %d clients: %.0f pairs/s with %d keys, %.0f with %d.\n", cl, a.Runs[cl].PairsPerSec(), a.Keys, z.Runs[cl].PairsPerSec(), z.Keys)
			}
		}
		w("- `GET /v1/health` also visits every key (it counts the ready ones, computing each key's state and\n")
		w("  sorting its models): p50 %.3f ms with %d keys, %.3f ms with %d. systemd's watchdog and `keyctl wait`\n",
			Ms(Pct(a.Health, 50)), a.Keys, Ms(Pct(z.Health, 50)), z.Keys)
		w("  call it; it holds the pool mutex for that long.\n")
		w("- Startup: %.1f ms with %d keys, %.1f ms with %d keys (median); RSS after start %.1f MiB and %.1f MiB.\n",
			Ms(medianDur(a.Startup)), a.Keys, Ms(medianDur(z.Startup)), z.Keys,
			mib(int64(medianRSS(a.StartMem))), mib(int64(medianRSS(z.StartMem))))
	}
	if len(res.Restores) > 0 && len(one) > 0 && one[0].Keys == RestoreKeys {
		base := one[0]
		r := res.Restores[len(res.Restores)-1]
		perLease := float64(medianDur(r.Startup)-medianDur(base.Startup)) / float64(time.Microsecond) / float64(r.Leases)
		perMem := (medianRSS(r.Mem) - medianRSS(base.StartMem)) / float64(r.Leases)
		w("- **Startup grows with the leases of the last 70 minutes.** With %d leases in the store (a sustained\n", r.Leases)
		w("  %.0f leases/s) keyd took %.0f ms to start against %.1f ms on an empty store: about %.1f µs and %.0f bytes\n",
			float64(r.Leases)/4200, Ms(medianDur(r.Startup)), Ms(medianDur(base.Startup)), perLease, perMem)
		w("  of RSS per lease held (RSS includes the GC's headroom). Leases are held for 70 minutes whether or not\n")
		w("  they were reported: a keyd granting 1,000 leases/s would hold 4.2 million, about %.1f GiB, and take\n",
			4.2e6*perMem/(1<<30))
		w("  about %.0f s to restart, if both stay linear.\n", 4.2e6*perLease/1e6)
	}
	w("\n")
}

// restoreMarkdown writes the table of starts on a populated store.
func (res *ScaleResult) restoreMarkdown(b *strings.Builder) {
	if len(res.Restores) == 0 {
		return
	}
	w := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	w("## Startup with leases in the store\n\n")
	w("keyd keeps every lease in memory until an hour after it expires (lease_ttl 10 min + 1 h = 70 minutes\n")
	w("after its grant, reported or not), and at start it reads back and rebuilds every lease granted in\n")
	w("those 70 minutes. Here a store is filled beforehand with internal/store (the leases of %d keys in one\n", RestoreKeys)
	w("project, granted evenly over the last hour and reported, and the day's count), then keyd is started on\n")
	w("it %d times. N leases in the store is what a sustained N/4,200 leases per second leaves.\n\n", res.Config.StartupRuns)
	w("| leases in the store | sustained rate that leaves them | keyd.db MiB | startup ms | RSS after start MiB |\n")
	w("|---:|---:|---:|---:|---:|\n")
	for _, r := range res.Restores {
		var rss []float64
		for _, m := range r.Mem {
			rss = append(rss, mib(m.RSS))
		}
		w("| %d | %.0f/s | %.1f | %s | %s |\n", r.Leases, float64(r.Leases)/4200, mib(r.FileBytes),
			spread("%.0f", durMs(r.Startup)), spread("%.1f", rss))
	}
	w("\n")
}

// medianRSS is the median VmRSS of ms, in bytes.
func medianRSS(ms []Memory) float64 {
	var xs []float64
	for _, m := range ms {
		xs = append(xs, float64(m.RSS))
	}
	return median(xs)
}
