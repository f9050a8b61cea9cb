package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/user"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/config"
)

// maxBody bounds request bodies; a report's Gemini error body is the largest.
const maxBody = 1 << 20

// Permission levels of a peer.
type perm int

const (
	permRead  perm = iota // status, health, usage, metrics: no secrets
	permLease             // take and report leases (receives secrets)
	permAdmin             // reload, disable, enable, reset
)

func (p perm) String() string {
	return [...]string{"read", "lease", "admin"}[p]
}

// peer is the identity of the process at the other end of a connection,
// from SO_PEERCRED. Its groups are looked up once, when first needed.
type peer struct {
	uid, gid uint32
	pid      int32
	ok       bool // credentials could be read

	groupsOnce sync.Once
	groups     []uint32
}

type peerKey struct{}

func peerFrom(ctx context.Context) *peer {
	p, _ := ctx.Value(peerKey{}).(*peer)
	if p == nil {
		return &peer{}
	}
	return p
}

// connContext attaches the peer's credentials to every request of a connection.
func connContext(ctx context.Context, c net.Conn) context.Context {
	p := &peer{}
	if uc, ok := c.(*net.UnixConn); ok {
		if raw, err := uc.SyscallConn(); err == nil {
			raw.Control(func(fd uintptr) {
				if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
					p.uid, p.gid, p.pid, p.ok = cred.Uid, cred.Gid, cred.Pid, true
				}
			})
		}
	}
	return context.WithValue(ctx, peerKey{}, p)
}

func (p *peer) memberOf(gids []uint32) bool {
	if slices.Contains(gids, p.gid) {
		return true
	}
	p.groupsOnce.Do(func() {
		u, err := user.LookupId(strconv.Itoa(int(p.uid)))
		if err != nil {
			return
		}
		ids, _ := u.GroupIds()
		for _, s := range ids {
			if n, err := strconv.ParseUint(s, 10, 32); err == nil {
				p.groups = append(p.groups, uint32(n))
			}
		}
	})
	for _, g := range p.groups {
		if slices.Contains(gids, g) {
			return true
		}
	}
	return false
}

// permission says what peer may do under access. Root and keyd's own uid
// are always admin; admin implies lease; without an access section nobody
// else may lease or administer. Any peer that can connect may read.
func permission(pr *peer, access config.Access, self uint32) (perm, string) {
	if !pr.ok {
		return permRead, "peer credentials unavailable"
	}
	switch {
	case pr.uid == 0:
		return permAdmin, "root"
	case pr.uid == self:
		return permAdmin, "keyd's own uid"
	case slices.Contains(access.Admin.UIDs, pr.uid):
		return permAdmin, "access.admin.uids"
	case pr.memberOf(access.Admin.GIDs):
		return permAdmin, "access.admin.groups"
	case slices.Contains(access.Lease.UIDs, pr.uid):
		return permLease, "access.lease.uids"
	case pr.memberOf(access.Lease.GIDs):
		return permLease, "access.lease.groups"
	}
	return permRead, "not in access.lease or access.admin"
}

// server serves the socket API over HTTP/1.1.
type server struct {
	pool    *pool
	version string
	self    uint32
	log     *slog.Logger
	reload  func() (*api.ReloadResponse, *api.Error)
}

// route is one entry of the route table.
type route struct {
	pattern string // http.ServeMux pattern
	need    perm
	handle  func(s *server, w http.ResponseWriter, r *http.Request) error
}

// routes is the whole socket API, sorted by path.
var routes = []route{
	{"GET " + api.RouteMetrics, permRead, (*server).serveMetrics},
	{"GET " + api.RouteHealth, permRead, (*server).serveHealth},
	{"POST " + api.RouteKeys + "{key}/{action}", permAdmin, (*server).serveKeyAction},
	{"POST " + api.RouteLeases, permLease, (*server).serveLease},
	{"POST " + api.RouteLeaseID + "{id}/report", permLease, (*server).serveReport},
	{"POST " + api.RouteReload, permAdmin, (*server).serveReload},
	{"GET " + api.RouteStatus, permRead, (*server).serveStatus},
	{"GET " + api.RouteUsage, permRead, (*server).serveUsage},
}

