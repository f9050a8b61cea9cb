// Package daemon is keyd: it owns a pool of Gemini API keys, enforces
// each (project, model) bucket's limits exactly, and serves short-lived
// key leases over HTTP/1.1 on a Unix socket, recording every grant and
// report durably before it answers.
package daemon

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/config"
	"github.com/keyd/keyd/internal/gctune"
	"github.com/keyd/keyd/internal/limiter"
	"github.com/keyd/keyd/internal/sdnotify"
	"github.com/keyd/keyd/internal/store"
	"github.com/keyd/keyd/internal/watch"
)

// watchDebounce is the quiet time after a change to keys.json or .env
// before keyd reloads: editors write in several steps.
const watchDebounce = 100 * time.Millisecond

// Version is keyd's version, set at build time with -ldflags "-X".
var Version = "0.1.0-dev"

// Options configure one run of keyd. Empty fields take the defaults that
// keyd --help describes.
type Options struct {
	ConfigPath  string
	EnvFile     string
	SocketPath  string
	SocketGroup string
	StateDir    string
	LogLevel    slog.Level
	LogFormat   string    // "text" (default) or "json"
	Log         io.Writer // default os.Stderr
	// MetricsListen, when set, is a loopback host:port where keyd also
	// serves GET /metrics over TCP (the socket always serves it).
	MetricsListen string
	// Ready, when set, is called once the socket listens.
	Ready func()
	// GCHeadroom is the heap headroom in bytes that Main keeps for the
	// garbage collector (--gc-headroom; 0 is off). Run ignores it: the
	// collector is the whole process's, and tests embed Run.
	GCHeadroom int64
	// Store tunes the durable store's write-ahead log (checkpoint size
	// and interval, segment bound) for tests and benchmarks; the zero
	// value is the store's defaults, which keyd always uses. Its OnCommit
	// is Run's own.
	Store store.Options
}

// Main runs keyd with command-line args and returns its exit code.
func Main(args []string) int {
	opts, err := parseFlags(args, os.Stdout, os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		return 2
	}
	if stopGC := tuneGC(os.Stderr, opts); stopGC != nil {
		defer stopGC()
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := Run(ctx, opts); err != nil {
		fmt.Fprintln(os.Stderr, "keyd:", err)
		return 1
	}
	return 0
}

func parseFlags(args []string, stdout, stderr io.Writer) (Options, error) {
	fs := flag.NewFlagSet("keyd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o Options
	var level string
	var gcMiB int64
	fs.StringVar(&o.ConfigPath, "config", "", "keys.json to load (default $KEYD_CONFIG, else ./keys.json)")
	fs.StringVar(&o.EnvFile, "env-file", "", "`.env` file holding GEMINI_KEY_<key_id>=... secrets (default: .env beside keys.json; a missing file is fine)")
	fs.StringVar(&o.SocketPath, "socket", "", "Unix socket to serve (default $KEYD_SOCKET, else $RUNTIME_DIRECTORY/keyd.sock,\nelse /run/keyd/keyd.sock for root, else $XDG_RUNTIME_DIR/keyd/keyd.sock)")
	fs.StringVar(&o.SocketGroup, "socket-group", "", "group (name or gid) that owns the socket, mode 0660 (default: keyd's own group)")
	fs.StringVar(&o.StateDir, "state-dir", "", "directory of the durable store keyd.db (default $STATE_DIRECTORY,\nelse $XDG_STATE_HOME/keyd, else ~/.local/state/keyd)")
	fs.StringVar(&level, "log-level", "info", "log level: debug, info, warn or error")
	fs.StringVar(&o.LogFormat, "log-format", "text", "log format: text (logfmt, for terminals and journald) or json (one object a line)")
	fs.StringVar(&o.MetricsListen, "metrics-listen", "", "also serve Prometheus metrics (GET /metrics) at this loopback `HOST:PORT`,\ne.g. 127.0.0.1:9464; the socket serves them in any case")
	fs.Int64Var(&gcMiB, "gc-headroom", gctune.DefaultHeadroom>>20, "keep the Go heap goal at least this many `MiB` above the live heap: the garbage collector\nruns less often on a small heap. 0 turns it off, and so does GOGC set in the environment")
	fs.Usage = func() {
		fmt.Fprintf(stderr, `keyd owns a pool of Gemini API keys and hands out short-lived key leases
over a Unix socket, keeping every (project, model) bucket within its limits.

Usage: keyd [flags]

Flags:
`)
		fs.PrintDefaults()
		fmt.Fprintf(stderr, `
Secrets: GEMINI_KEY_<key_id> (or the key's secret_env) is looked up in the
environment, then in the .env file, then in $CREDENTIALS_DIRECTORY/<key_id>.
Talk to keyd with keyctl: keyctl status, keyctl lease --model M.
`)
	}
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "keyd: unexpected argument %q: keyd takes only flags (see keyd --help)\n", fs.Arg(0))
		return o, errors.New("usage")
	}
	if err := o.LogLevel.UnmarshalText([]byte(level)); err != nil {
		fmt.Fprintf(stderr, "keyd: --log-level %q: use debug, info, warn or error\n", level)
		return o, err
	}
	if err := checkLogFormat(o.LogFormat); err != nil {
		fmt.Fprintf(stderr, "keyd: %v\n", err)
		return o, err
	}
	if o.MetricsListen != "" {
		if _, err := checkMetricsListen(o.MetricsListen); err != nil {
			fmt.Fprintf(stderr, "keyd: %v\n", err)
			return o, err
		}
	}
	if gcMiB < 0 || gcMiB > maxGCHeadroomMiB {
		err := fmt.Errorf("--gc-headroom %d: use 0 (off) to %d MiB", gcMiB, maxGCHeadroomMiB)
		fmt.Fprintf(stderr, "keyd: %v\n", err)
		return o, err
	}
	o.GCHeadroom = gcMiB << 20
	return o, nil
}

