package daemon

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/client"
	"github.com/keyd/keyd/internal/config"
	"github.com/keyd/keyd/internal/store"
)

// This file breaks a lone lease's latency down into its phases without
// changing keyd's code: each phase is timed on its own, by calling the
// functions the lease path calls (decodeLeaseRequest, choose, grant,
// appendLease, the store's Commit) directly, and the whole lease is timed
// over the socket twice, once with the durable store and once with a store
// that commits nothing. docs/bench/redis.md shows the result
// (cmd/keyd-loadtest redis runs BenchmarkLeaseBreakdown and parses it);
// docs/bench/scale.md shows BenchmarkChooseKeys.

// bdNoStore is a Store that records nothing and answers at once: the lease
// path without its commit.
type bdNoStore struct{}

func (bdNoStore) Commit(context.Context, *store.Batch) error      { return nil }
func (bdNoStore) Submit(*store.Batch) *store.Pending              { return store.Done(nil) }
func (bdNoStore) Load(time.Time, []string) (*store.State, error)  { return &store.State{}, nil }
func (bdNoStore) Usage(time.Time, string) ([]api.UsageRow, error) { return nil, nil }
func (bdNoStore) Prune(time.Time, time.Time, time.Time) error     { return nil }
func (bdNoStore) Close() error                                    { return nil }

// bdConfig loads keysJSON with a made-up secret for every key.
func bdConfig(tb testing.TB, keysJSON string) *config.Config {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "keys.json")
	if err := os.WriteFile(path, []byte(keysJSON), 0o600); err != nil {
		tb.Fatal(err)
	}
	cfg, err := config.Load(path, config.Options{Getenv: func(k string) string {
		if id, ok := strings.CutPrefix(k, "GEMINI_KEY_"); ok {
			return "AIzaBENCH-" + id
		}
		return ""
	}})
	if err != nil {
		tb.Fatal(err)
	}
	return cfg
}

// bdPool is a pool on st with the configuration keysJSON.
func bdPool(tb testing.TB, st store.Store, keysJSON string) *pool {
	tb.Helper()
	p := newPool(st, time.Now, slog.New(slog.NewTextHandler(io.Discard, nil)))
	p.mu.Lock()
	p.apply(bdConfig(tb, keysJSON), time.Now(), &store.Batch{})
	p.mu.Unlock()
	return p
}

