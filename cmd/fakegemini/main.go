// Command fakegemini serves the fake Gemini API of internal/fakegemini on a
// loopback address, for tests that run keyd, generators or clients in
// other languages against it as separate processes.
//
//	fakegemini [--listen 127.0.0.1:PORT] [--config FILE]
//
// It prints its base URL ("http://127.0.0.1:PORT") as the first line of
// stdout once it accepts connections, logs to stderr, and exits 0 on
// SIGINT or SIGTERM after printing a summary of what it served. It refuses
// to listen on anything but a loopback address.
//
// The configuration file is JSON (see fakegemini.ParseConfig):
//
//	{
//	  "keys":     [{"key": "k1", "project": "p1"}, {"key": "k2", "project": "p1", "state": "leaked"}],
//	  "models":   [{"name": "gemini-2.5-flash", "rpm": 10, "tpm": 250000, "rpd": 250, "tier": "free"}],
//	  "projects": [{"name": "p1", "models": {"gemini-2.5-flash": {"rpm": 5, "rpd": 20}}}],
//	  "quota_format": "newer",
//	  "latency": "20ms",
//	  "clock": {"start": "2026-03-08T00:00:00-08:00", "frozen": true},
//	  "faults": [{"kind": "overloaded", "count": 2}]
//	}
//
// Without --config it serves a demo configuration: keys fake-key-1 and
// fake-key-2 in project fake-project, fake-key-3 in fake-project-2, on the
// free tier of gemini-2.5-flash (10 RPM, 250000 TPM, 250 RPD),
// gemini-2.5-flash-lite (15, 250000, 1000) and gemini-2.5-pro (limit 0).
//
// Tests steer it over HTTP: GET /_fake/stats, GET /_fake/requests,
// POST /_fake/clock, POST /_fake/faults, POST /_fake/reset (see
// fakegemini.Server.AdminHandler).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/keyd/keyd/internal/fakegemini"
)

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
}

// demoConfig is served without --config.
func demoConfig() fakegemini.Config {
	return fakegemini.Config{
		Keys: []fakegemini.Key{
			{Key: "fake-key-1", Project: "fake-project"},
			{Key: "fake-key-2", Project: "fake-project"},
			{Key: "fake-key-3", Project: "fake-project-2"},
		},
		Models: []fakegemini.Model{
			{Name: "gemini-2.5-flash", Tier: fakegemini.Free, Limits: fakegemini.Limits{RPM: 10, TPM: 250000, RPD: 250}},
			{Name: "gemini-2.5-flash-lite", Tier: fakegemini.Free, Limits: fakegemini.Limits{RPM: 15, TPM: 250000, RPD: 1000}},
			{Name: "gemini-2.5-pro", Tier: fakegemini.Free, Limits: fakegemini.Limits{Unavailable: true}},
		},
	}
}

// run is the command; it returns the exit status. It stops when ctx is
// done or on SIGINT/SIGTERM.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("fakegemini", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:0", "`address` to listen on; must be loopback (127.0.0.1, [::1] or localhost); port 0 picks a free one")
	configFile := fs.String("config", "", "JSON configuration `file`; empty: the demo configuration")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: fakegemini [--listen 127.0.0.1:PORT] [--config FILE]")
		fmt.Fprintln(stderr, "Serves a fake Gemini API for tests; prints its base URL on stdout.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "fakegemini: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	if err := checkLoopback(*listen); err != nil {
		fmt.Fprintln(stderr, "fakegemini:", err)
		return 2
	}
	cfg := demoConfig()
	if *configFile != "" {
		data, err := os.ReadFile(*configFile)
		if err != nil {
			fmt.Fprintln(stderr, "fakegemini:", err)
			return 2
		}
		if cfg, err = fakegemini.ParseConfig(data); err != nil {
			fmt.Fprintf(stderr, "fakegemini: %s: %v\n", *configFile, err)
			return 2
		}
	} else if err := cfg.Validate(); err != nil {
		fmt.Fprintln(stderr, "fakegemini: demo config:", err)
		return 2
	}

	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(stderr, "fakegemini:", err)
		return 1
	}
	if err := checkLoopback(ln.Addr().String()); err != nil { // "localhost" resolved elsewhere
		ln.Close()
		fmt.Fprintln(stderr, "fakegemini:", err)
		return 2
	}
	fake := fakegemini.New(cfg)
	srv := &http.Server{Handler: fake, ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	fmt.Fprintf(stdout, "http://%s\n", ln.Addr())
	fmt.Fprintf(stderr, "fakegemini: serving %d keys, %d models on http://%s\n", len(cfg.Keys), len(cfg.Models), ln.Addr())

	status := 0
	select {
	case <-ctx.Done():
	case err := <-served:
		fmt.Fprintln(stderr, "fakegemini:", err)
		status = 1
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		srv.Close()
	}
	st := fake.Stats()
	fmt.Fprintf(stderr, "fakegemini: stopped after %d requests (%d admitted), %d violations\n", st.Requests, st.Admitted, len(st.Violations))
	for _, v := range st.Violations {
		fmt.Fprintln(stderr, "fakegemini: violation:", v)
	}
	return status
}

// checkLoopback refuses any listen address that is not loopback.
func checkLoopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("--listen %q: %v", addr, err)
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("--listen %q: not a loopback address; the fake serves tests only: use 127.0.0.1:PORT, [::1]:PORT or localhost:PORT", addr)
}
