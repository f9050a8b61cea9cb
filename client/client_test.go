package client

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
)

// fakeKeyd serves handler on a Unix socket in a short temp dir and returns
// the socket path.
func fakeKeyd(t testing.TB, handler http.Handler) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: handler}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}

// recorded is one request the fake saw.
type recorded struct {
	method, path, query, body string
}

// recorder answers every request with the next canned answer and records it.
type recorder struct {
	mu   sync.Mutex
	reqs []recorded
	// status and body of the answer; status 0 means 200.
	status int
	header map[string]string
	body   string
}

func (rc *recorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	rc.mu.Lock()
	rc.reqs = append(rc.reqs, recorded{r.Method, r.URL.Path, r.URL.RawQuery, string(b)})
	status, body := rc.status, rc.body
	for k, v := range rc.header {
		w.Header().Set(k, v)
	}
	rc.mu.Unlock()
	if status == 0 {
		status = http.StatusOK
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	io.WriteString(w, body)
}

func (rc *recorder) last(t *testing.T) recorded {
	t.Helper()
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if len(rc.reqs) == 0 {
		t.Fatal("the fake saw no request")
	}
	return rc.reqs[len(rc.reqs)-1]
}

// sameJSON fails unless got and want encode the same JSON value.
func sameJSON(t *testing.T, got, want string) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal([]byte(got), &g); err != nil {
		t.Fatalf("body %q is not JSON: %v", got, err)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatal(err)
	}
	gb, _ := json.Marshal(g)
	wb, _ := json.Marshal(w)
	if string(gb) != string(wb) {
		t.Errorf("body = %s, want %s", gb, wb)
	}
}

