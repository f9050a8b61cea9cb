package gemini

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"google.golang.org/genai"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/client"
	classify "github.com/keyd/keyd/internal/gemini"
)

// DefaultMaxAttempts is Options.MaxAttempts when it is zero.
const DefaultMaxAttempts = 3

// reportTimeout bounds one report to keyd. Reports run even after the
// caller's ctx ended: keyd must learn what the key's call did.
const reportTimeout = 10 * time.Second

// DefaultReportRetry is Options.ReportRetry when it is zero.
const DefaultReportRetry = 30 * time.Second

// Backoff between retries of a report that could not reach keyd.
var (
	reportRetryFirst = 100 * time.Millisecond
	reportRetryMax   = 2 * time.Second
)

// leaseSlack is kept from ctx's deadline when computing a lease's wait_ms,
// so that keyd answers no_capacity before ctx ends.
const leaseSlack = 50 * time.Millisecond

// serverErrorDelay is the pause before the one retry after a 5xx.
var serverErrorDelay = time.Second

// minNoCapacitySleep is the shortest sleep after a no_capacity answer.
const minNoCapacitySleep = 10 * time.Millisecond

// EstimateMode says how a Generator estimates a request's input tokens.
type EstimateMode int

const (
	// EstimateHeuristic uses HeuristicTokens; no request is made.
	EstimateHeuristic EstimateMode = iota
	// EstimateCountTokens calls Gemini's countTokens under a lease that is
	// then reported unused (see the package documentation), falling back
	// to HeuristicTokens when that fails.
	EstimateCountTokens
)

// EstimateFunc estimates the input tokens of a request.
type EstimateFunc func(ctx context.Context, model string, contents []*genai.Content, cfg *genai.GenerateContentConfig) (int64, error)

// Options configure a Generator. The zero value is usable.
type Options struct {
	// BaseURL is the Gemini API's base URL, e.g. a fake's
	// "http://127.0.0.1:8080/". Empty: the SDK's default, i.e.
	// $GOOGLE_GEMINI_BASE_URL, else https://generativelanguage.googleapis.com/.
	BaseURL string
	// Estimate selects how input tokens are estimated when EstimateFunc is
	// nil. The default is EstimateHeuristic.
	Estimate EstimateMode
	// EstimateFunc, when set, replaces Estimate. Its error ends the call.
	EstimateFunc EstimateFunc
	// Wait is how long keyd may wait for capacity on each lease (wait_ms),
	// at most api.MaxWait. Zero: keyd answers at once.
	Wait time.Duration
	// MaxAttempts bounds the requests sent to Gemini for one call; zero
	// means DefaultMaxAttempts.
	MaxAttempts int
	// Workload, when set, restricts leases to keys of that workload_type.
	Workload string
	// ClientName names the caller in keyd's logs and usage; empty means
	// the program's name.
	ClientName string
	// HTTPClient carries the calls to Gemini. Nil: a client of the
	// Generator's own, whose idle connections Close closes.
	HTTPClient *http.Client
	// Logger receives the warnings of failed reports to keyd (the call's
	// result stands; keyd frees the lease when it expires). Nil means
	// slog.Default().
	Logger *slog.Logger
	// ReportRetry bounds the time spent retrying a report that failed
	// because keyd could not be reached (not running, e.g. restarting, or
	// the connection refused or reset). The same report is resent with
	// backoff (100ms doubling to 2s); keyd answers a repeat as a duplicate.
	// Other failures (an answer from keyd) are not retried. Zero means
	// DefaultReportRetry; negative disables the retries.
	ReportRetry time.Duration
}

// Generator calls Gemini with keys leased from keyd. It is safe for
// concurrent use; make one per process and share it.
type Generator struct {
	kc        *client.Client
	opts      Options
	hc        *http.Client
	ownHC     bool
	traceable bool // hc's transport fires httptrace hooks
	log       *slog.Logger

	mu      sync.Mutex
	clients map[string]cachedClient // by key id
}

type cachedClient struct {
	secret string
	c      *genai.Client
}

// New returns a Generator that leases keys from kc.
func New(kc *client.Client, opts Options) *Generator {
	if opts.MaxAttempts <= 0 {
		opts.MaxAttempts = DefaultMaxAttempts
	}
	opts.Wait = min(max(opts.Wait, 0), api.MaxWait)
	if opts.ReportRetry == 0 {
		opts.ReportRetry = DefaultReportRetry
	}
	if opts.ClientName == "" && len(os.Args) > 0 {
		opts.ClientName = filepath.Base(os.Args[0])
	}
	g := &Generator{kc: kc, opts: opts, hc: opts.HTTPClient, log: opts.Logger, clients: map[string]cachedClient{}}
	if g.hc == nil {
		g.hc = &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
		g.ownHC = true
	}
	switch g.hc.Transport.(type) {
	case nil, *http.Transport:
		g.traceable = true
	}
	if g.log == nil {
		g.log = slog.Default()
	}
	return g
}

