package daemon

import (
	"context"
	"log/slog"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/config"
	"github.com/keyd/keyd/internal/store"
)

// Engine is keyd's lease logic without a socket, a durable store or a
// goroutine: the same pool, key choice (choose), limiter buckets, report
// classification and penalties that serve /v1/leases, driven call by call
// on the caller's clock. The policy simulator (internal/sim) runs hours of
// virtual time through it.
//
// Lease never waits: a request that cannot be served now gets the
// no_capacity error with retry_after_ms, exactly as a wait_ms 0 request
// to the daemon does, so the FIFO queue of waiting requests is not used.
// Nothing is persisted. Leases expire only when Expire is called, as the
// daemon's janitor does every second.
//
// An Engine is safe for concurrent use, like the daemon's pool, but a
// simulator drives it from one goroutine.
type Engine struct{ p *pool }

// NewEngine returns an engine serving cfg, whose clock is now.
func NewEngine(cfg *config.Config, now func() time.Time) *Engine {
	p := newPool(engineStore{}, now, slog.New(slog.DiscardHandler))
	p.mu.Lock()
	p.apply(cfg, now(), &store.Batch{})
	p.mu.Unlock()
	return &Engine{p: p}
}

// Lease answers req as POST /v1/leases does, with WaitMS forced to 0.
func (e *Engine) Lease(req api.LeaseRequest) (*api.Lease, *api.Error) {
	req.WaitMS = 0
	return e.p.lease(context.Background(), &req)
}

// Report answers rep for lease id as POST /v1/leases/{id}/report does.
func (e *Engine) Report(id string, rep api.ReportRequest) (*api.ReportResponse, *api.Error) {
	return e.p.report(context.Background(), id, &rep)
}

// Expire closes the leases whose TTL ran out (they keep counting at their
// estimate) and forgets records past their retention, as the daemon's
// janitor does.
func (e *Engine) Expire() {
	e.p.mu.Lock()
	e.p.expire(e.p.now())
	e.p.mu.Unlock()
}

// engineStore is a store.Store that keeps nothing and commits at once.
type engineStore struct{}

func (engineStore) Commit(context.Context, *store.Batch) error      { return nil }
func (engineStore) Submit(*store.Batch) *store.Pending              { return store.Done(nil) }
func (engineStore) Load(time.Time, []string) (*store.State, error)  { return &store.State{}, nil }
func (engineStore) Usage(time.Time, string) ([]api.UsageRow, error) { return nil, nil }
func (engineStore) Prune(time.Time, time.Time, time.Time) error     { return nil }
func (engineStore) Close() error                                    { return nil }
