// Package client is the Go client of keyd's socket API: it takes and
// reports key leases and reads keyd's status over HTTP/1.1 + JSON on keyd's
// Unix socket.
//
// A Client is safe for concurrent use by many goroutines and keeps its
// connections alive between calls; make one per process and share it. Every
// method takes a context that bounds the whole call, including a lease's
// wait for capacity.
//
// Errors: an answer other than 2xx is an *api.Error carrying keyd's stable
// code (see the api.Code* constants) and the HTTP status; use errors.As, or
// the helpers IsNoCapacity, IsUnknownModel and IsForbidden. When nothing
// listens on the socket the error is a *NotRunningError, which matches
// ErrNotRunning under errors.Is.
//
// A typical caller:
//
//	c := client.New("") // api.ClientSocketPath()
//	lease, err := c.Lease(ctx, api.LeaseRequest{Model: "gemini-2.5-flash", Tokens: 2000})
//	if d, ok := client.IsNoCapacity(err); ok {
//		// nothing free now; retry after d (0: not without a config change)
//	}
//	// ... call Gemini with lease.Secret ...
//	c.Report(ctx, lease.LeaseID, api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: 1800}})
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/keyd/keyd/api"
)

// maxResponse bounds the size of an answer the client will read.
const maxResponse = 64 << 20

// Client talks to one keyd over its Unix socket. The zero value is not
// usable: call New.
type Client struct {
	socket string
	hc     *http.Client
	tr     *http.Transport // hc's
}

// New returns a Client for the keyd listening on socketPath; "" means
// api.ClientSocketPath(). New does not connect: the first call does.
//
// The client keeps up to 256 idle connections, enough for that many
// callers sharing it without reconnecting.
func New(socketPath string) *Client {
	if socketPath == "" {
		socketPath = api.ClientSocketPath()
	}
	var d net.Dialer
	tr := &http.Transport{
		// Proxy stays nil: HTTP_PROXY must never see socket traffic.
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", socketPath)
		},
		MaxIdleConns:        256,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
	}
	return &Client{socket: socketPath, hc: &http.Client{Transport: tr}, tr: tr}
}

// Socket returns the path of the socket the client dials.
func (c *Client) Socket() string { return c.socket }

// CloseIdleConnections closes the connections kept alive for reuse.
func (c *Client) CloseIdleConnections() { c.hc.CloseIdleConnections() }

// Lease asks for a key for one call to req.Model. When nothing is free it
// waits up to req.WaitMS for capacity, then fails with an *api.Error of
// code api.CodeNoCapacity (see IsNoCapacity).
func (c *Client) Lease(ctx context.Context, req api.LeaseRequest) (*api.Lease, error) {
	return fastCall(ctx, c, origin+api.RouteLeases, true, &req, appendLeaseRequest, parseLease)
}

// Report tells keyd how the call made under lease leaseID went. Reporting
// a lease again within 10 minutes of its first report is harmless: the
// answer then has Duplicate set (later, keyd has forgotten the lease and
// answers not_found).
func (c *Client) Report(ctx context.Context, leaseID string, rep api.ReportRequest) (*api.ReportResponse, error) {
	target := origin + api.RouteLeaseID + url.PathEscape(leaseID) + "/report"
	// keyd's http.ServeMux redirects a path it would clean, which only
	// these IDs make (PathEscape escapes a slash).
	direct := leaseID != "" && leaseID != "." && leaseID != ".."
	return fastCall(ctx, c, target, direct, &rep, appendReportRequest, parseReportResponse)
}

// Status returns keyd's configuration, keys and buckets. It holds no secret.
func (c *Client) Status(ctx context.Context) (*api.Status, error) {
	return call[api.Status](ctx, c, http.MethodGet, api.RouteStatus, nil)
}

// Health returns keyd's health summary.
func (c *Client) Health(ctx context.Context) (*api.Health, error) {
	return call[api.Health](ctx, c, http.MethodGet, api.RouteHealth, nil)
}

// Reload makes keyd reload its configuration and returns the outcome. A
// configuration that fails to load is an *api.Error of code
// api.CodeReloadFailed; keyd then keeps running the old one.
func (c *Client) Reload(ctx context.Context) (*api.ReloadResponse, error) {
	return call[api.ReloadResponse](ctx, c, http.MethodPost, api.RouteReload, nil)
}

// Key actions for KeyAction.
const (
	ActionDisable = "disable" // stop leasing the key until enabled
	ActionEnable  = "enable"  // lift an admin or automatic disable
	ActionReset   = "reset"   // enable, and clear the penalties of the key's buckets
)