// Close forgets the cached genai clients and, when the Generator made its
// own http.Client, closes its idle connections. Calls in progress are not
// affected; the Generator stays usable.
func (g *Generator) Close() {
	g.mu.Lock()
	clear(g.clients)
	g.mu.Unlock()
	if g.ownHC {
		g.hc.CloseIdleConnections()
	}
}

// Operation names, as in Error.Op.
const (
	OpGenerate = "generateContent"
	OpStream   = "streamGenerateContent"
)

// GenerateContent generates content for model, as
// genai.Models.GenerateContent does, with a key leased from keyd; see the
// package documentation for the leases, reports and retries.
func (g *Generator) GenerateContent(ctx context.Context, model string, contents []*genai.Content, cfg *genai.GenerateContentConfig) (*genai.GenerateContentResponse, error) {
	tokens, err := g.estimate(ctx, model, contents, cfg)
	if err != nil {
		return nil, &Error{Op: OpGenerate, Model: model, Err: err}
	}
	callCfg := callConfig(cfg)
	var resp *genai.GenerateContentResponse
	err = g.run(ctx, OpGenerate, model, tokens, func(ctx context.Context, l *api.Lease, c *genai.Client) (bool, int, error) {
		tctx, st := g.trace(ctx)
		r, err := c.Models.GenerateContent(tctx, model, contents, callCfg)
		if err != nil {
			rep, status, cerr := g.failure(ctx, l, err, st)
			g.report(ctx, l, rep)
			return false, status, cerr
		}
		g.report(ctx, l, api.ReportRequest{Status: http.StatusOK, Usage: usageOf(r.UsageMetadata)})
		resp = r
		return false, http.StatusOK, nil
	})
	if err != nil {
		return nil, err
	}
	return resp, nil
}

// callConfig is cfg with the SDK's automatic continuation off (a copy:
// the caller's config is not changed).
func callConfig(cfg *genai.GenerateContentConfig) *genai.GenerateContentConfig {
	var c genai.GenerateContentConfig
	if cfg != nil {
		c = *cfg
	}
	c.AutomaticContinuation = new(false)
	return &c
}

// attemptFunc makes one call under lease l with client c and reports it.
// It returns the call's error (nil on success, already cleaned of
// secrets), the HTTP status Gemini answered (0: none), and final when no
// retry may follow whatever the error (a stream that already yielded).
type attemptFunc func(ctx context.Context, l *api.Lease, c *genai.Client) (final bool, status int, err error)

// run leases and attempts until an attempt succeeds or a stop condition
// of the retry policy is met.
func (g *Generator) run(ctx context.Context, op, model string, tokens int64, attempt attemptFunc) error {
	var (
		attempts      int
		last          *Error // the last failed attempt
		serverRetried bool
	)
	fail := func(err error) *Error {
		e := &Error{Op: op, Model: model, Attempts: attempts, Err: err}
		if last != nil {
			e.KeyID, e.Status, e.Last = last.KeyID, last.Status, last.Err
		}
		return e
	}
	for {
		if err := ctx.Err(); err != nil {
			return fail(context.Cause(ctx))
		}
		l, err := g.lease(ctx, model, tokens)
		if err != nil {
			if d, ok := client.IsNoCapacity(err); ok {
				if d > 0 && fitsBefore(ctx, d) && sleep(ctx, max(d, minNoCapacitySleep)) == nil {
					continue
				}
				if ctx.Err() != nil {
					return fail(context.Cause(ctx))
				}
				ae, _ := errors.AsType[*api.Error](err)
				e := &NoCapacityError{Op: op, Model: model, Attempts: attempts, RetryAfter: d, Err: ae}
				if last != nil {
					e.Last = last.Err
				}
				return e
			}
			return fail(fmt.Errorf("leasing a key from keyd: %w", err))
		}
		c, err := g.genaiClient(ctx, l)
		if err != nil {
			g.reportUnused(ctx, l)
			return fail(err)
		}
		if ctx.Err() != nil { // ended while keyd answered: nothing was sent
			g.reportUnused(ctx, l)
			return fail(context.Cause(ctx))
		}
		attempts++
		final, status, err := attempt(ctx, l, c)
		if err == nil {
			return nil
		}
		last = &Error{Op: op, Model: model, Attempts: attempts, KeyID: l.KeyID, Status: status, Err: err}
		kind := retryKind(err)
		switch {
		case final, kind == retryNone, attempts >= g.opts.MaxAttempts:
			return last
		case ctx.Err() != nil:
			return fail(context.Cause(ctx))
		case kind == retryServer:
			if serverRetried {
				return last
			}
			serverRetried = true
			if err := sleep(ctx, serverErrorDelay); err != nil {
				return fail(err)
			}
		}
	}
}