func TestRequests(t *testing.T) {
	ctx := context.Background()
	since := time.Date(2026, 11, 29, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name                string
		answer              string
		call                func(c *Client) (any, error)
		method, path, query string
		body                string // "" means no body
		check               func(t *testing.T, got any)
	}{
		{
			name:   "lease",
			answer: `{"lease_id":"L1","key_id":"k1","project":"p","model":"m","secret":"AIzaXYZ","tokens":10,"expires_at":"2026-11-29T10:00:00Z"}`,
			call: func(c *Client) (any, error) {
				return c.Lease(ctx, api.LeaseRequest{Model: "m", Tokens: 10, WaitMS: 1500, Client: "t"})
			},
			method: "POST", path: "/v1/leases",
			body: `{"model":"m","tokens":10,"wait_ms":1500,"client":"t"}`,
			check: func(t *testing.T, got any) {
				l := got.(*api.Lease)
				if l.LeaseID != "L1" || l.Secret != "AIzaXYZ" || !l.ExpiresAt.Equal(time.Date(2026, 11, 29, 10, 0, 0, 0, time.UTC)) {
					t.Errorf("lease = %+v", l)
				}
			},
		},
		{
			name:   "report",
			answer: `{"lease_id":"L/1","key_id":"k1","classification":"rate_minute","action":"bucket p/m cooling for 1m0s"}`,
			call: func(c *Client) (any, error) {
				return c.Report(ctx, "L/1", api.ReportRequest{Status: 429, Error: json.RawMessage(`{"error":{"code":429}}`)})
			},
			method: "POST", path: "/v1/leases/L/1/report",
			body: `{"status":429,"error":{"error":{"code":429}}}`,
			check: func(t *testing.T, got any) {
				if r := got.(*api.ReportResponse); r.Classification != api.ClassRateMinute {
					t.Errorf("report = %+v", r)
				}
			},
		},
		{
			name:   "report unused",
			answer: `{"lease_id":"L1","key_id":"k1","classification":"unused"}`,
			call: func(c *Client) (any, error) {
				return c.Report(ctx, "L1", api.ReportRequest{Outcome: api.OutcomeUnused})
			},
			method: "POST", path: "/v1/leases/L1/report",
			body: `{"outcome":"unused","status":0}`,
		},
		{
			name:   "status",
			answer: `{"version":"1.2","config":{"path":"/k.json","warnings":["w1"]},"keys":[{"key_id":"k1","state":"ready"}]}`,
			call:   func(c *Client) (any, error) { return c.Status(ctx) },
			method: "GET", path: "/v1/status",
			check: func(t *testing.T, got any) {
				s := got.(*api.Status)
				if s.Version != "1.2" || len(s.Config.Warnings) != 1 || len(s.Keys) != 1 {
					t.Errorf("status = %+v", s)
				}
			},
		},
		{
			name:   "health",
			answer: `{"ok":true,"version":"1.2","keys_ready":2,"keys_total":3}`,
			call:   func(c *Client) (any, error) { return c.Health(ctx) },
			method: "GET", path: "/v1/health",
		},
		{
			name:   "reload",
			answer: `{"path":"/k.json","changed":true,"keys":3,"warnings":[]}`,
			call:   func(c *Client) (any, error) { return c.Reload(ctx) },
			method: "POST", path: "/v1/reload",
		},
		{
			name:   "key action",
			answer: `{"key_id":"k 1","state":"disabled"}`,
			call:   func(c *Client) (any, error) { return c.KeyAction(ctx, "k 1", ActionDisable) },
			method: "POST", path: "/v1/keys/k 1/disable",
		},
		{
			name:   "usage",
			answer: `{"rows":[{"hour":"2026-11-29T01:00:00Z","project":"p","model":"m","requests":4}]}`,
			call:   func(c *Client) (any, error) { return c.Usage(ctx, since, "k1") },
			method: "GET", path: "/v1/usage", query: "key=k1&since=2026-11-29T00%3A00%3A00Z",
			check: func(t *testing.T, got any) {
				if u := got.(*api.UsageResponse); len(u.Rows) != 1 || u.Rows[0].Requests != 4 {
					t.Errorf("usage = %+v", u)
				}
			},
		},
		{
			name:   "usage defaults",
			answer: `{"rows":[]}`,
			call:   func(c *Client) (any, error) { return c.Usage(ctx, time.Time{}, "") },
			method: "GET", path: "/v1/usage",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rc := &recorder{body: tt.answer}
			c := New(fakeKeyd(t, rc))
			got, err := tt.call(c)
			if err != nil {
				t.Fatal(err)
			}
			r := rc.last(t)
			if r.method != tt.method || r.path != tt.path || r.query != tt.query {
				t.Errorf("request = %s %s?%s, want %s %s?%s", r.method, r.path, r.query, tt.method, tt.path, tt.query)
			}
			if tt.body == "" {
				if r.body != "" {
					t.Errorf("body = %q, want none", r.body)
				}
			} else {
				sameJSON(t, r.body, tt.body)
			}
			if tt.check != nil {
				tt.check(t, got)
			}
		})
	}
}

