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
	// RestoreLeases are the numbers of leases written into a store before
	// keyd starts on it with 10 keys: each once all reported (reports over
	// the last ReportedSpan) and once all unreported (grants over the last
	// UnreportedSpan).
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
	Reported  bool // all reported, over ReportedSpan; else none, over UnreportedSpan
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
	for _, reported := range []bool{true, false} {
		for _, n := range cfg.RestoreLeases {
			row, err := cfg.measureRestore(ctx, n, reported)
			if err != nil {
				load.Stop()
				return nil, fmt.Errorf("restoring %d %s leases: %w", n, reportedWord(reported), err)
			}
			res.Restores = append(res.Restores, row)
		}
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

// The retention the restore measurement models (internal/daemon's
// leaseGrace, reportRetention and prune call, at the default lease_ttl).
// keyd prunes its store every 10 minutes, with a minute of slack: the
// rows of the unreported leases granted more than lease_ttl + 1 h + 1 min
// before, and of the leases reported more than 10 min + 1 min before. So
// between two prunes the store holds the reports of the last 11 to 21
// minutes and the unreported grants of the last 71 to 81 minutes; at
// start keyd reads every row, keeps those of the last lease_ttl + 1 h,
// and of those keeps the reported ones only as answers, and only if
// reported in the last 10 minutes.
const (
	restoreTTL      = 10 * time.Minute // the default lease_ttl
	restoreGrace    = time.Hour        // leaseGrace
	restoreAnswers  = 10 * time.Minute // reportRetention
	restorePruneGap = 10 * time.Minute // between two prunes
	restoreSlack    = time.Minute      // of each prune

	// ReportedSpan and UnreportedSpan are the spans of report and grant
	// times of the reported and the unreported rows in the store just
	// before a prune (at their most).
	ReportedSpan   = restoreAnswers + restoreSlack + restorePruneGap
	UnreportedSpan = restoreTTL + restoreGrace + restoreSlack + restorePruneGap

	// restoreHold is how long after its grant a lease is reported.
	restoreHold = time.Second
)

// restoreSpans are the spans of report (reported) or grant (unreported)
// times in the store just after and just before a prune.
func restoreSpans(reported bool) (low, high time.Duration) {
	if reported {
		return ReportedSpan - restorePruneGap, ReportedSpan
	}
	return UnreportedSpan - restorePruneGap, UnreportedSpan
}

func reportedWord(reported bool) string {
	if reported {
		return "reported"
	}
	return "unreported"
}

// restoreRates are the sustained lease rates, per second, that leave n
// rows in the store: at the peak of the prune cycle (the lower rate) and
// right after a prune.
func restoreRates(n int, reported bool) (peak, trough float64) {
	low, high := restoreSpans(reported)
	return float64(n) / high.Seconds(), float64(n) / low.Seconds()
}

// measureRestore writes n leases into a fresh store with internal/store,
// as populateStore describes, then times keyd's start on it.
func (c *ScaleConfig) measureRestore(ctx context.Context, n int, reported bool) (row *RestoreRow, err error) {
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
	// Each start gets a copy of the store as written: a keyd that runs
	// for a second prunes it, and so would change it for the next.
	seed, state := filepath.Join(dir, "seed"), filepath.Join(dir, "state")
	row = &RestoreRow{Leases: n, Reported: reported}
	t0 := time.Now()
	if err := populateStore(ctx, seed, keys, n, reported, time.Now()); err != nil {
		return nil, err
	}
	row.Write = time.Since(t0)
	row.FileBytes = fileSize(filepath.Join(seed, store.FileName))
	for range c.StartupRuns {
		if err := copyFiles(state, seed); err != nil {
			return nil, err
		}
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
	c.logf("restore: %d %s leases in the store (%.1f MiB): startup %v, RSS %.1f MiB", n, reportedWord(reported), mib(row.FileBytes),
		medianDur(row.Startup).Round(time.Millisecond), mib(row.Mem[len(row.Mem)-1].RSS))
	return row, nil
}

// copyFiles makes dst a copy of src, a directory of regular files: it
// removes dst first.
func copyFiles(dst, src string) error {
	if err := os.RemoveAll(dst); err != nil {
		return err
	}
	if err := os.Mkdir(dst, 0o700); err != nil {
		return err
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			return fmt.Errorf("copying %s: %s is not a regular file", src, e.Name())
		}
		if err := copyFile(filepath.Join(dst, e.Name()), filepath.Join(src, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

func copyFile(dst, src string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// populateStore writes n leases of keys, and the day's count, as keyd
// would have left them in its store at a sustained rate: if reported,
// each reported restoreHold after its grant, the reports spread evenly
// over the ReportedSpan before now (the store of clients that report
// every lease, just before a prune); if not, none reported, the grants
// spread evenly over the UnreportedSpan before now (the store of clients
// that never report).
func populateStore(ctx context.Context, dir string, keys []Key, n int, reported bool, now time.Time) error {
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
			l := store.Lease{KeyID: k.ID, Project: k.Project, Model: k.Model, Client: "bench", Tokens: 1000, Day: day}
			if reported {
				rep := now.Add(-ReportedSpan + time.Duration(j)*ReportedSpan/time.Duration(n))
				l.GrantedAt = rep.Add(-restoreHold)
				l.Reported, l.ReportedAt, l.Classification, l.PromptTokens, l.OutputTokens = true, rep, "success", 900, 100
			} else {
				l.GrantedAt = now.Add(-UnreportedSpan + time.Duration(j)*UnreportedSpan/time.Duration(n))
			}
			l.ID, l.ExpiresAt = newLeaseID(l.GrantedAt), l.GrantedAt.Add(restoreTTL)
			b.Leases = append(b.Leases, l)
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

// commaInt writes n with thousands separators: 1260000 is "1,260,000".
func commaInt(n int) string {
	if n < 0 {
		return "-" + commaInt(-n)
	}
	s := fmt.Sprint(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
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
	w("startup, which reads back every lease of those runs (all reported seconds before, so keyd rebuilds its\n")
	w("rate windows from them and keeps each only as its report's answer).\n\n")

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
	if len(one) > 0 && one[0].Keys == RestoreKeys {
		res.restoreFindings(b, one[0])
	}
	w("\n")
}

// restoreFindings states how startup and memory grow with the rows in
// the store, from the largest store of each kind, against base's starts
// on an empty store.
func (res *ScaleResult) restoreFindings(b *strings.Builder, base *ScaleRow) {
	w := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	largest := func(reported bool) *RestoreRow {
		var r *RestoreRow
		for _, x := range res.Restores {
			if x.Reported == reported && (r == nil || x.Leases > r.Leases) {
				r = x
			}
		}
		return r
	}
	// per returns the startup µs and RSS bytes per row of r above base.
	per := func(r *RestoreRow) (us, bytes float64) {
		return float64(medianDur(r.Startup)-medianDur(base.Startup)) / float64(time.Microsecond) / float64(r.Leases),
			(medianRSS(r.Mem) - medianRSS(base.StartMem)) / float64(r.Leases)
	}
	const rate = 1000 // leases/s, for the extrapolations
	rep, unrep := largest(true), largest(false)
	if rep == nil || unrep == nil {
		return
	}
	rus, rby := per(rep)
	uus, uby := per(unrep)
	rpeak, _ := restoreRates(rep.Leases, true)
	upeak, _ := restoreRates(unrep.Leases, false)
	kept := float64(restoreTTL+restoreGrace) / float64(UnreportedSpan)
	w("- **Startup pays for every row in the store, whatever keyd keeps of it.** Against %.1f ms and %.1f MiB\n",
		Ms(medianDur(base.Startup)), mib(int64(medianRSS(base.StartMem))))
	w("  on an empty store: with %d reported leases (what %.0f reported leases/s leave just before a prune)\n", rep.Leases, rpeak)
	w("  keyd took %.0f ms to start and had %.0f MiB of RSS, about %.1f µs and %.0f bytes per row; with %d\n",
		Ms(medianDur(rep.Startup)), mib(int64(medianRSS(rep.Mem))), rus, rby, unrep.Leases)
	w("  unreported ones (what %.0f leases/s that are never reported leave; keyd keeps the %.0f%% granted in\n", upeak, 100*kept)
	w("  the last 70 minutes in full) %.0f ms and %.0f MiB, about %.1f µs and %.0f bytes per row. keyd reads\n",
		Ms(medianDur(unrep.Startup)), mib(int64(medianRSS(unrep.Mem))), uus, uby)
	w("  and decodes every row at start: a reported row, of which it keeps at most a small answer, ")
	switch ratio := rus / uus; {
	case ratio > 1.1:
		w("costs\n  more startup than an unreported one, which it keeps whole.")
	case ratio >= 0.9:
		w("costs\n  about as much startup as an unreported one, which it keeps whole.")
	default:
		w("costs\n  %.0f%% of the startup of an unreported one, which it keeps whole.", 100*ratio)
	}
	rrows, urows := rate*ReportedSpan.Seconds(), rate*UnreportedSpan.Seconds()
	w(" What keeps restarts short is\n")
	w("  that reported rows leave the store 11 to 21 minutes after their report: a sustained %s reported\n", commaInt(rate))
	w("  leases/s leaves up to %s of them, a restart of about %.0f s reaching %.1f GiB of RSS, where\n",
		commaInt(int(rrows)), rrows*rus/1e6, rrows*rby/(1<<30))
	w("  %s leases/s never reported leave %s rows, about %.0f s and %.1f GiB, if all stays linear.\n",
		commaInt(rate), commaInt(int(urows)), urows*uus/1e6, urows*uby/(1<<30))
	w("- RSS right after start includes keyd.db's pages, which bbolt maps into memory and the restore reads\n")
	w("  whole, the rows the restore decoded all at once (garbage by then) and the GC's headroom: more than\n")
	w("  what keyd keeps.\n")
}

// restoreMarkdown writes the table of starts on a populated store.
func (res *ScaleResult) restoreMarkdown(b *strings.Builder) {
	if len(res.Restores) == 0 {
		return
	}
	w := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	w("## Startup with leases in the store\n\n")
	w("At start keyd reads every lease row of its store, rebuilds the rate windows from those of the last 70\n")
	w("minutes (lease_ttl 10 min + 1 h), keeps the unreported ones among them in full (a late report is\n")
	w("still applied until an hour after expiry) and of the reported ones only the answer to a repeated report,\n")
	w("and only if reported in the last 10 minutes. While running, keyd prunes its store every 10 minutes: it\n")
	w("deletes the rows of the leases reported more than 11 minutes before (10 and a minute of slack) and of\n")
	w("the unreported ones granted more than 71 minutes before. So between two prunes a keyd at a sustained\n")
	w("rate leaves the leases reported in the last 11 to 21 minutes and the unreported ones granted in the\n")
	w("last 71 to 81.\n\n")
	w("Here a store is filled beforehand with internal/store as such a keyd would leave it right before a\n")
	w("prune: the leases of %d keys in one project, and the day's count, in one of two ways.\n\n", RestoreKeys)
	w("- *reported*: every lease reported %.0f s after its grant, the reports spread evenly over the last %.0f\n", restoreHold.Seconds(), ReportedSpan.Minutes())
	w("  minutes: the store of clients that report every lease. N rows is what N/%s reported leases per\n", commaInt(int(ReportedSpan.Seconds())))
	w("  second leave just before a prune (and N/%s right after one).\n", commaInt(int((ReportedSpan - restorePruneGap).Seconds())))
	w("- *unreported*: no lease reported, the grants spread evenly over the last %.0f minutes: the store of\n", UnreportedSpan.Minutes())
	w("  clients that never report. N rows is what N/%s unreported leases per second leave just before a\n", commaInt(int(UnreportedSpan.Seconds())))
	w("  prune (N/%s right after one); keyd keeps the last 70 minutes' worth of them.\n\n", commaInt(int((UnreportedSpan - restorePruneGap).Seconds())))
	w("A store in use holds a mix of the two. keyd is then started %d times, each time on a fresh copy of the\n", res.Config.StartupRuns)
	w("store (a keyd that runs for a second prunes it).\n\n")
	w("| leases in the store | reported | sustained rate that leaves them (before–after a prune) | keyd.db MiB | startup ms | RSS after start MiB |\n")
	w("|---:|---|---:|---:|---:|---:|\n")
	for _, r := range res.Restores {
		var rss []float64
		for _, m := range r.Mem {
			rss = append(rss, mib(m.RSS))
		}
		peak, trough := restoreRates(r.Leases, r.Reported)
		yes := "no"
		if r.Reported {
			yes = "yes"
		}
		w("| %d | %s | %.0f–%.0f/s | %.1f | %s | %s |\n", r.Leases, yes, peak, trough, mib(r.FileBytes),
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
