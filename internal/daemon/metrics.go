package daemon

// keyd's metrics, served as Prometheus text at GET /metrics on the socket
// and, with --metrics-listen, on a loopback TCP address.
//
// keyd writes the text exposition format (version 0.0.4) itself instead
// of using github.com/prometheus/client_golang. The format is a few lines
// of grammar; the library would bring a dozen modules (client_model,
// common, procfs, protobuf, xxhash...) into a binary that holds API keys,
// each one more thing to audit and update, for features keyd has no use
// for: registries, collectors, protobuf negotiation, exemplars. What keyd
// needs is below: counters and histograms that cost the lease path one
// atomic add each, and gauges read from the pool at scrape time.
//
// Counters are atomics, so that no path needs a lock to count; the few
// maps that lead to them are guarded by pool.mu, which every counting
// path already holds. Nothing here allocates per lease.

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/config"
	"github.com/keyd/keyd/internal/limiter"
)

// otherModel labels the refusals of lease requests for a model that was
// never configured, so that clients cannot create series at will.
const otherModel = "(unconfigured)"

// refusalCodes are the codes of keyd_leases_refused_total; any other
// code counts as the last.
var refusalCodes = [...]string{
	api.CodeNoCapacity, api.CodeNoKeys, api.CodeTokensExceedTPM, api.CodeUnknownModel,
	api.CodeShuttingDown, api.CodeBadRequest, api.CodeInternal, "other",
}

// reportClasses are the classifications of keyd_reports_total.
var reportClasses = [...]string{
	api.ClassSuccess, api.ClassUnused, api.ClassRateMinute, api.ClassRateDay,
	api.ClassQuotaZero, api.ClassCapacity, api.ClassBilling, api.ClassKeyInvalid,
	api.ClassKeyDenied, api.ClassClientError, api.ClassServerError, api.ClassNetworkError,
}

// upstream429 are the classifications that are upstream 429s: the kinds
// of keyd_upstream_429_total.
var upstream429 = []string{api.ClassRateMinute, api.ClassRateDay, api.ClassQuotaZero, api.ClassCapacity, api.ClassBilling}

// bucketStates are the states of keyd_bucket_state.
var bucketStates = []string{api.StateReady, api.StateCooling, api.StateExhausted, api.StateDisabled}

// keyStates are the states of keyd_keys.
var keyStates = []string{api.StateReady, api.StateCooling, api.StateExhausted, api.StateDisabled, api.StateNoSecret}

// Histogram bounds, in seconds. A lease may wait up to api.MaxWait.
var (
	leaseWaitBounds   = []float64{0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}
	storeCommitBounds = []float64{0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5}
)

// metrics are the pool's counters. The zero value is not ready: use
// newMetrics.
type metrics struct {
	// models maps a model to its counters. pool.mu guards the map; the
	// counters are atomic.
	models  map[string]*modelCounters
	reports [len(reportClasses)]atomic.Uint64
	reloads [2]atomic.Uint64 // ok, failed

	leaseWait   *histogram // requests that queued, from request to answer
	storeCommit *histogram // store transactions (set by Run; nil in pool tests)
}

// modelCounters count the lease requests for one model.
type modelCounters struct {
	granted atomic.Uint64
	refused [len(refusalCodes)]atomic.Uint64
}

func newMetrics() metrics {
	return metrics{models: map[string]*modelCounters{}, leaseWait: newHistogram(leaseWaitBounds)}
}

// modelCounters returns the counters of lease requests for model: its own
// once model is or was configured, else otherModel's. Callers hold mu.
func (p *pool) modelCounters(model string) *modelCounters {
	if c := p.m.models[model]; c != nil {
		return c
	}
	if _, ok := p.byModel[model]; !ok {
		model = otherModel
		if c := p.m.models[model]; c != nil {
			return c
		}
	}
	c := &modelCounters{}
	p.m.models[model] = c
	return c
}

// leaseDone counts a lease request's answer: a grant when aerr is nil,
// else a refusal with aerr's code.
func (c *modelCounters) leaseDone(aerr *api.Error) {
	if aerr == nil {
		c.granted.Add(1)
		return
	}
	i := 0
	for i < len(refusalCodes)-1 && refusalCodes[i] != aerr.Code {
		i++
	}
	c.refused[i].Add(1)
}