// maxGCHeadroomMiB bounds --gc-headroom at 1 TiB, far above any use and
// far below an overflow.
const maxGCHeadroomMiB = 1 << 20

// tuneGC starts the keyd binary's heap headroom for the garbage collector
// (internal/gctune, o.GCHeadroom) and logs to w, in keyd's log format, one
// line saying what it chose. It returns the tuner's stop, or nil if it
// does not tune.
func tuneGC(w io.Writer, o Options) (stop func()) {
	log, err := newLogger(w, o.LogFormat, o.LogLevel)
	if err != nil {
		fmt.Fprintf(w, "keyd: gc heap headroom off: %v\n", err) // parseFlags checked the format: not expected
		return nil
	}
	headroom := o.GCHeadroom
	if headroom == 0 {
		log.Info("gc heap headroom off", "reason", "--gc-headroom 0")
		return nil
	}
	stop, err = gctune.Start(headroom)
	if err != nil {
		log.Info("gc heap headroom off", "reason", err.Error())
		return nil
	}
	args := []any{"mib", headroom >> 20}
	if v := os.Getenv("GOMEMLIMIT"); v != "" {
		args = append(args, "gomemlimit", v) // the limit still caps the heap
	}
	log.Info("gc heap headroom", args...)
	return stop
}

func checkLogFormat(f string) error {
	switch f {
	case "", "text", "json":
		return nil
	}
	return fmt.Errorf("--log-format %q: use text or json", f)
}

// newLogger returns keyd's logger: logfmt text, or JSON objects, one a
// line. Neither ever carries a secret: keyd logs key IDs, never keys.
func newLogger(w io.Writer, format string, level slog.Level) (*slog.Logger, error) {
	if err := checkLogFormat(format); err != nil {
		return nil, err
	}
	opts := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return slog.New(slog.NewTextHandler(w, opts)), nil
}

// ConfigPath resolves the keys.json path: flag, $KEYD_CONFIG, ./keys.json.
func ConfigPath(flagValue string) string {
	if flagValue != "" {
		return flagValue
	}
	if p := os.Getenv("KEYD_CONFIG"); p != "" {
		return p
	}
	return "keys.json"
}

// StateDir resolves the state directory: flag, $STATE_DIRECTORY,
// $XDG_STATE_HOME/keyd, ~/.local/state/keyd.
func StateDir(flagValue string) (string, error) {
	if flagValue != "" {
		return flagValue, nil
	}
	if d := os.Getenv("STATE_DIRECTORY"); d != "" {
		return filepath.SplitList(d)[0], nil
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "keyd"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("no state directory: pass --state-dir or set $STATE_DIRECTORY (%v)", err)
	}
	return filepath.Join(home, ".local", "state", "keyd"), nil
}

func lookupGroup(name string) (int, error) {
	if name == "" {
		return -1, nil
	}
	if n, err := strconv.Atoi(name); err == nil {
		return n, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, fmt.Errorf("--socket-group %q: %v", name, err)
	}
	return strconv.Atoi(g.Gid)
}