// KeyAction applies action (ActionDisable, ActionEnable or ActionReset) to
// the key keyID and returns the key's new state.
func (c *Client) KeyAction(ctx context.Context, keyID, action string) (*api.KeyActionResponse, error) {
	path := api.RouteKeys + url.PathEscape(keyID) + "/" + url.PathEscape(action)
	return call[api.KeyActionResponse](ctx, c, http.MethodPost, path, nil)
}

// Usage returns the hourly usage history since the given time (the zero
// time means keyd's default, the last 24 hours), of one key when keyID is
// not empty.
func (c *Client) Usage(ctx context.Context, since time.Time, keyID string) (*api.UsageResponse, error) {
	q := url.Values{}
	if !since.IsZero() {
		q.Set("since", since.UTC().Format(time.RFC3339))
	}
	if keyID != "" {
		q.Set("key", keyID)
	}
	path := api.RouteUsage
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	return call[api.UsageResponse](ctx, c, http.MethodGet, path, nil)
}

// Wait polls Health until keyd answers, and returns nil then. It keeps
// polling while keyd is not running (or answers 503, as while it starts or
// stops) and returns any other error at once. When ctx ends first it
// returns the last error seen, or ctx's error if there was none.
func (c *Client) Wait(ctx context.Context) error {
	delay := 20 * time.Millisecond
	var last error
	for {
		_, err := c.Health(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			break
		}
		var ae *api.Error
		if !errors.Is(err, ErrNotRunning) && !(errors.As(err, &ae) && ae.HTTPStatus == http.StatusServiceUnavailable) {
			return err
		}
		last = err
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
		if ctx.Err() != nil {
			break
		}
		delay = min(delay*2, 500*time.Millisecond)
	}
	if last != nil {
		return last
	}
	return ctx.Err()
}

// call does one request and decodes its answer into a new T.
func call[T any](ctx context.Context, c *Client, method, path string, in any) (*T, error) {
	var body []byte
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, fmt.Errorf("encoding the request to %s: %w", path, err)
		}
		body = b
	}
	out := new(T)
	if err := c.do(ctx, method, origin+path, false, body, func(data []byte) error { return json.Unmarshal(data, out) }); err != nil {
		return nil, err
	}
	return out, nil
}

// fastCall is call for the lease path: it encodes in with enc and decodes
// the answer with parse when they can (see fastjson.go), else as call
// does, with the same outcome either way. target and direct are as for do.
func fastCall[In, Out any](ctx context.Context, c *Client, target string, direct bool, in *In,
	enc func([]byte, *In) ([]byte, bool), parse func([]byte, *Out) bool) (*Out, error) {
	body, ok := enc(make([]byte, 0, 128), in)
	if !ok {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, fmt.Errorf("encoding the request to %s: %w", target[len(origin):], err)
		}
		body = b
	}
	var out *Out
	err := c.do(ctx, http.MethodPost, target, direct, body, func(data []byte) (err error) {
		out, err = decodeAnswer(data, parse)
		return err
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// decodeAnswer decodes data into a new T with parse when parse accepts it,
// else with json.Unmarshal. Either way a lease's secret shares no memory
// with its other strings (see fastjson.go).
func decodeAnswer[T any](data []byte, parse func([]byte, *T) bool) (*T, error) {
	out := new(T)
	if parse(data, out) {
		return out, nil
	}
	var zero T
	*out = zero
	err := json.Unmarshal(data, out)
	if l, ok := any(out).(*api.Lease); ok {
		rehomeShortSecret(l) // see fastjson.go
	}
	return out, err
}

// jsonType is the value of the Content-Type and Accept headers of every
// request. net/http only reads a request's header values.
var jsonType = []string{"application/json"}

// origin is the scheme and host of every request's URL.
const origin = "http://keyd"

// do sends one request to target, origin + path, with body (none when
// nil) and hands a 2xx answer's body to decode; the bytes are not valid
// after decode returns.
//
// direct says that keyd cannot answer the request with a redirect: then do
// skips http.Client, whose work on top of the Transport's is following
// redirects (and wrapping errors in a *url.Error, which transportError
// unwraps anyway).
func (c *Client) do(ctx context.Context, method, target string, direct bool, body []byte, decode func([]byte) error) error {
	path := target[len(origin):]
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, target, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header["Content-Type"] = jsonType
	}
	req.Header["Accept"] = jsonType
	var resp *http.Response
	if direct {
		resp, err = c.tr.RoundTrip(req)
	} else {
		resp, err = c.hc.Do(req)
	}
	if err != nil {
		return c.transportError(ctx, err)
	}
	defer resp.Body.Close()
	bp := respPool.Get().(*[]byte)
	defer func() {
		clear(*bp) // a lease holds a secret: the pool keeps none
		if cap(*bp) > 64<<10 {
			*bp = make([]byte, 0, respBuf)
		}
		*bp = (*bp)[:0]
		respPool.Put(bp)
	}()
	*bp, err = readAll(resp.Body, (*bp)[:0])
	if err != nil {
		return fmt.Errorf("reading keyd's answer to %s %s: %w", method, routeOf(path), err)
	}
	data := *bp
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return decodeError(resp, data)
	}
	if err := decode(data); err != nil {
		return fmt.Errorf("decoding keyd's answer to %s %s: %w", method, routeOf(path), err)
	}
	return nil
}

