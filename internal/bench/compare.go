package bench

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// System is one of the four set-ups the comparison measures.
type System int

const (
	KeydDurable   System = iota // keyd, its store (write-ahead log and bbolt file) on disk
	RedisDurable                // Redis, appendonly yes + appendfsync always, on disk
	KeydTmpfs                   // keyd, its store on tmpfs (fsync costs ~nothing)
	RedisVolatile               // Redis, no AOF, no RDB
)

// Systems in table order.
var Systems = []System{KeydDurable, RedisDurable, KeydTmpfs, RedisVolatile}

func (s System) String() string {
	return [...]string{
		"keyd, durable (log + bbolt on disk)",
		"Redis, durable (AOF, appendfsync always, on disk)",
		"keyd, state on tmpfs (reference)",
		"Redis, no persistence (reference)",
	}[s]
}

func (s System) keyd() bool { return s == KeydDurable || s == KeydTmpfs }

// CompareModel is the model every lease of the comparison asks for.
const CompareModel = "gemini-2.5-flash"

// CompareConfig configures the keyd-versus-Redis comparison.
type CompareConfig struct {
	KeydBin  string // the keyd binary
	RedisBin string // redis-server
	Clients  []int  // client counts, e.g. 1, 8, 64
	Rounds   int    // rounds; each measures every (clients, system) once
	Duration time.Duration
	Warmup   time.Duration
	DiskDir  string // parent of the durable state dirs (default os.TempDir())
	TmpfsDir string // parent of keyd's tmpfs state dirs (default /dev/shm)
	// BreakdownTime is the -benchtime of BenchmarkLeaseBreakdown
	// (internal/daemon), e.g. "2000x"; empty skips the breakdown.
	BreakdownTime string
	Command       string    // the command line, for the document
	Log           io.Writer // progress; nil for none
}

// CompareResult is what RunCompare measured.
type CompareResult struct {
	Config       CompareConfig
	Machine      Machine
	Revision     string
	RedisVersion string
	DiskFS       string
	TmpfsFS      string
	Started      time.Time
	Took         time.Duration
	Load         []float64
	// Runs[clients][system] holds one run per round.
	Runs         map[int]map[System][]*Run
	Breakdown    []GoBench
	BreakdownCmd string
}

func (c *CompareConfig) logf(format string, args ...any) {
	if c.Log != nil {
		fmt.Fprintf(c.Log, format+"\n", args...)
	}
}

// RunCompare runs the comparison: Rounds rounds, each running every
// system at every client count in turn (the order rotating from round to
// round), each run on a freshly started server with an empty store, so
// that the machine's other load falls on all systems alike and the ratio
// holds.
func RunCompare(ctx context.Context, cfg CompareConfig) (*CompareResult, error) {
	if cfg.DiskDir == "" {
		cfg.DiskDir = os.TempDir()
	}
	if cfg.TmpfsDir == "" {
		cfg.TmpfsDir = "/dev/shm"
	}
	if fs := FSOf(cfg.TmpfsDir); !strings.HasPrefix(fs, "tmpfs") {
		return nil, fmt.Errorf("%s is %s, not tmpfs: pass a tmpfs directory for keyd's reference runs", cfg.TmpfsDir, fs)
	}
	if cfg.Rounds < 1 {
		cfg.Rounds = 1
	}
	res := &CompareResult{
		Config: cfg, Machine: ThisMachine(), Revision: Revision(), RedisVersion: RedisVersion(cfg.RedisBin),
		DiskFS: FSOf(cfg.DiskDir), TmpfsFS: FSOf(cfg.TmpfsDir), Started: time.Now(),
		Runs: map[int]map[System][]*Run{},
	}
	for _, n := range cfg.Clients {
		res.Runs[n] = map[System][]*Run{}
	}
	load := StartLoadSampler(5 * time.Second)
	for r := range cfg.Rounds {
		for i, n := range cfg.Clients {
			for j := range Systems {
				sys := Systems[(j+r+i)%len(Systems)]
				run, err := cfg.runOne(ctx, sys, n)
				if err != nil {
					load.Stop()
					return nil, fmt.Errorf("round %d, %d clients, %s: %w", r+1, n, sys, err)
				}
				res.Runs[n][sys] = append(res.Runs[n][sys], run)
				cfg.logf("round %d/%d clients=%-3d %-50s %8.0f pairs/s  pair p50 %.2f ms  p99 %.2f ms  (load %.2f)",
					r+1, cfg.Rounds, n, sys, run.PairsPerSec(), Ms(Pct(run.Pair, 50)), Ms(Pct(run.Pair, 99)), LoadAvg())
			}
		}
	}
	res.Load = load.Stop()
	if cfg.BreakdownTime != "" {
		cfg.logf("breakdown: BenchmarkLeaseBreakdown -benchtime=%s", cfg.BreakdownTime)
		bs, line, err := RunGoBench(ctx, "./internal/daemon/", "^BenchmarkLeaseBreakdown$", cfg.BreakdownTime)
		if err != nil {
			return nil, err
		}
		res.Breakdown, res.BreakdownCmd = bs, line
	}
	res.Took = time.Since(res.Started)
	return res, nil
}