// bdServe serves p's API on a Unix socket as Run does, and returns the
// socket's path.
func bdServe(tb testing.TB, p *pool) string {
	tb.Helper()
	sock := filepath.Join(shortDir(tb), "s.sock")
	ln, err := listen(sock, -1)
	if err != nil {
		tb.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv := &server{pool: p, version: Version, self: uint32(os.Getuid()), log: log}
	hs := &http.Server{Handler: srv.handler(), ConnContext: connContext, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() { defer close(done); hs.Serve(ln) }()
	tb.Cleanup(func() { hs.Close(); <-done })
	return sock
}

// bdTimes collects one duration per op and reports percentiles.
type bdTimes struct{ d []time.Duration }

func (t *bdTimes) add(d time.Duration) { t.d = append(t.d, d) }

func (t *bdTimes) report(b *testing.B, prefix string) {
	slices.Sort(t.d)
	b.ReportMetric(us(pct(t.d, 50)), prefix+"p50-us")
	b.ReportMetric(us(pct(t.d, 99)), prefix+"p99-us")
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

var bdReport = api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: 900, OutputTokens: 100}}

// BenchmarkLeaseBreakdown times the phases of a lone lease (one client),
// each on its own, on benchKeys (4 keys in 2 projects, limits no run
// reaches). Every sub-benchmark reports the p50 and p99 of one op in µs:
//
//	socket-health       GET /v1/health over the socket through the public
//	                    client: the socket + HTTP round trip floor
//	socket-lease-nostore a lease over the socket, keyd's own server and
//	                    pool, with a store that commits nothing
//	socket-lease        a lease over the socket to keyd started by Run with
//	                    its durable store: the whole lease
//	decode              decodeLeaseRequest of a lease body
//	select              choose, under the pool's mutex
//	grant-nostore       pool.lease with a store that commits nothing:
//	                    choose, the grant's bookkeeping, the batch
//	encode              appendLease of the answer
//	commit              store Commit of one grant's batch (lease, day
//	                    count, usage) on a real bbolt file, alone: two
//	                    fdatasyncs
//
// Each lease is followed by its report (untimed unless stated), so the
// state stays what a real lease sees.
func BenchmarkLeaseBreakdown(b *testing.B) {
	ctx := context.Background()
	leaseReq := api.LeaseRequest{Model: "m", Tokens: 1000, Client: "bench"}
	body := []byte(`{"model":"m","tokens":1000,"client":"bench"}`)

	b.Run("socket-health", func(b *testing.B) {
		d := startDaemonLevel(b, benchKeys, slog.LevelInfo)
		c := client.New(d.socket)
		defer c.CloseIdleConnections()
		bdLoop(b, func(t *bdTimes) error {
			t0 := time.Now()
			_, err := c.Health(ctx)
			t.add(time.Since(t0))
			return err
		})
	})
	socketLease := func(b *testing.B, c *client.Client) {
		var rep bdTimes
		bdLoop(b, func(t *bdTimes) error {
			t0 := time.Now()
			l, err := c.Lease(ctx, leaseReq)
			t.add(time.Since(t0))
			if err != nil {
				return err
			}
			t1 := time.Now()
			_, err = c.Report(ctx, l.LeaseID, bdReport)
			rep.add(time.Since(t1))
			return err
		})
		rep.report(b, "report-")
	}
	b.Run("socket-lease-nostore", func(b *testing.B) {
		c := client.New(bdServe(b, bdPool(b, bdNoStore{}, benchKeys)))
		defer c.CloseIdleConnections()
		socketLease(b, c)
	})
	b.Run("socket-lease", func(b *testing.B) {
		d := startDaemonLevel(b, benchKeys, slog.LevelInfo)
		c := client.New(d.socket)
		defer c.CloseIdleConnections()
		socketLease(b, c)
	})
	b.Run("decode", func(b *testing.B) {
		rd := bytes.NewReader(body)
		r, _ := http.NewRequest(http.MethodPost, "http://keyd/v1/leases", nil)
		bdLoop(b, func(t *bdTimes) error {
			rd.Reset(body)
			r.Body = http.MaxBytesReader(nil, io.NopCloser(rd), maxBody)
			t0 := time.Now()
			_, err := decodeLeaseRequest(r)
			t.add(time.Since(t0))
			if err != nil {
				return err
			}
			return nil
		})
	})
	b.Run("select", func(b *testing.B) {
		p := bdPool(b, bdNoStore{}, benchKeys)
		bdLoop(b, func(t *bdTimes) error { return bdSelect(p, t, "m") })
	})
	b.Run("grant-nostore", func(b *testing.B) {
		p := bdPool(b, bdNoStore{}, benchKeys)
		bdLoop(b, func(t *bdTimes) error { return bdGrant(ctx, p, t, "m") })
	})
	b.Run("encode", func(b *testing.B) {
		l := &api.Lease{LeaseID: newLeaseID(time.Now()), KeyID: "k1", Project: "p1", Model: "m",
			Secret: exampleSecret, Tokens: 1000, ExpiresAt: time.Now().Add(10 * time.Minute)}
		buf := make([]byte, 0, fastBody)
		bdLoop(b, func(t *bdTimes) error {
			t0 := time.Now()
			out, ok := appendLease(buf[:0], l)
			t.add(time.Since(t0))
			if !ok || len(out) == 0 {
				return fmt.Errorf("appendLease declined %+v", l)
			}
			return nil
		})
	})
	b.Run("commit", func(b *testing.B) {
		db, err := store.Open(filepath.Join(shortDir(b), "state"), store.Options{})
		if err != nil {
			b.Fatal(err)
		}
		defer db.Close()
		bdLoop(b, func(t *bdTimes) error {
			now := time.Now()
			l := store.Lease{ID: newLeaseID(now), KeyID: "k1", Project: "p1", Model: "m", Client: "bench",
				Tokens: 1000, GrantedAt: now, ExpiresAt: now.Add(10 * time.Minute), Day: "2026-01-02"}
			batch := &store.Batch{Leases: []store.Lease{l},
				Days:  []store.Day{{Project: "p1", Model: "m", Day: "2026-01-02", Count: 1}},
				Usage: []store.UsageDelta{{Hour: hour(now), Project: "p1", Model: "m", KeyID: "k1", Requests: 1, PromptTokens: 1000}}}
			t0 := time.Now()
			err := db.Commit(ctx, batch)
			t.add(time.Since(t0))
			return err
		})
	})
}

// bdLoop runs op b.N times after a few untimed ones and reports the
// percentiles of the durations op recorded.
func bdLoop(b *testing.B, op func(*bdTimes) error) {
	b.Helper()
	var warm bdTimes
	for range 10 {
		if err := op(&warm); err != nil {
			b.Fatal(err)
		}
	}
	t := &bdTimes{d: make([]time.Duration, 0, b.N)}
	b.ResetTimer()
	for range b.N {
		if err := op(t); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	t.report(b, "")
}

// bdSelect times one choose under the pool's mutex, as lease takes it.
func bdSelect(p *pool, t *bdTimes, model string) error {
	t0 := time.Now()
	p.mu.Lock()
	sel := p.choose(p.now(), model, "", 1000, false)
	p.mu.Unlock()
	t.add(time.Since(t0))
	if sel.key == nil {
		return fmt.Errorf("choose found no key: %v %v", sel.err, sel.why)
	}
	return nil
}

// bdGrant times one in-memory lease (choose and grant, store excluded),
// then reports it untimed so that the state stays steady.
func bdGrant(ctx context.Context, p *pool, t *bdTimes, model string) error {
	req := api.LeaseRequest{Model: model, Tokens: 1000, Client: "bench"}
	t0 := time.Now()
	l, aerr := p.lease(ctx, &req)
	t.add(time.Since(t0))
	if aerr != nil {
		return aerr
	}
	if _, aerr := p.report(ctx, l.LeaseID, &bdReport); aerr != nil {
		return aerr
	}
	return nil
}

// bdScaleKeys is keys.json with n keys of model "m" spread round-robin
// over projects projects (at most n), limits no run reaches.
func bdScaleKeys(n, projects int) string {
	projects = max(1, min(projects, n))
	var sb strings.Builder
	sb.WriteString(`{"default_tokens":1000,"keys":[`)
	for i := range n {
		if i > 0 {
			sb.WriteByte(',')
		}
		fmt.Fprintf(&sb, `{"key_id":"k%05d","project":"p%03d","model_name":"m","rpm":1000000000,"tpm":1000000000000}`, i, i%projects)
	}
	sb.WriteString(`]}`)
	return sb.String()
}

// bdScaleSizes are the (keys, projects) pairs of docs/bench/scale.md.
var bdScaleSizes = [][2]int{{10, 1}, {10, 100}, {1000, 1}, {1000, 100}, {10000, 1}, {10000, 100}}

// BenchmarkChooseKeys measures how the in-memory lease path grows with the
// number of keys serving one model: select (choose under the mutex) and
// grant-nostore (a whole in-memory lease, store excluded), for 10, 1,000
// and 10,000 keys across 1 and 100 projects (at most one project per key).
func BenchmarkChooseKeys(b *testing.B) {
	ctx := context.Background()
	for _, sz := range bdScaleSizes {
		n, projects := sz[0], max(1, min(sz[1], sz[0]))
		keys := bdScaleKeys(n, projects)
		b.Run(fmt.Sprintf("keys=%d/projects=%d/select", n, projects), func(b *testing.B) {
			p := bdPool(b, bdNoStore{}, keys)
			bdLoop(b, func(t *bdTimes) error { return bdSelect(p, t, "m") })
		})
		b.Run(fmt.Sprintf("keys=%d/projects=%d/grant-nostore", n, projects), func(b *testing.B) {
			p := bdPool(b, bdNoStore{}, keys)
			bdLoop(b, func(t *bdTimes) error { return bdGrant(ctx, p, t, "m") })
		})
	}
}

// TestBreakdownSmoke runs each phase of the breakdown a few times, so that
// CI keeps BenchmarkLeaseBreakdown and BenchmarkChooseKeys working.
func TestBreakdownSmoke(t *testing.T) {
	ctx := context.Background()
	var tt bdTimes
	p := bdPool(t, bdNoStore{}, bdScaleKeys(50, 5))
	for range 5 {
		if err := bdSelect(p, &tt, "m"); err != nil {
			t.Fatal(err)
		}
		if err := bdGrant(ctx, p, &tt, "m"); err != nil {
			t.Fatal(err)
		}
	}
	c := client.New(bdServe(t, bdPool(t, bdNoStore{}, benchKeys)))
	defer c.CloseIdleConnections()
	l, err := c.Lease(ctx, api.LeaseRequest{Model: "m", Tokens: 10})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Report(ctx, l.LeaseID, bdReport); err != nil {
		t.Fatal(err)
	}
	if len(tt.d) != 10 {
		t.Fatalf("timed %d ops, want 10", len(tt.d))
	}
}