// Run runs keyd until ctx is done. Startup order: config, store, state
// restore, socket, serve; shutdown: refuse waiters, drain requests
// (bounded), close the store, remove the socket.
func Run(ctx context.Context, o Options) error {
	// SIGHUP reloads; taken first, since its default action kills.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	logw := o.Log
	if logw == nil {
		logw = os.Stderr
	}
	log, err := newLogger(logw, o.LogFormat, o.LogLevel)
	if err != nil {
		return err
	}
	metricsAddr := ""
	if o.MetricsListen != "" {
		if metricsAddr, err = checkMetricsListen(o.MetricsListen); err != nil {
			return err
		}
	}
	cfgPath := ConfigPath(o.ConfigPath)
	copts := config.Options{EnvFile: o.EnvFile}
	cfg, err := config.Load(cfgPath, copts)
	if err != nil {
		return fmt.Errorf("loading config: %w", err)
	}
	gid, err := lookupGroup(o.SocketGroup)
	if err != nil {
		return err
	}
	stateDir, err := StateDir(o.StateDir)
	if err != nil {
		return err
	}
	commits := newHistogram(storeCommitBounds)
	sopts := o.Store
	sopts.OnCommit = commits.observe
	sopts.Logf = storeLogf(log)
	st, err := store.Open(stateDir, sopts)
	if err != nil {
		return fmt.Errorf("opening the store: %w", err)
	}
	defer st.Close()

	p := newPool(st, time.Now, log)
	p.m.storeCommit = commits
	now := time.Now()
	p.mu.Lock()
	fixups := &store.Batch{}
	p.apply(cfg, now, fixups)
	p.logConfig(cfg, "loaded")
	saved, err := st.Load(now.Add(-(cfg.LeaseTTL + leaseGrace)), restoreDays(cfg, now))
	if err != nil {
		p.mu.Unlock()
		return fmt.Errorf("reading the store: %w", err)
	}
	p.restore(saved, now, fixups)
	p.mu.Unlock()
	if err := st.Commit(ctx, fixups); err != nil {
		return fmt.Errorf("updating the store: %w", err)
	}
	penalties, learned := len(saved.Keys), 0
	for _, b := range saved.Buckets {
		if b.State != api.StateReady || b.Streak > 0 {
			penalties++
		}
		learned += len(b.Learned)
	}
	log.Info("state restored", "dir", stateDir, "leases", len(saved.Leases), "penalties", penalties, "learned_limits", learned)

	sock := o.SocketPath
	if sock == "" {
		sock = api.DefaultSocketPath()
	}
	ln, activated, err := openListener(sock, gid)
	if err != nil {
		return err
	}
	if activated {
		sock = ln.Addr().String()
	}
	notify := func(state string) {
		if err := sdnotify.Send(state); err != nil {
			log.Warn("systemd notify failed", "err", err)
		}
	}
	statusLine := func() string {
		h := p.health(Version)
		return fmt.Sprintf("STATUS=%d/%d keys ready", h.KeysReady, h.KeysTotal)
	}
	// reload is the one reload path: POST /v1/reload, SIGHUP and the file
	// watcher all call it, one at a time.
	var reloadMu sync.Mutex
	reload := func() (*api.ReloadResponse, *api.Error) {
		reloadMu.Lock()
		defer reloadMu.Unlock()
		notify(sdnotify.Reloading())
		defer func() { notify("READY=1\n" + statusLine()) }()
		return p.reload(func() (*config.Config, error) { return config.Load(cfgPath, copts) })
	}
	// Requests live in their own context, canceled only after Shutdown has
	// drained them, so that waiters get shutting_down rather than a reset.
	reqCtx, cancelReqs := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelReqs()
	srv := &server{pool: p, version: Version, self: uint32(os.Getuid()), log: log, reload: reload}
	hs := &http.Server{
		Handler:           srv.handler(),
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       2 * time.Minute,
		BaseContext:       func(net.Listener) context.Context { return reqCtx },
		ConnContext:       connContext,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	var ms *http.Server // --metrics-listen
	var mln net.Listener
	if metricsAddr != "" {
		if mln, err = net.Listen("tcp", metricsAddr); err != nil {
			ln.Close()
			return metricsListenError(metricsAddr, err)
		}
		ms = &http.Server{
			Handler:           srv.metricsHandler(),
			ReadHeaderTimeout: 5 * time.Second,
			IdleTimeout:       2 * time.Minute,
			ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		}
		defer ms.Close()
	}
	serveErr := make(chan error, 2)
	go func() { serveErr <- fmt.Errorf("serving %s: %w", sock, hs.Serve(ln)) }()
	if ms != nil {
		go func() {
			if err := ms.Serve(mln); !errors.Is(err, http.ErrServerClosed) {
				serveErr <- fmt.Errorf("metrics on %s: %w", mln.Addr(), err)
			}
		}()
		log.Info("serving metrics", "addr", mln.Addr().String(), "path", api.RouteMetrics)
	}
	log.Info("keyd serving", "socket", sock, "version", Version, "pid", os.Getpid())
	notify("READY=1\n" + statusLine())
	if o.Ready != nil {
		o.Ready()
	}
	var watchdog <-chan time.Time
	if d := sdnotify.WatchdogInterval(); d > 0 {
		t := time.NewTicker(d)
		defer t.Stop()
		watchdog = t.C
	}

	watchCtx, stopWatch := context.WithCancel(ctx)
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		err := watch.Run(watchCtx, []string{cfg.Path, cfg.EnvFile}, watchDebounce, log, func() {
			// Events in the directories are many and mostly not ours:
			// go through reload (and its notify messages) only on a change.
			if next, err := config.Load(cfgPath, copts); err == nil {
				p.mu.Lock()
				same := sameConfig(p.cfg, next)
				if same {
					p.lastErr = ""
				}
				p.mu.Unlock()
				if same {
					return
				}
			}
			reload()
		})
		if err != nil && !errors.Is(err, context.Canceled) {
			log.Error("watching the config files failed; reload with keyctl reload or SIGHUP", "err", err)
		}
	}()
	defer func() { stopWatch(); <-watchDone }()

	janitor := time.NewTicker(time.Second)
	defer janitor.Stop()
	lastPrune := time.Time{}
	for {
		select {
		case <-hup:
			reload()
			continue
		case <-watchdog:
			notify("WATCHDOG=1\n" + statusLine())
			continue
		case t := <-janitor.C:
			p.mu.Lock()
			p.expire(p.now())
			ttl := p.cfg.LeaseTTL
			p.mu.Unlock()
			if t.Sub(lastPrune) > 10*time.Minute {
				lastPrune = t
				// A minute of slack on each: records a restart would
				// still restore are never pruned.
				err := st.Prune(t.Add(-(ttl + leaseGrace + time.Minute)), t.Add(-(reportRetention + time.Minute)), t.Add(-35*24*time.Hour))
				if err != nil {
					log.Error("pruning the store failed", "err", err)
				}
			}
			continue
		case err := <-serveErr:
			return err
		case <-ctx.Done():
		}
		break
	}
	log.Info("keyd stopping")
	notify("STOPPING=1")
	p.mu.Lock()
	p.closing = true
	p.kick()
	p.mu.Unlock()
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if ms != nil {
		ms.Close() // a scrape is cheap to lose
	}
	if err := hs.Shutdown(sctx); err != nil {
		log.Warn("requests still running at shutdown were cut", "err", err)
	}
	if err := st.Close(); err != nil {
		return fmt.Errorf("closing the store: %w", err)
	}
	log.Info("keyd stopped")
	return nil
}