func (s *server) handler() http.Handler {
	mux := http.NewServeMux()
	for _, rt := range routes {
		mux.HandleFunc(rt.pattern, func(w http.ResponseWriter, r *http.Request) {
			pr := peerFrom(r.Context())
			if got, why := permission(pr, *s.pool.access.Load(), s.self); got < rt.need {
				s.log.Warn("request denied", "uid", pr.uid, "pid", pr.pid, "path", r.URL.Path, "need", rt.need.String(), "why", why)
				writeError(w, api.Errorf(http.StatusForbidden, api.CodeForbidden,
					"uid %d may not %s (%s): %s needs %s permission; add the uid or one of its groups to access.%s in keys.json",
					pr.uid, r.URL.Path, why, r.URL.Path, rt.need, rt.need))
				return
			}
			r.Body = http.MaxBytesReader(w, r.Body, maxBody)
			if err := rt.handle(s, w, r); err != nil {
				writeError(w, err)
			}
		})
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		for _, rt := range routes {
			method, path, _ := strings.Cut(rt.pattern, " ")
			if pathMatches(path, r.URL.Path) {
				w.Header().Set("Allow", method)
				writeError(w, api.Errorf(http.StatusMethodNotAllowed, api.CodeMethodNotAllowed, "%s needs %s, not %s", r.URL.Path, method, r.Method))
				return
			}
		}
		writeError(w, api.Errorf(http.StatusNotFound, api.CodeNotFound, "no route %s %s: see docs/api.md", r.Method, r.URL.Path))
	})
	return mux
}

// pathMatches matches a concrete path against a pattern with {wildcards}.
func pathMatches(pattern, path string) bool {
	ps, xs := strings.Split(pattern, "/"), strings.Split(path, "/")
	if len(ps) != len(xs) {
		return false
	}
	for i := range ps {
		if !strings.HasPrefix(ps[i], "{") && ps[i] != xs[i] {
			return false
		}
	}
	return true
}

// writeError renders err as {"error":{...}}. Anything but an *api.Error is
// an internal error.
func writeError(w http.ResponseWriter, err error) {
	var ae *api.Error
	if !errors.As(err, &ae) {
		ae = api.Errorf(http.StatusInternalServerError, api.CodeInternal, "%v", err)
	}
	if ms, ok := ae.RetryAfter(); ok {
		w.Header().Set("Retry-After", strconv.FormatInt(int64((ms+time.Second-1)/time.Second), 10))
	}
	status := ae.HTTPStatus
	if status == 0 {
		status = http.StatusInternalServerError
	}
	writeJSON(w, status, api.ErrorBody{Error: ae})
}

func writeJSON(w http.ResponseWriter, status int, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	return json.NewEncoder(w).Encode(v)
}

// writeFast writes v with appendJSON when it can encode it (see
// fastjson.go), else as writeJSON does: the bytes are the same.
func writeFast[T any](w http.ResponseWriter, v *T, appendJSON func([]byte, *T) ([]byte, bool)) error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	b, ok := appendJSON((*bp)[:0], v)
	if !ok {
		return writeJSON(w, http.StatusOK, v)
	}
	w.Header()["Content-Type"] = jsonContentType
	w.WriteHeader(http.StatusOK)
	_, err := w.Write(b)
	clear(b) // a lease holds a secret: the pool keeps none
	if cap(b) <= 64<<10 {
		*bp = b[:0]
	}
	return err
}

var jsonContentType = []string{"application/json"}

// bufPool holds buffers for request and response bodies of the lease path.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, fastBody); return &b }}

// fastBody is the largest request body the fast decoders see; a larger
// one goes to encoding/json.
const fastBody = 2048