// respPool holds buffers for answers' bodies.
var respPool = sync.Pool{New: func() any { b := make([]byte, 0, respBuf); return &b }}

// respBuf is the size of a new answer buffer: a lease's answer is about 250 bytes.
const respBuf = 512

// readAll appends r's bytes to b until EOF or maxResponse bytes in all,
// as io.ReadAll(io.LimitReader(r, maxResponse)) would return them.
func readAll(r io.Reader, b []byte) ([]byte, error) {
	for len(b) < maxResponse {
		if len(b) == cap(b) {
			old := b
			b = append(b, 0)[:len(b)] // let append grow it
			clear(old)                // the answer may hold a secret: leave no copy behind
		}
		n, err := r.Read(b[len(b):min(cap(b), maxResponse)])
		b = b[:len(b)+n]
		if err == io.EOF {
			return b, nil
		}
		if err != nil {
			return b, err
		}
	}
	return b, nil
}

// routeOf strips the query from path, for messages.
func routeOf(path string) string {
	p, _, _ := strings.Cut(path, "?")
	return p
}

// transportError turns the error of a failed round trip into what a
// caller can act on.
func (c *Client) transportError(ctx context.Context, err error) error {
	if ctxErr := ctx.Err(); ctxErr != nil && errors.Is(err, ctxErr) {
		return fmt.Errorf("talking to keyd at %s: %w", c.socket, ctxErr)
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		switch {
		case errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ENOTDIR):
			return &NotRunningError{Socket: c.socket, Err: op.Err}
		case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
			return &PermissionError{Socket: c.socket, Err: op.Err}
		}
		return fmt.Errorf("connecting to keyd at %s: %w", c.socket, op.Err)
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	return fmt.Errorf("talking to keyd at %s: %w", c.socket, err)
}

// decodeError builds the *api.Error of a non-2xx answer. A body that is
// not keyd's {"error":{...}} (a proxy, a panic) still yields one, with a
// code guessed from the status.
func decodeError(resp *http.Response, data []byte) error {
	var eb api.ErrorBody
	if err := json.Unmarshal(data, &eb); err != nil || eb.Error == nil || eb.Error.Code == "" {
		msg := strings.TrimSpace(string(data))
		if len(msg) > 200 {
			msg = msg[:200] + "…"
		}
		if msg == "" {
			msg = "(empty body)"
		}
		eb.Error = &api.Error{
			Code:    codeForStatus(resp.StatusCode),
			Message: fmt.Sprintf("keyd answered %s: %s", resp.Status, msg),
		}
	}
	e := eb.Error
	e.HTTPStatus = resp.StatusCode
	if e.RetryAfterMS == nil {
		if s, err := strconv.ParseInt(resp.Header.Get("Retry-After"), 10, 64); err == nil && s >= 0 {
			ms := s * 1000
			e.RetryAfterMS = &ms
		}
	}
	return e
}

func codeForStatus(status int) string {
	switch status {
	case http.StatusBadRequest:
		return api.CodeBadRequest
	case http.StatusForbidden:
		return api.CodeForbidden
	case http.StatusNotFound:
		return api.CodeNotFound
	case http.StatusMethodNotAllowed:
		return api.CodeMethodNotAllowed
	case http.StatusRequestEntityTooLarge:
		return api.CodeTooLarge
	case http.StatusTooManyRequests:
		return api.CodeNoCapacity
	case http.StatusServiceUnavailable:
		return api.CodeShuttingDown
	}
	return api.CodeInternal
}