// reported counts a report's classification.
func (m *metrics) reported(class string) {
	for i, c := range reportClasses {
		if c == class {
			m.reports[i].Add(1)
			return
		}
	}
}

// reloaded counts a reload: ok or failed.
func (m *metrics) reloaded(ok bool) {
	if ok {
		m.reloads[0].Add(1)
	} else {
		m.reloads[1].Add(1)
	}
}

// histogram is a Prometheus histogram of durations, safe for concurrent
// use without a lock. A scrape concurrent with observe may see the new
// count in a bucket before it sees the new sum: Prometheus tolerates it.
type histogram struct {
	bounds []float64       // upper bounds in seconds, ascending
	counts []atomic.Uint64 // per bucket, not cumulative; the last is +Inf
	sumNS  atomic.Int64    // nanoseconds
}

func newHistogram(bounds []float64) *histogram {
	return &histogram{bounds: bounds, counts: make([]atomic.Uint64, len(bounds)+1)}
}

// observe adds d. It does not allocate.
func (h *histogram) observe(d time.Duration) {
	s := d.Seconds()
	i := 0
	for i < len(h.bounds) && s > h.bounds[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sumNS.Add(int64(d))
}

// scrape is what a scrape reads from the pool under mu; it is written out
// after mu is released.
type scrape struct {
	models  []string // configured models, sorted
	counted []modelCount
	buckets []bucketGauges
	keys    map[string]int
	open    int
	waiting int
}

type modelCount struct {
	model string
	c     *modelCounters
}

type bucketGauges struct {
	bid   config.BucketID
	l     limiter.Limits
	u     limiter.Usage
	state string
}

// snapshot takes a scrape's view of the pool.
func (p *pool) snapshot() *scrape {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	s := &scrape{models: p.cfg.Models(), keys: map[string]int{}, open: len(p.expiries)}
	for m, c := range p.m.models {
		s.counted = append(s.counted, modelCount{m, c})
	}
	for _, q := range p.queues {
		s.waiting += len(q)
	}
	for _, ks := range p.order {
		state, _, _ := p.keyState(ks, now)
		s.keys[state]++
	}
	for bid, b := range p.buckets {
		s.buckets = append(s.buckets, bucketGauges{bid: bid, l: b.Limits(), u: b.Usage(now),
			state: bucketPenalty(b, now).State.String()})
	}
	return s
}

// writeMetrics writes every metric of keyd in the Prometheus text format.
func (p *pool) writeMetrics(buf *bytes.Buffer, version string) {
	s := p.snapshot()
	slices.SortFunc(s.counted, func(a, b modelCount) int { return strings.Compare(a.model, b.model) })
	slices.SortFunc(s.buckets, func(a, b bucketGauges) int {
		if c := strings.Compare(a.bid.Project, b.bid.Project); c != 0 {
			return c
		}
		return strings.Compare(a.bid.Model, b.bid.Model)
	})
	w := promWriter{buf: buf}

	w.help("keyd_build_info", "gauge", "Always 1; the version label is keyd's version.")
	w.sample("keyd_build_info", 1, "version", version)

	w.help("keyd_leases_granted_total", "counter", "Lease requests granted, by model.")
	counted := map[string]*modelCounters{}
	for _, mc := range s.counted {
		counted[mc.model] = mc.c
	}
	models := slices.Clone(s.models)
	for _, mc := range s.counted {
		if mc.model != otherModel && !slices.Contains(models, mc.model) {
			models = append(models, mc.model)
		}
	}
	slices.Sort(models)
	for _, m := range models {
		var n uint64
		if c := counted[m]; c != nil {
			n = c.granted.Load()
		}
		w.sample("keyd_leases_granted_total", float64(n), "model", m)
	}

	w.help("keyd_leases_refused_total", "counter", "Lease requests refused by the pool, by model and error code (malformed and forbidden requests are not counted).")
	for _, mc := range s.counted {
		for i, code := range refusalCodes {
			if n := mc.c.refused[i].Load(); n > 0 {
				w.sample("keyd_leases_refused_total", float64(n), "model", mc.model, "code", code)
			}
		}
	}

	w.help("keyd_lease_wait_seconds", "histogram", "Time from a lease request to its answer, for requests that waited for capacity.")
	w.histogram("keyd_lease_wait_seconds", p.m.leaseWait)

	w.help("keyd_open_leases", "gauge", "Leases granted, not yet reported and not expired.")
	w.sample("keyd_open_leases", float64(s.open))
	w.help("keyd_waiting_requests", "gauge", "Lease requests waiting for capacity.")
	w.sample("keyd_waiting_requests", float64(s.waiting))

	w.help("keyd_reports_total", "counter", "Reports of a lease's outcome, by classification (a repeated report is not counted).")
	for i, class := range reportClasses {
		w.sample("keyd_reports_total", float64(p.m.reports[i].Load()), "class", class)
	}
	w.help("keyd_upstream_429_total", "counter", "Reports of an upstream 429, by kind (the classification).")
	for _, kind := range upstream429 {
		i := slices.Index(reportClasses[:], kind)
		w.sample("keyd_upstream_429_total", float64(p.m.reports[i].Load()), "kind", kind)
	}

	w.help("keyd_reloads_total", "counter", "Configuration reloads, by result: ok (valid, in effect) or failed (the running configuration stayed).")
	w.sample("keyd_reloads_total", float64(p.m.reloads[0].Load()), "result", "ok")
	w.sample("keyd_reloads_total", float64(p.m.reloads[1].Load()), "result", "failed")

	w.help("keyd_keys", "gauge", "Configured keys, by state.")
	for _, st := range keyStates {
		w.sample("keyd_keys", float64(s.keys[st]), "state", st)
	}

	for _, g := range []struct {
		name, help string
		val        func(b *bucketGauges) int64
	}{
		{"keyd_bucket_rpm_used", "Requests granted in the last 60 s, by bucket.", func(b *bucketGauges) int64 { return b.u.Requests }},
		{"keyd_bucket_rpm_limit", "The bucket's rpm limit.", func(b *bucketGauges) int64 { return b.l.RPM }},
		{"keyd_bucket_tpm_used", "Tokens granted in the last 60 s (estimates, reconciled by reports), by bucket.", func(b *bucketGauges) int64 { return b.u.Tokens }},
		{"keyd_bucket_tpm_limit", "The bucket's tpm limit.", func(b *bucketGauges) int64 { return b.l.TPM }},
		{"keyd_bucket_rpd_used", "Requests granted today (in the day-reset timezone), by bucket.", func(b *bucketGauges) int64 { return b.u.Day }},
		{"keyd_bucket_rpd_limit", "The bucket's rpd limit; 0 means none.", func(b *bucketGauges) int64 { return b.l.RPD }},
	} {
		w.help(g.name, "gauge", g.help)
		for i := range s.buckets {
			b := &s.buckets[i]
			w.sample(g.name, float64(g.val(b)), "project", b.bid.Project, "model", b.bid.Model)
		}
	}
	w.help("keyd_bucket_state", "gauge", "1 for the bucket's state, 0 for the others.")
	for _, b := range s.buckets {
		for _, st := range bucketStates {
			v := 0.0
			if b.state == st {
				v = 1
			}
			w.sample("keyd_bucket_state", v, "project", b.bid.Project, "model", b.bid.Model, "state", st)
		}
	}

	if h := p.m.storeCommit; h != nil {
		w.help("keyd_store_commit_seconds", "histogram", "Duration of the store's commits (one write-ahead log record and its fdatasync each); one commit carries every batch pending when it starts.")
		w.histogram("keyd_store_commit_seconds", h)
	}
}

// promWriter writes the Prometheus text format into buf.
type promWriter struct {
	buf *bytes.Buffer
}

// help writes a metric's HELP and TYPE lines.
func (w promWriter) help(name, typ, help string) {
	help = strings.NewReplacer(`\`, `\\`, "\n", `\n`).Replace(help)
	fmt.Fprintf(w.buf, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
}

// sample writes one sample; labels are name, value pairs.
func (w promWriter) sample(name string, v float64, labels ...string) {
	b := w.buf
	b.WriteString(name)
	if len(labels) > 0 {
		b.WriteByte('{')
		for i := 0; i+1 < len(labels); i += 2 {
			if i > 0 {
				b.WriteByte(',')
			}
			b.WriteString(labels[i])
			b.WriteString(`="`)
			b.WriteString(escapeLabel(labels[i+1]))
			b.WriteByte('"')
		}
		b.WriteByte('}')
	}
	b.WriteByte(' ')
	b.WriteString(formatValue(v))
	b.WriteByte('\n')
}