// runOne starts sys fresh, runs n clients on it and stops it.
func (c *CompareConfig) runOne(ctx context.Context, sys System, n int) (run *Run, err error) {
	parent := c.DiskDir
	if sys == KeydTmpfs {
		parent = c.TmpfsDir
	}
	dir, err := os.MkdirTemp(parent, "kb")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	keys := CompareKeys(CompareModel)
	if sys.keyd() {
		config, env, err := WriteKeys(dir, keys)
		if err != nil {
			return nil, err
		}
		k, err := StartKeyd(ctx, c.KeydBin, KeydFiles{Config: config, EnvFile: env,
			StateDir: filepath.Join(dir, "state"), Socket: filepath.Join(dir, "s.sock"), Log: filepath.Join(dir, "keyd.log")})
		if err != nil {
			return nil, err
		}
		defer func() {
			if serr := k.Stop(); err == nil && serr != nil {
				err = serr
			}
		}()
		return RunPairs(ctx, n, c.Warmup, c.Duration, k.PID(), keydPair(k.Client, CompareModel))
	}
	s, err := StartRedis(ctx, c.RedisBin, dir, sys == RedisDurable)
	if err != nil {
		return nil, err
	}
	defer func() {
		if serr := s.Stop(); err == nil && serr != nil {
			err = serr
		}
	}()
	l, err := NewRedisLimiter(ctx, s.Addr, keys, n+4)
	if err != nil {
		return nil, err
	}
	defer l.Close()
	return RunPairs(ctx, n, c.Warmup, c.Duration, s.PID(), redisPair(l, CompareModel))
}

// Revision is the git commit of the working tree, with "+ uncommitted
// changes" when it has any.
func Revision() string {
	out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	rev := strings.TrimSpace(string(out))
	if st, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(strings.TrimSpace(string(st))) > 0 {
		rev += " + uncommitted changes"
	}
	return rev
}

// ratios returns, per round, a(system x)/b(system y) of f.
func ratios(xs, ys []*Run, f func(*Run) float64) []float64 {
	var out []float64
	for i := range min(len(xs), len(ys)) {
		if d := f(ys[i]); d > 0 {
			out = append(out, f(xs[i])/d)
		}
	}
	return out
}

func pps(r *Run) float64 { return r.PairsPerSec() }