func TestAPIErrors(t *testing.T) {
	tests := []struct {
		name     string
		status   int
		header   map[string]string
		body     string
		code     string
		message  string
		retry    time.Duration
		hasRetry bool
	}{
		{
			name: "no capacity", status: 429, header: map[string]string{"Retry-After": "3"},
			body: `{"error":{"code":"no_capacity","message":"all keys for m are busy","retry_after_ms":2500}}`,
			code: api.CodeNoCapacity, message: "all keys for m are busy", retry: 2500 * time.Millisecond, hasRetry: true,
		},
		{
			name:   "no capacity forever",
			status: 429,
			body:   `{"error":{"code":"no_capacity","message":"every bucket is disabled"}}`,
			code:   api.CodeNoCapacity, message: "every bucket is disabled",
		},
		{
			name: "unknown model", status: 404,
			body: `{"error":{"code":"unknown_model","message":"no key serves gemini-9"}}`,
			code: api.CodeUnknownModel, message: "no key serves gemini-9",
		},
		{
			name: "forbidden", status: 403,
			body: `{"error":{"code":"forbidden","message":"uid 1000 may not /v1/leases"}}`,
			code: api.CodeForbidden, message: "uid 1000 may not /v1/leases",
		},
		{
			name: "not keyd's body", status: 502, body: "<html>bad gateway</html>",
			code: api.CodeInternal, message: "keyd answered 502 Bad Gateway: <html>bad gateway</html>",
		},
		{
			name: "empty body with Retry-After", status: 429, header: map[string]string{"Retry-After": "7"},
			code: api.CodeNoCapacity, message: "keyd answered 429 Too Many Requests: (empty body)", retry: 7 * time.Second, hasRetry: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rc := &recorder{status: tt.status, header: tt.header, body: tt.body}
			c := New(fakeKeyd(t, rc))
			_, err := c.Lease(context.Background(), api.LeaseRequest{Model: "m"})
			var ae *api.Error
			if !errors.As(err, &ae) {
				t.Fatalf("err = %T %v, want *api.Error", err, err)
			}
			if ae.HTTPStatus != tt.status || ae.Code != tt.code || ae.Message != tt.message || err.Error() != tt.message {
				t.Errorf("err = %+v, want status %d code %q message %q", ae, tt.status, tt.code, tt.message)
			}
			d, ok := ae.RetryAfter()
			if d != tt.retry || ok != tt.hasRetry {
				t.Errorf("RetryAfter = %v, %v; want %v, %v", d, ok, tt.retry, tt.hasRetry)
			}
			nc, isNC := IsNoCapacity(err)
			if isNC != (tt.code == api.CodeNoCapacity) || nc != tt.retry {
				t.Errorf("IsNoCapacity = %v, %v", nc, isNC)
			}
			if IsUnknownModel(err) != (tt.code == api.CodeUnknownModel) {
				t.Errorf("IsUnknownModel = %v", IsUnknownModel(err))
			}
			if IsForbidden(err) != (tt.code == api.CodeForbidden) {
				t.Errorf("IsForbidden = %v", IsForbidden(err))
			}
			if errors.Is(err, ErrNotRunning) {
				t.Error("an API error matches ErrNotRunning")
			}
		})
	}
}

func TestHelpersOnOtherErrors(t *testing.T) {
	for _, err := range []error{nil, errors.New("x"), &NotRunningError{Socket: "/s"}} {
		if _, ok := IsNoCapacity(err); ok {
			t.Errorf("IsNoCapacity(%v) = true", err)
		}
		if IsUnknownModel(err) || IsForbidden(err) {
			t.Errorf("IsUnknownModel/IsForbidden(%v) = true", err)
		}
	}
	if !IsForbidden(&PermissionError{Socket: "/s"}) {
		t.Error("IsForbidden(PermissionError) = false")
	}
}

func TestNotRunning(t *testing.T) {
	dir, err := os.MkdirTemp("", "kc")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)

	// A stale socket file nobody accepts on: connection refused.
	stale := filepath.Join(dir, "stale")
	ln, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()

	for _, sock := range []string{filepath.Join(dir, "missing"), stale, filepath.Join(dir, "nodir", "s")} {
		c := New(sock)
		_, err := c.Status(context.Background())
		if !errors.Is(err, ErrNotRunning) {
			t.Fatalf("%s: err = %v, want ErrNotRunning", sock, err)
		}
		var nr *NotRunningError
		if !errors.As(err, &nr) || nr.Socket != sock {
			t.Fatalf("%s: err = %#v", sock, err)
		}
		want := "keyd is not running (socket " + sock + "): start it with `keyd --config keys.json` or `systemctl start keyd`"
		if err.Error() != want {
			t.Errorf("message = %q\nwant      %q", err.Error(), want)
		}
	}
}

func TestPermissionDenied(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root ignores file modes")
	}
	sock := fakeKeyd(t, &recorder{body: `{"ok":true}`})
	if err := os.Chmod(sock, 0); err != nil {
		t.Fatal(err)
	}
	_, err := New(sock).Health(context.Background())
	var pe *PermissionError
	if !errors.As(err, &pe) || !IsForbidden(err) || errors.Is(err, ErrNotRunning) {
		t.Fatalf("err = %#v", err)
	}
	if !strings.Contains(err.Error(), sock) {
		t.Errorf("message %q does not name the socket", err)
	}
}