// histogram writes h's cumulative buckets, sum and count.
func (w promWriter) histogram(name string, h *histogram) {
	var cum uint64
	for i := range h.counts {
		cum += h.counts[i].Load()
		le := "+Inf"
		if i < len(h.bounds) {
			le = formatValue(h.bounds[i])
		}
		w.sample(name+"_bucket", float64(cum), "le", le)
	}
	w.sample(name+"_sum", time.Duration(h.sumNS.Load()).Seconds())
	w.sample(name+"_count", float64(cum))
}

// escapeLabel escapes a label value: backslash, double quote and newline.
func escapeLabel(s string) string {
	if !strings.ContainsAny(s, "\\\"\n") {
		return s
	}
	return strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(s)
}

// formatValue writes a sample value as Prometheus reads it.
func formatValue(v float64) string {
	switch {
	case math.IsInf(v, +1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	case math.IsNaN(v):
		return "NaN"
	case v == math.Trunc(v) && math.Abs(v) < 1e15: // counts and limits
		return strconv.FormatInt(int64(v), 10)
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

// metricsContentType is the content type of the text format.
const metricsContentType = "text/plain; version=0.0.4; charset=utf-8"

func (s *server) serveMetrics(w http.ResponseWriter, r *http.Request) error {
	var buf bytes.Buffer
	s.pool.writeMetrics(&buf, s.version)
	w.Header().Set("Content-Type", metricsContentType)
	_, err := w.Write(buf.Bytes())
	return err
}

// metricsHandler serves GET /metrics alone, for --metrics-listen: a TCP
// listener has no peer credentials, and needs none for metrics.
func (s *server) metricsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+api.RouteMetrics, func(w http.ResponseWriter, r *http.Request) {
		if err := s.serveMetrics(w, r); err != nil {
			writeError(w, err)
		}
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, api.Errorf(http.StatusNotFound, api.CodeNotFound, "no route %s %s: this address serves only GET %s", r.Method, r.URL.Path, api.RouteMetrics))
	})
	return mux
}