// openListener returns the socket systemd passed (socket activation), or
// opens sock itself. An activated socket belongs to systemd: keyd never
// unlinks it, so that it survives keyd's restarts.
func openListener(sock string, gid int) (ln net.Listener, activated bool, err error) {
	lns, err := sdnotify.Listeners()
	if err != nil {
		return nil, false, err
	}
	switch len(lns) {
	case 0:
		ln, err := listen(sock, gid)
		return ln, false, err
	case 1:
		if ul, ok := lns[0].(*net.UnixListener); ok {
			ul.SetUnlinkOnClose(false)
			return ul, true, nil
		}
		lns[0].Close()
		return nil, false, fmt.Errorf("socket activation passed a %s socket: keyd serves a Unix stream socket (ListenStream=/run/keyd/keyd.sock)", lns[0].Addr().Network())
	}
	for _, l := range lns {
		l.Close()
	}
	return nil, false, fmt.Errorf("socket activation passed %d sockets: keyd takes exactly one", len(lns))
}

// restoreDays lists the days whose counts a restart needs: today and
// yesterday in the day-reset zone.
func restoreDays(cfg *config.Config, now time.Time) []string {
	b := limiter.New(limiter.Limits{RPM: 1, TPM: 1}, cfg.DayResetLocation)
	return []string{b.DayOf(now), b.DayOf(now.Add(-24 * time.Hour))}
}

// storeLogf passes the store's rare diagnostics to keyd's log: records
// recovered from the write-ahead log and schema upgrades at info (what a
// restart after a crash or an upgrade does), everything else (a failed
// log write or checkpoint, a commit over a second, a pid file) at warn.
func storeLogf(log *slog.Logger) func(format string, args ...any) {
	return func(format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		level := slog.LevelWarn
		if strings.HasPrefix(msg, "store: applied ") || strings.HasPrefix(msg, "store: upgraded ") {
			level = slog.LevelInfo
		}
		log.Log(context.Background(), level, msg)
	}
}