func TestDefaultSocket(t *testing.T) {
	t.Setenv("KEYD_SOCKET", "/x/keyd.sock")
	if got := New("").Socket(); got != "/x/keyd.sock" {
		t.Errorf("Socket() = %q", got)
	}
}

func TestIgnoresProxy(t *testing.T) {
	t.Setenv("HTTP_PROXY", "http://127.0.0.1:1")
	t.Setenv("http_proxy", "http://127.0.0.1:1")
	c := New(fakeKeyd(t, &recorder{body: `{"ok":true}`}))
	if _, err := c.Health(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestWait(t *testing.T) {
	dir, err := os.MkdirTemp("", "kc")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "s")
	c := New(sock)

	// Nothing listens: Wait gives up with the not-running error.
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	err = c.Wait(ctx)
	cancel()
	if !errors.Is(err, ErrNotRunning) {
		t.Fatalf("Wait = %v, want ErrNotRunning", err)
	}

	// keyd starts a little later: Wait returns once it answers.
	srv := &http.Server{Handler: &recorder{body: `{"ok":true}`}}
	defer srv.Close()
	go func() {
		time.Sleep(100 * time.Millisecond)
		ln, err := net.Listen("unix", sock)
		if err != nil {
			t.Error(err)
			return
		}
		srv.Serve(ln)
	}()
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Wait(ctx); err != nil {
		t.Fatalf("Wait = %v", err)
	}
}

func TestWaitReturnsOtherErrors(t *testing.T) {
	rc := &recorder{status: 403, body: `{"error":{"code":"forbidden","message":"no"}}`}
	c := New(fakeKeyd(t, rc))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Wait(ctx); !IsForbidden(err) {
		t.Fatalf("Wait = %v, want forbidden at once", err)
	}
}

// TestConcurrent runs many callers through one Client, as a worker pool
// would; run it with -race.
func TestConcurrent(t *testing.T) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(5 * time.Millisecond)
		io.WriteString(w, `{"lease_id":"L","key_id":"k","model":"m"}`)
	})
	c := New(fakeKeyd(t, h))
	var wg sync.WaitGroup
	for range 64 {
		wg.Go(func() {
			for range 5 {
				if _, err := c.Lease(context.Background(), api.LeaseRequest{Model: "m"}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
}

func TestContextCancel(t *testing.T) {
	block := make(chan struct{})
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-block:
		case <-r.Context().Done():
		}
	})
	c := New(fakeKeyd(t, h))
	defer close(block)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := c.Lease(ctx, api.LeaseRequest{Model: "m", WaitMS: 60000})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want DeadlineExceeded", err)
	}
}

// TestReportFollowsRedirects: keyd's http.ServeMux redirects (307) a path
// it would clean, and a lease ID that is "", "." or ".." makes such a
// path; the client then follows the redirect, as http.Client does.
func TestReportFollowsRedirects(t *testing.T) {
	rc := &recorder{body: `{"lease_id":"l"}`}
	mux := http.NewServeMux()
	mux.Handle("/", rc)
	c := New(fakeKeyd(t, mux))
	for _, tt := range []struct{ id, path string }{
		{"..", "/v1/report"}, {".", "/v1/leases/report"}, {"", "/v1/leases/report"},
		{"a/../b", "/v1/leases/a/../b/report"}, {"l1", "/v1/leases/l1/report"},
	} {
		if _, err := c.Report(context.Background(), tt.id, api.ReportRequest{Status: 200}); err != nil {
			t.Fatalf("%q: %v", tt.id, err)
		}
		if r := rc.last(t); r.method != "POST" || r.path != tt.path || r.body != `{"status":200}` {
			t.Errorf("%q: the fake saw %s %s %s, want POST %s", tt.id, r.method, r.path, r.body, tt.path)
		}
	}
}