// Markdown renders the result as docs/bench/redis.md.
func (res *CompareResult) Markdown() string {
	c := res.Config
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("# keyd against a Redis-backed limiter\n\n")
	w("Generated by `cmd/keyd-loadtest redis` (`internal/bench`); do not edit by hand: rerun the command.\n\n")
	w("Lease+report pairs per second and their latency, keyd over its Unix socket against the seed's design, a\n")
	w("Redis-backed limiter called directly by go-redis clients, both doing the same bookkeeping per request,\n")
	w("both durable, then both without durability for reference, at %s clients, interleaved in one run.\n\n", joinInts(c.Clients))
	w("## Reproduce\n\n```sh\n%s\n```\n\n", c.Command)
	w("Needs Debian's `redis-server` (`apt-get install redis-server`); the benchmark starts its own servers on\n")
	w("127.0.0.1 at a random free port in a temporary directory and stops them after each run (SHUTDOWN NOSAVE;\n")
	w("they are also killed if the benchmark dies). Nothing else is contacted.\n\n")

	w("## The run\n\n")
	w("%s", res.Machine.Markdown())
	w("- keyd at %s; redis-server %s (Debian), go-redis v9\n", res.Revision, res.RedisVersion)
	w("- durable state (keyd's write-ahead log and bbolt file, Redis's AOF) in `%s`: %s; keyd's reference runs in `%s`: %s\n",
		c.DiskDir, res.DiskFS, c.TmpfsDir, res.TmpfsFS)
	w("- 1-minute load average during the run: %s; the benchmark itself keeps up to 2 threads busy\n", LoadSummary(res.Load))
	w("- %d rounds; in each, every system at every client count for %v after %v of warm-up, on a server started\n",
		c.Rounds, c.Duration, c.Warmup)
	w("  fresh on an empty store; the order of the systems rotates from run to run. Total %v, started %s.\n\n",
		res.Took.Round(time.Second), res.Started.UTC().Format("2006-01-02 15:04 UTC"))

	w("## Results\n\n")
	w("One pair is a lease then its report (status 200 with usage), each a separate round trip, as a client\n")
	w("sees it. pairs/s: median of the rounds [min–max]; latencies: percentiles of all pairs of all rounds;\n")
	w("server CPU: the server process's user+system CPU per pair (keyd's, or redis-server's); client CPU: the\n")
	w("benchmark process's, where the clients run (keyd's HTTP client, or go-redis), on the same 2 cores.\n\n")
	w("| clients | system | pairs/s | pair p50 ms | pair p99 ms | lease p50 ms | lease p99 ms | server CPU µs/pair | client CPU µs/pair |\n")
	w("|---:|---|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, n := range c.Clients {
		for _, sys := range Systems {
			runs := res.Runs[n][sys]
			var tp []float64
			for _, r := range runs {
				tp = append(tp, r.PairsPerSec())
			}
			pair := mergeSorted(runs, func(r *Run) []time.Duration { return r.Pair })
			lease := mergeSorted(runs, func(r *Run) []time.Duration { return r.Lease })
			var cpu, ccpu []float64
			for _, r := range runs {
				cpu = append(cpu, r.ServerCPUPerPair())
				ccpu = append(ccpu, r.ClientCPUPerPair())
			}
			w("| %d | %s | %s | %.3f | %.3f | %.3f | %.3f | %.0f | %.0f |\n", n, sys, spread("%.0f", tp),
				Ms(Pct(pair, 50)), Ms(Pct(pair, 99)), Ms(Pct(lease, 50)), Ms(Pct(lease, 99)), median(cpu), median(ccpu))
		}
	}
	w("\n### Ratios\n\n")
	w("keyd's throughput over Redis's, computed per round (the two ran seconds apart) and given as the\n")
	w("median of the rounds [min–max]; above 1, keyd is faster. And the ratio of the pair p50s (below 1, keyd\n")
	w("answers sooner).\n\n")
	w("| clients | durable: pairs/s keyd ÷ Redis | durable: pair p50 keyd ÷ Redis | reference: pairs/s keyd (tmpfs) ÷ Redis (no persistence) | reference: pair p50 ratio |\n")
	w("|---:|---:|---:|---:|---:|\n")
	for _, n := range c.Clients {
		rs := res.Runs[n]
		p50 := func(sys System) float64 {
			return Ms(Pct(mergeSorted(rs[sys], func(r *Run) []time.Duration { return r.Pair }), 50))
		}
		div := func(a, b float64) string {
			if b == 0 {
				return "–"
			}
			return fmt.Sprintf("%.2f", a/b)
		}
		w("| %d | %s | %s | %s | %s |\n", n,
			spread("%.2f", ratios(rs[KeydDurable], rs[RedisDurable], pps)), div(p50(KeydDurable), p50(RedisDurable)),
			spread("%.2f", ratios(rs[KeydTmpfs], rs[RedisVolatile], pps)), div(p50(KeydTmpfs), p50(RedisVolatile)))
	}
	w("\n")
	res.readingMarkdown(&b)
	res.breakdownMarkdown(&b)
	w("## What is compared\n\n")
	w("**keyd** is the real daemon: the `keyd` binary built from this tree, started with `--config`, `--env-file`,\n")
	w("`--state-dir` and `--socket` on 4 keys of one model in 2 projects (keyd's own `BenchmarkLeaseReport` set),\n")
	w("limits no run reaches (rpm 10⁹, tpm 10¹²), log level info. The clients are goroutines of the benchmark\n")
	w("sharing one `client.New(socket)` (HTTP/1.1 + JSON on the Unix socket, keep-alive). A lease is\n")
	w("`POST /v1/leases` (model, tokens 1000); its report `POST /v1/leases/ID/report` (status 200, 900 prompt and\n")
	w("100 output tokens). keyd appends every grant and report to its write-ahead log (group commit, one\n")
	w("`fdatasync` per commit) before it answers, and checkpoints the log into its bbolt file in the background.\n\n")
	w("**Redis** is the seed's design made as fast as it fairly can be: the clients call Redis directly over TCP\n")
	w("on 127.0.0.1 with one shared go-redis v9 client (a pooled connection per client, RESP3), holding\n")
	w("keys.json and the secrets in memory as the seed's `KeyManager` did. A\n")
	w("lease is one `EVALSHA` of a Lua script that does keyd's bookkeeping atomically; its report a second\n")
	w("`EVALSHA`, so a pair is two round trips on both sides. The script (`internal/bench/redis.go`) keeps,\n")
	w("**per (project, model) bucket as keyd does** (the seed tracked RPM/TPM per key; per bucket is what Gemini\n")
	w("enforces and what keyd does, so the work is the same):\n\n")
	w("- the sliding 60 s window of grants as a ZSET (lease → grant time), trimmed on every check, with each\n")
	w("  grant's input tokens in a HASH and their running sum (TPM), so the check is exact, like keyd's;\n")
	w("- the day's grant count (midnight America/Los_Angeles, from the client), INCR with a 2-day expiry;\n")
	w("- the selection keyd makes: every candidate key of the model, each bucket checked once (rpm, tpm, rpd),\n")
	w("  then the highest priority, the most remaining share, the least recently used key (a HASH of last use);\n")
	w("- the grant: window, tokens, sum, day count, last use, the lease record (a HASH expiring an hour after\n")
	w("  its 10 min TTL) and the hour's usage row (HINCRBY requests and tokens);\n")
	w("- the report: marks the lease reported with its class and token counts, replaces the grant's estimate\n")
	w("  in the window and the sum by the real prompt tokens, and adds the difference and the output tokens\n")
	w("  to the usage row. A repeated report changes nothing.\n\n")
	w("What keyd does that the script does not: classify Gemini error bodies and apply penalties (a 200 has\n")
	w("none), FIFO waiting for capacity, expiry of unreported leases, peer-credential checks on the socket.\n")
	w("None of these run in a 200-only benchmark except the permission check (an atomic load).\n\n")
	w("**Durability.** Redis with `appendonly yes` and `appendfsync always` writes each event loop's commands\n")
	w("to its append-only file and fsyncs it before it sends the replies of that loop, so concurrent clients\n")
	w("share an fsync, as in keyd's group commit. Both write one append-only file with one `fdatasync` per\n")
	w("commit; keyd's log files are overwritten in place, so the sync flushes no file metadata.\n\n")
	w("**The reference runs are not the same thing on both sides.** Redis has a real non-durable mode\n")
	w("(`appendonly no`, `save \"\"`: nothing is written at all). keyd has none, and none was added for this:\n")
	w("its reference run puts the state directory on tmpfs (%s), where `fdatasync` returns at once but keyd\n", c.TmpfsDir)
	w("still encodes and writes its log records (to memory), checkpoints them into bbolt and waits for its writer\n")
	w("goroutine's group commit. It shows what the disk costs keyd, not what a keyd without a store would do.\n\n")
	w("Both servers run on the same 2 cores as the clients. Redis executes commands on one thread; keyd uses\n")
	w("every core (GOMAXPROCS %d) and shares them with the benchmark's client goroutines.\n", res.Machine.NProc)
	return b.String()
}

