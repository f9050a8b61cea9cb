// Command keyd-loadtest benchmarks keyd from the outside and writes the
// results as markdown:
//
//	keyd-loadtest redis [flags]   keyd against a Redis-backed limiter (docs/bench/redis.md)
//	keyd-loadtest scale [flags]   keyd with 10 to 10,000 keys (docs/bench/scale.md)
//
// Run it from the module's root (it builds keyd and runs benchmarks of
// internal/daemon with the go command); `make bench-redis` and `make
// bench-scale` do. See internal/bench.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/keyd/keyd/internal/bench"
)

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "redis":
		err = runRedis(ctx, os.Args[2:])
	case "scale":
		err = runScale(ctx, os.Args[2:])
	case "-h", "--help", "help":
		usage()
		return
	default:
		usage()
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "keyd-loadtest:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprint(os.Stderr, `Usage:
  keyd-loadtest redis [flags]   keyd against a Redis-backed limiter; writes docs/bench/redis.md
  keyd-loadtest scale [flags]   keyd with many keys and projects; writes docs/bench/scale.md
Run "keyd-loadtest redis -h" or "keyd-loadtest scale -h" for the flags.
`)
}

type intList []int

func (l *intList) String() string {
	var s []string
	for _, n := range *l {
		s = append(s, strconv.Itoa(n))
	}
	return strings.Join(s, ",")
}

func (l *intList) Set(v string) error {
	*l = nil
	if strings.TrimSpace(v) == "" {
		return nil
	}
	for f := range strings.SplitSeq(v, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return fmt.Errorf("%q: want positive integers separated by commas", v)
		}
		*l = append(*l, n)
	}
	return nil
}

// keydBinary returns bin, or builds keyd into a temporary directory when
// bin is empty; cleanup removes what it built.
func keydBinary(ctx context.Context, bin string) (string, func(), error) {
	if bin != "" {
		abs, err := filepath.Abs(bin)
		return abs, func() {}, err
	}
	dir, err := os.MkdirTemp("", "keyd-loadtest")
	if err != nil {
		return "", nil, err
	}
	p, err := bench.BuildKeyd(ctx, dir)
	if err != nil {
		os.RemoveAll(dir)
		return "", nil, err
	}
	return p, func() { os.RemoveAll(dir) }, nil
}

func writeOut(path, md string) error {
	if path == "-" {
		_, err := os.Stdout.WriteString(md)
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(path, []byte(md), 0o644); err != nil {
		return err
	}
	fmt.Fprintln(os.Stderr, "wrote", path)
	return nil
}

func runRedis(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("keyd-loadtest redis", flag.ExitOnError)
	keyd := fs.String("keyd", "", "keyd binary (default: build cmd/keyd into a temporary directory)")
	out := fs.String("out", "docs/bench/redis.md", "markdown file to write (- for stdout)")
	clients := intList{1, 8, 64}
	fs.Var(&clients, "clients", "client counts, comma-separated")
	rounds := fs.Int("rounds", 4, "rounds; each runs every system at every client count once")
	dur := fs.Duration("duration", 2*time.Second, "measured time of each run")
	warm := fs.Duration("warmup", 300*time.Millisecond, "warm-up before each run's measured time")
	disk := fs.String("disk-dir", "", "parent of the durable state directories (default: $TMPDIR or /tmp)")
	tmpfs := fs.String("tmpfs-dir", "/dev/shm", "tmpfs directory for keyd's reference runs")
	breakdown := fs.String("breakdown", "2000x", "-benchtime of BenchmarkLeaseBreakdown (empty: skip)")
	fs.Parse(args)
	redisBin, err := bench.HaveRedis()
	if err != nil {
		return err
	}
	bin, cleanup, err := keydBinary(ctx, *keyd)
	if err != nil {
		return err
	}
	defer cleanup()
	res, err := bench.RunCompare(ctx, bench.CompareConfig{
		KeydBin: bin, RedisBin: redisBin, Clients: clients, Rounds: *rounds, Duration: *dur, Warmup: *warm,
		DiskDir: *disk, TmpfsDir: *tmpfs, BreakdownTime: *breakdown, Command: commandLine(), Log: os.Stderr,
	})
	if err != nil {
		return err
	}
	return writeOut(*out, res.Markdown())
}

func runScale(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("keyd-loadtest scale", flag.ExitOnError)
	keyd := fs.String("keyd", "", "keyd binary (default: build cmd/keyd into a temporary directory)")
	out := fs.String("out", "docs/bench/scale.md", "markdown file to write (- for stdout)")
	keys := intList{10, 1000, 10000}
	fs.Var(&keys, "keys", "key counts, comma-separated")
	projects := intList{1, 100}
	fs.Var(&projects, "projects", "project counts, comma-separated")
	clients := intList{1, 8}
	fs.Var(&clients, "clients", "client counts of the lease runs, comma-separated")
	dur := fs.Duration("duration", 3*time.Second, "measured time of each lease run")
	warm := fs.Duration("warmup", 300*time.Millisecond, "warm-up before each lease run")
	starts := fs.Int("starts", 5, "starts timed per size, on an empty store and again on the store the lease runs left")
	health := fs.Int("health", 200, "GET /v1/health calls timed per size")
	restore := intList{100000, 300000}
	fs.Var(&restore, "restore", "numbers of leases to start keyd on, in a store written beforehand (empty: skip)")
	dir := fs.String("dir", "", "parent of the state directories (default: $TMPDIR or /tmp)")
	choose := fs.String("choose", "300x", "-benchtime of BenchmarkChooseKeys (empty: skip)")
	fs.Parse(args)
	bin, cleanup, err := keydBinary(ctx, *keyd)
	if err != nil {
		return err
	}
	defer cleanup()
	res, err := bench.RunScale(ctx, bench.ScaleConfig{
		KeydBin: bin, Keys: keys, Projects: projects, Clients: clients, Duration: *dur, Warmup: *warm,
		StartupRuns: *starts, HealthCalls: *health, RestoreLeases: restore, Dir: *dir, ChooseTime: *choose, Command: commandLine(), Log: os.Stderr,
	})
	if err != nil {
		return err
	}
	return writeOut(*out, res.Markdown())
}

// commandLine is the command that reproduces this run: the make target
// when make ran it (it sets KEYD_LOADTEST_CMD), else the arguments.
func commandLine() string {
	if c := os.Getenv("KEYD_LOADTEST_CMD"); c != "" {
		return c
	}
	return "go run ./cmd/keyd-loadtest " + strings.Join(os.Args[1:], " ")
}