// lease asks keyd for a key for one call to model.
func (g *Generator) lease(ctx context.Context, model string, tokens int64) (*api.Lease, error) {
	req := api.LeaseRequest{Model: model, Tokens: tokens, WorkloadType: g.opts.Workload, Client: g.opts.ClientName}
	wait := g.opts.Wait
	if dl, ok := ctx.Deadline(); ok {
		wait = min(wait, time.Until(dl)-leaseSlack)
	}
	if wait > 0 {
		req.WaitMS = max(1, wait.Milliseconds())
	}
	return g.kc.Lease(ctx, req)
}

// genaiClient returns the cached genai client of l's key, making it when
// there is none or the key's secret changed.
func (g *Generator) genaiClient(ctx context.Context, l *api.Lease) (*genai.Client, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if cc, ok := g.clients[l.KeyID]; ok && cc.secret == l.Secret {
		return cc.c, nil
	}
	c, err := genai.NewClient(ctx, &genai.ClientConfig{
		APIKey:      l.Secret,
		Backend:     genai.BackendGeminiAPI,
		HTTPClient:  g.hc,
		HTTPOptions: genai.HTTPOptions{BaseURL: g.opts.BaseURL},
	})
	if err != nil {
		// The SDK's messages quote the whole ClientConfig, secret included:
		// keep only a cleaned text, and no wrapped error.
		return nil, fmt.Errorf("creating a genai client for key %s: %s", l.KeyID, cleanString(err.Error(), l.Secret))
	}
	g.clients[l.KeyID] = cachedClient{secret: l.Secret, c: c}
	return c, nil
}

// report tells keyd how the call under l went. It runs even when ctx is
// done; a failure is logged, never returned. When keyd cannot be reached
// (restarting, say) the same report is resent with backoff for up to
// Options.ReportRetry.
func (g *Generator) report(ctx context.Context, l *api.Lease, rep api.ReportRequest) {
	total := max(g.opts.ReportRetry, 0)
	octx, ocancel := context.WithTimeout(context.WithoutCancel(ctx), max(total, reportTimeout))
	defer ocancel()
	start := time.Now()
	delay := reportRetryFirst
	for tries := 1; ; tries++ {
		rctx, cancel := context.WithTimeout(octx, reportTimeout)
		_, err := g.kc.Report(rctx, l.LeaseID, rep)
		cancel()
		if err == nil {
			return
		}
		if !unreachable(err) || time.Since(start)+delay > total || sleep(octx, delay) != nil {
			g.log.Warn("keyd: reporting a lease failed; keyd frees it when it expires",
				"lease", l.LeaseID, "key", l.KeyID, "tries", tries, "err", err)
			return
		}
		delay = min(delay*2, reportRetryMax)
	}
}

// unreachable reports whether err is a failure to reach keyd (not
// running, connection refused, reset or closed) rather than an answer.
func unreachable(err error) bool {
	var ae *api.Error
	switch {
	case errors.As(err, &ae):
		return false
	case errors.Is(err, client.ErrNotRunning),
		errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, syscall.ECONNABORTED), errors.Is(err, syscall.EPIPE),
		errors.Is(err, syscall.ENOENT),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return true
	}
	var op *net.OpError
	return errors.As(err, &op)
}

func (g *Generator) reportUnused(ctx context.Context, l *api.Lease) {
	g.report(ctx, l, api.ReportRequest{Outcome: api.OutcomeUnused})
}

// fitsBefore reports whether d ends before ctx's deadline (always, when
// ctx has none).
func fitsBefore(ctx context.Context, d time.Duration) bool {
	dl, ok := ctx.Deadline()
	return !ok || time.Until(dl) > d
}

// sleep waits d or until ctx is done, and then returns ctx's cause.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return context.Cause(ctx)
	case <-t.C:
		return nil
	}
}

// retry kinds of a failed attempt.
const (
	retryNone   = iota
	retryOther  // the key's or bucket's fault: keyd routes the next lease elsewhere
	retryServer // 5xx: once
)

// retryKind says whether a failed attempt's error is worth another lease,
// by keyd's own classification of the Gemini error.
func retryKind(err error) int {
	ae, ok := errors.AsType[genai.APIError](err)
	if !ok {
		return retryNone
	}
	switch classify.Classify(ae.Code, errorBody(ae, "")).Class {
	case api.ClassRateMinute, api.ClassRateDay, api.ClassQuotaZero, api.ClassCapacity, api.ClassBilling,
		api.ClassKeyInvalid, api.ClassKeyDenied:
		return retryOther
	case api.ClassServerError:
		return retryServer
	}
	return retryNone
}