// breakdownMarkdown writes the lease latency breakdown section.
func (res *CompareResult) breakdownMarkdown(b *strings.Builder) {
	w := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	w("## Where a lone lease's time goes\n\n")
	if len(res.Breakdown) == 0 {
		w("(Not measured in this run: `--breakdown` was empty.)\n\n")
		return
	}
	bd := res.Breakdown
	get := func(name, unit string) float64 {
		if m := find(bd, "LeaseBreakdown/"+name); m != nil {
			return m[unit]
		}
		return 0
	}
	w("One client, one lease at a time, keyd's phases timed one by one with `BenchmarkLeaseBreakdown`\n")
	w("(`internal/daemon/breakdown_test.go`, which calls keyd's own functions and changes none of its code):\n\n")
	w("```sh\n%s\n```\n\n", res.BreakdownCmd)
	w("| phase | what is timed | p50 µs | p99 µs |\n|---|---|---:|---:|\n")
	rows := []struct{ name, what string }{
		{"socket-health", "socket + HTTP round trip: `GET /v1/health` through the public client (the floor)"},
		{"decode", "decode: `decodeLeaseRequest` of the lease body"},
		{"select", "select: `choose` under the pool's mutex (4 keys, 2 buckets)"},
		{"grant-nostore", "select + grant in memory: `pool.lease` with a store that commits nothing"},
		{"encode", "encode: `appendLease` of the answer"},
		{"commit", "commit: one grant's records appended to the write-ahead log, alone (one `fdatasync`)"},
		{"socket-lease-nostore", "whole lease over the socket, store that commits nothing"},
		{"socket-lease", "whole lease over the socket, keyd started by `Run` with its durable store"},
	}
	for _, r := range rows {
		w("| %s | %s | %.1f | %.1f |\n", r.name, r.what, get(r.name, "p50-us"), get(r.name, "p99-us"))
	}
	whole, nostore := get("socket-lease", "p50-us"), get("socket-lease-nostore", "p50-us")
	sock, grant := get("socket-health", "p50-us"), get("grant-nostore", "p50-us")
	dec, enc, commit := get("decode", "p50-us"), get("encode", "p50-us"), get("commit", "p50-us")
	parts := sock + dec + grant + enc + commit
	w("\nReading the p50s (medians do not add up exactly):\n\n")
	w("- socket and HTTP, both ways: %.0f µs; keyd's own work (decode %.1f + select and grant %.1f + encode %.1f):\n", sock, dec, grant, enc)
	w("  %.1f µs; the commit: %.0f µs. Without a store, the whole lease takes %.0f µs over the socket.\n", dec+grant+enc, commit, nostore)
	if whole > 0 {
		w("- The durable lease takes %.0f µs: the commit is %.0f%% of it. The parts add up to %.0f µs; the other %.0f µs\n",
			whole, 100*commit/whole, parts, whole-parts)
		w("  are the wake-ups around the fsync: the process sleeps while the disk syncs, and the writer goroutine,\n")
		w("  the handler and the client's connection each wake on an idle CPU.\n")
	}
	w("\n")
}