// decodeFast decodes r's body into v with parse when parse accepts it
// (see fastjson.go), else as decode does, with the same outcome either way.
func decodeFast[T any](r *http.Request, v *T, parse func([]byte, *T) bool) *api.Error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	b := (*bp)[:0]
	var err error
	for len(b) < cap(b) && err == nil {
		var n int
		n, err = r.Body.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
	}
	*bp = b
	if err == io.EOF && parse(b, v) {
		return nil
	}
	// Give encoding/json the same stream: what was read, then the rest of
	// the body or the error that ended the read.
	var rest io.Reader = r.Body
	if err != nil {
		rest = errReader{err}
	}
	var zero T
	*v = zero
	return decode(io.MultiReader(bytes.NewReader(b), rest), v)
}

// errReader returns its error, as the body did.
type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

// decode reads a JSON body strictly: unknown fields and trailing data are
// errors, as is an oversized body.
func decode(body io.Reader, v any) *api.Error {
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return api.Errorf(http.StatusRequestEntityTooLarge, api.CodeTooLarge, "request body over %d bytes", tooBig.Limit)
		}
		if errors.Is(err, io.EOF) {
			return api.Errorf(http.StatusBadRequest, api.CodeBadRequest, "empty request body: send a JSON object")
		}
		return api.Errorf(http.StatusBadRequest, api.CodeBadRequest, "bad JSON body: %v", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return api.Errorf(http.StatusBadRequest, api.CodeBadRequest, "bad JSON body: data after the JSON object")
	}
	return nil
}

// DecodeLeaseRequest decodes and validates a lease request body. It is the
// decoder the API uses, exported for fuzzing.
func decodeLeaseRequest(r *http.Request) (*api.LeaseRequest, *api.Error) {
	var req api.LeaseRequest
	if err := decodeFast(r, &req, parseLeaseRequest); err != nil {
		return nil, err
	}
	return validLeaseRequest(&req)
}

func validLeaseRequest(req *api.LeaseRequest) (*api.LeaseRequest, *api.Error) {
	switch {
	case req.Model == "":
		return nil, api.Errorf(http.StatusBadRequest, api.CodeBadRequest, `"model" is required, e.g. {"model":"gemini-2.5-flash"}`)
	case req.Tokens < 0:
		return nil, api.Errorf(http.StatusBadRequest, api.CodeBadRequest, `"tokens" must be >= 0, got %d`, req.Tokens)
	case req.WaitMS < 0 || time.Duration(req.WaitMS)*time.Millisecond > api.MaxWait:
		return nil, api.Errorf(http.StatusBadRequest, api.CodeBadRequest, `"wait_ms" must be between 0 and %d, got %d`, api.MaxWait.Milliseconds(), req.WaitMS)
	}
	return req, nil
}

func decodeReportRequest(r *http.Request) (*api.ReportRequest, *api.Error) {
	var rep api.ReportRequest
	if err := decodeFast(r, &rep, parseReportRequest); err != nil {
		return nil, err
	}
	return validReportRequest(&rep)
}

func validReportRequest(rep *api.ReportRequest) (*api.ReportRequest, *api.Error) {
	switch {
	case rep.Outcome != "" && rep.Outcome != api.OutcomeUnused:
		return nil, api.Errorf(http.StatusBadRequest, api.CodeBadRequest, `"outcome" must be "unused" or absent, got %q`, rep.Outcome)
	case rep.Outcome == "" && (rep.Status < 0 || rep.Status > 599 || rep.Status > 0 && rep.Status < 100):
		return nil, api.Errorf(http.StatusBadRequest, api.CodeBadRequest, `"status" must be an HTTP status (100-599) or 0 for a network error, got %d`, rep.Status)
	case rep.Usage != nil && (rep.Usage.PromptTokens < 0 || rep.Usage.OutputTokens < 0 || rep.Usage.TotalTokens < 0):
		return nil, api.Errorf(http.StatusBadRequest, api.CodeBadRequest, `"usage" token counts must be >= 0`)
	}
	return rep, nil
}