// checkMetricsListen accepts a loopback host:port for --metrics-listen:
// metrics hold no secret, but name projects and models, and keyd opens no
// port beyond the machine. "localhost" is taken as 127.0.0.1.
func checkMetricsListen(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("--metrics-listen %q: want a loopback HOST:PORT such as 127.0.0.1:9464 (%v)", addr, err)
	}
	if host == "localhost" {
		host = "127.0.0.1"
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return "", fmt.Errorf("--metrics-listen %q: %q is not a loopback address: keyd serves metrics only on 127.0.0.0/8 or [::1]", addr, host)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return "", fmt.Errorf("--metrics-listen %q: bad port %q", addr, port)
	}
	return net.JoinHostPort(host, port), nil
}

// metricsListenError explains a failure to listen on addr for
// --metrics-listen. The one an operator cannot guess is the sandbox's:
// keyd.service allows Unix sockets only (RestrictAddressFamilies=AF_UNIX)
// and gives keyd a network namespace of its own (PrivateNetwork=yes), so
// creating the TCP socket fails with EAFNOSUPPORT; its IPAddressDeny=any
// would then drop even loopback packets.
func metricsListenError(addr string, err error) error {
	if errors.Is(err, syscall.EAFNOSUPPORT) {
		return fmt.Errorf("--metrics-listen %s: this process may not open TCP sockets (%w): "+
			"keyd.service allows only Unix sockets (RestrictAddressFamilies=AF_UNIX) and has a network of its own (PrivateNetwork=yes); "+
			"scrape GET /metrics on the socket instead, or set RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6, PrivateNetwork=no and IPAddressAllow=localhost in a drop-in (systemctl edit keyd)", addr, err)
	}
	return fmt.Errorf("--metrics-listen %s: %w", addr, err)
}