func joinInts(xs []int) string {
	var s []string
	for _, x := range xs {
		s = append(s, fmt.Sprint(x))
	}
	if len(s) <= 1 {
		return strings.Join(s, "")
	}
	return strings.Join(s[:len(s)-1], ", ") + " and " + s[len(s)-1]
}

// readingMarkdown states what the table shows, from its own numbers.
func (res *CompareResult) readingMarkdown(b *strings.Builder) {
	w := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	c := res.Config
	if len(c.Clients) == 0 {
		return
	}
	med := func(n int, sys System, f func(*Run) float64) float64 {
		var xs []float64
		for _, r := range res.Runs[n][sys] {
			xs = append(xs, f(r))
		}
		return median(xs)
	}
	leaseP50 := func(n int, sys System) float64 {
		return Ms(Pct(mergeSorted(res.Runs[n][sys], func(r *Run) []time.Duration { return r.Lease }), 50))
	}
	ratio := func(n int, a, b System) float64 { return median(ratios(res.Runs[n][a], res.Runs[n][b], pps)) }
	clients := func(n int) string {
		if n == 1 {
			return "1 client"
		}
		return fmt.Sprintf("%d clients", n)
	}
	lo, hi := c.Clients[0], c.Clients[len(c.Clients)-1]
	w("### Reading\n\n")
	w("Ratios below are the medians of the per-round ratios, as in the table above.\n\n")
	w("- Durable, %s: keyd %.0f pairs/s, Redis %.0f (ratio %.2f); a lease's p50 is %.3f ms on keyd and\n",
		clients(lo), med(lo, KeydDurable, pps), med(lo, RedisDurable, pps), ratio(lo, KeydDurable, RedisDurable),
		leaseP50(lo, KeydDurable))
	w("  %.3f ms on Redis. Each waits for its own fsync: Redis's one `fdatasync` of its append-only file, keyd's\n", leaseP50(lo, RedisDurable))
	w("  log commit's one (see the breakdown below).\n")
	w("- Durable, %s: keyd %.0f pairs/s, Redis %.0f (ratio %.2f). Without the disk's fsyncs, keyd (on\n", clients(hi),
		med(hi, KeydDurable, pps), med(hi, RedisDurable, pps), ratio(hi, KeydDurable, RedisDurable))
	w("  tmpfs) makes ×%.2f its durable throughput and Redis (no persistence) ×%.2f: the larger the factor, the\n",
		ratio(hi, KeydTmpfs, KeydDurable), ratio(hi, RedisVolatile, RedisDurable))
	w("  more that system waits on its fsyncs rather than on the CPU at this concurrency.\n")
	scpu := func(sys System) float64 { return med(hi, sys, (*Run).ServerCPUPerPair) }
	ccpu := func(sys System) float64 { return med(hi, sys, (*Run).ClientCPUPerPair) }
	w("- CPU per pair at %s, server + clients: keyd %.0f + %.0f µs (HTTP/1.1 + JSON on both ends, the log),\n",
		clients(hi), scpu(KeydDurable), ccpu(KeydDurable))
	w("  Redis %.0f + %.0f µs (RESP, Lua). On %d cores shared by server and clients, CPU per pair bounds the\n",
		scpu(RedisDurable), ccpu(RedisDurable), res.Machine.NProc)
	w("  throughput once enough clients keep the fsyncs full.\n")
	w("- Without durability, at %s: keyd on tmpfs against Redis without persistence, ratio %.2f: what is\n",
		clients(hi), ratio(hi, KeydTmpfs, RedisVolatile))
	w("  left is the cost of the protocol and the server, and keyd's log writes and checkpoints in memory.\n\n")
}