func (s *server) serveLease(w http.ResponseWriter, r *http.Request) error {
	req, aerr := decodeLeaseRequest(r)
	if aerr != nil {
		return aerr
	}
	lease, aerr := s.pool.lease(r.Context(), req)
	if aerr != nil {
		pr := peerFrom(r.Context())
		s.log.Debug("lease refused", "model", req.Model, "code", aerr.Code, "uid", pr.uid, "client", req.Client, "why", aerr.Message)
		return aerr
	}
	return writeFast(w, lease, appendLease)
}

func (s *server) serveReport(w http.ResponseWriter, r *http.Request) error {
	rep, aerr := decodeReportRequest(r)
	if aerr != nil {
		return aerr
	}
	resp, aerr := s.pool.report(r.Context(), r.PathValue("id"), rep)
	if aerr != nil {
		return aerr
	}
	return writeFast(w, resp, appendReportResponse)
}

func (s *server) serveStatus(w http.ResponseWriter, r *http.Request) error {
	return writeJSON(w, http.StatusOK, s.pool.status(s.version))
}

func (s *server) serveHealth(w http.ResponseWriter, r *http.Request) error {
	return writeJSON(w, http.StatusOK, s.pool.health(s.version))
}

func (s *server) serveReload(w http.ResponseWriter, r *http.Request) error {
	resp, aerr := s.reload()
	if aerr != nil {
		return aerr
	}
	return writeJSON(w, http.StatusOK, resp)
}

func (s *server) serveKeyAction(w http.ResponseWriter, r *http.Request) error {
	pr := peerFrom(r.Context())
	who := fmt.Sprintf("admin uid %d", pr.uid)
	resp, aerr := s.pool.keyAction(r.Context(), r.PathValue("key"), r.PathValue("action"), who)
	if aerr != nil {
		return aerr
	}
	return writeJSON(w, http.StatusOK, resp)
}

func (s *server) serveUsage(w http.ResponseWriter, r *http.Request) error {
	since := s.pool.now().Add(-24 * time.Hour)
	if v := r.URL.Query().Get("since"); v != "" {
		t, err := time.Parse(time.RFC3339, v)
		if err != nil {
			return api.Errorf(http.StatusBadRequest, api.CodeBadRequest, "since=%q: want an RFC 3339 time such as 2026-11-29T00:00:00Z", v)
		}
		since = t
	}
	rows, err := s.pool.st.Usage(since.UTC().Truncate(time.Hour), r.URL.Query().Get("key"))
	if err != nil {
		return err
	}
	if rows == nil {
		rows = []api.UsageRow{}
	}
	return writeJSON(w, http.StatusOK, api.UsageResponse{Rows: rows})
}

// socketPathMax is the longest path a Unix socket address can hold.
const socketPathMax = 107

// listen opens the Unix socket at path: mode 0660, group gid when >= 0. A
// stale socket file (nobody answering) is replaced; a live one is an error.
func listen(path string, gid int) (net.Listener, error) {
	if len(path) > socketPathMax {
		return nil, fmt.Errorf("socket path %s is %d bytes, over the limit of %d: use a shorter --socket", path, len(path), socketPathMax)
	}
	dir := path[:max(strings.LastIndex(path, "/"), 0)]
	if dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("creating the socket directory: %w", err)
		}
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("socket path %s exists and is not a socket: remove it or use another --socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("another keyd is already serving %s: stop it, or use another --socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("removing the stale socket %s: %w", path, err)
		}
	}
	old := unix.Umask(0o117) // the socket is born 0660: no window where it is wider
	ln, err := net.Listen("unix", path)
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, err
	}
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("giving the socket to group %d: %w", gid, err)
		}
	}
	return ln, nil
}
