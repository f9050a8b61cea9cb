package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"regexp"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/config"
	"github.com/keyd/keyd/internal/store"
	"github.com/keyd/keyd/internal/testutil"
)

// metricsKeys: k1 serves m in p1 (rpm 2, rpd 10); nosecret1 serves m2 in
// p2 and has no secret.
const metricsKeys = `{"keys":[
	{"key_id":"k1","project":"p1","model_name":"m","rpm":2,"tpm":100000,"rpd":10},
	{"key_id":"nosecret1","project":"p2","model_name":"m2","rpm":5,"tpm":1000}]}`

func scrapePool(p *pool) string {
	var buf bytes.Buffer
	p.writeMetrics(&buf, "1.2.3")
	return buf.String()
}

// TestMetricsCountWhatHappened drives a known sequence of leases, reports
// and reloads through the pool and checks the exact lines of /metrics.
func TestMetricsCountWhatHappened(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, metricsKeys)
		l1 := mustLease(t, p, api.LeaseRequest{Model: "m", Tokens: 10})
		l2 := mustLease(t, p, api.LeaseRequest{Model: "m", Tokens: 10})
		leaseErr(t, p, api.LeaseRequest{Model: "m", Tokens: 10})                  // no_capacity: rpm 2/2
		leaseErr(t, p, api.LeaseRequest{Model: "nope\"\\"})                       // unknown_model
		leaseErr(t, p, api.LeaseRequest{Model: "other-nope"})                     // unknown_model
		leaseErr(t, p, api.LeaseRequest{Model: "m", Tokens: 200_000})             // tokens_exceed_tpm
		leaseErr(t, p, api.LeaseRequest{Model: "m2"})                             // no_keys
		if got := scrapePool(p); !strings.Contains(got, "keyd_open_leases 2\n") { // before the reports
			t.Errorf("open leases: want 2 in\n%s", got)
		}
		mustReport(t, p, l1.LeaseID, api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: 8}})
		mustReport(t, p, l2.LeaseID, api.ReportRequest{Status: 429, Error: readBody(t, "429_classic_tpm.json")})
		mustReport(t, p, l2.LeaseID, api.ReportRequest{Status: 200}) // a duplicate: not counted
		start := time.Now()
		leaseErr(t, p, api.LeaseRequest{Model: "m", WaitMS: 5000}) // waits 5s, the bucket cooling
		if d := time.Since(start); d != 5*time.Second {
			t.Fatalf("waited %v", d)
		}
		p.reload(func() (*config.Config, error) { return nil, errors.New("bad keys.json") })
		p.reload(func() (*config.Config, error) { return p.cfg, nil })

		got := scrapePool(p)
		want := []string{
			`keyd_build_info{version="1.2.3"} 1`,
			`keyd_leases_granted_total{model="m"} 2`,
			`keyd_leases_granted_total{model="m2"} 0`,
			`keyd_leases_refused_total{model="(unconfigured)",code="unknown_model"} 2`,
			`keyd_leases_refused_total{model="m",code="no_capacity"} 2`,
			`keyd_leases_refused_total{model="m",code="tokens_exceed_tpm"} 1`,
			`keyd_leases_refused_total{model="m2",code="no_keys"} 1`,
			`keyd_lease_wait_seconds_bucket{le="2.5"} 0`,
			`keyd_lease_wait_seconds_bucket{le="5"} 1`,
			`keyd_lease_wait_seconds_bucket{le="+Inf"} 1`,
			`keyd_lease_wait_seconds_sum 5`,
			`keyd_lease_wait_seconds_count 1`,
			`keyd_open_leases 0`,
			`keyd_waiting_requests 0`,
			`keyd_reports_total{class="success"} 1`,
			`keyd_reports_total{class="rate_minute"} 1`,
			`keyd_reports_total{class="unused"} 0`,
			`keyd_reports_total{class="network_error"} 0`,
			`keyd_upstream_429_total{kind="rate_minute"} 1`,
			`keyd_upstream_429_total{kind="billing"} 0`,
			`keyd_reloads_total{result="ok"} 1`,
			`keyd_reloads_total{result="failed"} 1`,
			`keyd_keys{state="ready"} 0`,
			`keyd_keys{state="cooling"} 1`,
			`keyd_keys{state="no_secret"} 1`,
			`keyd_bucket_rpm_used{project="p1",model="m"} 2`,
			`keyd_bucket_rpm_limit{project="p1",model="m"} 2`,
			`keyd_bucket_tpm_used{project="p1",model="m"} 18`,
			`keyd_bucket_tpm_limit{project="p1",model="m"} 100000`,
			`keyd_bucket_rpd_used{project="p1",model="m"} 2`,
			`keyd_bucket_rpd_limit{project="p1",model="m"} 10`,
			`keyd_bucket_rpd_limit{project="p2",model="m2"} 0`,
			`keyd_bucket_state{project="p1",model="m",state="ready"} 0`,
			`keyd_bucket_state{project="p1",model="m",state="cooling"} 1`,
			`keyd_bucket_state{project="p2",model="m2",state="ready"} 1`,
			`keyd_bucket_state{project="p2",model="m2",state="disabled"} 0`,
			"# HELP keyd_leases_granted_total Lease requests granted, by model.",
			"# TYPE keyd_leases_granted_total counter",
			"# TYPE keyd_lease_wait_seconds histogram",
			"# TYPE keyd_bucket_state gauge",
		}
		lines := strings.Split(got, "\n")
		for _, w := range want {
			if !containsLine(lines, w) {
				t.Errorf("no line %s", w)
			}
		}
		// Refusals are listed only once they happened; pool tests have
		// no store, so no commit histogram.
		for _, no := range []string{`code="shutting_down"`, `keyd_leases_granted_total{model="(unconfigured)"}`, `model="nope`, `model="other-nope"`, "keyd_store_commit_seconds"} {
			if strings.Contains(got, no) {
				t.Errorf("unexpected %s", no)
			}
		}
		checkExposition(t, got)
		if t.Failed() {
			t.Logf("metrics:\n%s", got)
		}
	})
}

func containsLine(lines []string, want string) bool {
	for _, l := range lines {
		if l == want {
			return true
		}
	}
	return false
}

// The Prometheus text format (version 0.0.4), line by line.
var (
	helpLine   = regexp.MustCompile(`^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) (?:[^\\\n]|\\[\\n])*$`)
	typeLine   = regexp.MustCompile(`^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary|untyped)$`)
	sampleLine = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*)?\})? (\S+)$`)
)

// checkExposition checks text against the grammar of the format: HELP and
// TYPE once per family, before its samples; every sample of a declared
// family, once; values that parse; histograms cumulative, ending in +Inf
// equal to _count.
func checkExposition(t *testing.T, text string) {
	t.Helper()
	for _, e := range expositionErrors(text) {
		t.Error(e)
	}
}

func expositionErrors(text string) []string {
	var errs []string
	errorf := func(format string, args ...any) { errs = append(errs, fmt.Sprintf(format, args...)) }
	if !strings.HasSuffix(text, "\n") {
		errorf("the text does not end in a newline")
	}
	types := map[string]string{}
	helps := map[string]bool{}
	seen := map[string]bool{}
	var lastBucket float64
	var lastFamily string
	for i, l := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		n := i + 1
		switch {
		case strings.HasPrefix(l, "# HELP "):
			m := helpLine.FindStringSubmatch(l)
			if m == nil || helps[m[1]] {
				errorf("line %d: bad or repeated HELP: %q", n, l)
				continue
			}
			helps[m[1]] = true
		case strings.HasPrefix(l, "# TYPE "):
			m := typeLine.FindStringSubmatch(l)
			if m == nil || types[m[1]] != "" {
				errorf("line %d: bad or repeated TYPE: %q", n, l)
				continue
			}
			types[m[1]] = m[2]
		default:
			m := sampleLine.FindStringSubmatch(l)
			if m == nil {
				errorf("line %d: not a sample: %q", n, l)
				continue
			}
			name, labels, value := m[1], m[2], m[3]
			v, err := strconv.ParseFloat(value, 64)
			if err != nil {
				errorf("line %d: value %q: %v", n, value, err)
			}
			family := name
			if types[name] == "" {
				for _, suf := range []string{"_bucket", "_sum", "_count"} {
					if f, ok := strings.CutSuffix(name, suf); ok && types[f] == "histogram" {
						family = f
					}
				}
			}
			if types[family] == "" || !helps[family] {
				errorf("line %d: sample of %s before its HELP and TYPE", n, family)
			}
			if seen[name+labels] {
				errorf("line %d: repeated series %s%s", n, name, labels)
			}
			seen[name+labels] = true
			if family != lastFamily {
				lastBucket = 0
				lastFamily = family
			}
			switch {
			case strings.HasSuffix(name, "_bucket") && family != name:
				if v < lastBucket {
					errorf("line %d: histogram buckets not cumulative", n)
				}
				lastBucket = v
			case strings.HasSuffix(name, "_count") && family != name:
				if v != lastBucket {
					errorf("line %d: _count %v, +Inf bucket %v", n, v, lastBucket)
				}
			}
		}
	}
	return errs
}

func TestCheckExpositionCatchesBadText(t *testing.T) {
	for _, bad := range []string{
		"keyd_x 1\n", // no TYPE
		"# HELP keyd_x x\n# TYPE keyd_x gauge\nkeyd_x{a=\"b\"\"} 1\n",
		"# HELP keyd_x x\n# TYPE keyd_x gauge\nkeyd_x one\n",
		"# HELP keyd_x x\n# TYPE keyd_x gauge\nkeyd_x 1\nkeyd_x 2\n",
		"# HELP keyd_h x\n# TYPE keyd_h histogram\nkeyd_h_bucket{le=\"1\"} 2\nkeyd_h_bucket{le=\"+Inf\"} 1\nkeyd_h_count 1\n",
		"# HELP keyd_x x\n# TYPE keyd_x gauge\nkeyd_x 1",
	} {
		if len(expositionErrors(bad)) == 0 {
			t.Errorf("accepted %q", bad)
		}
	}
}

func TestEscapeLabel(t *testing.T) {
	for in, want := range map[string]string{
		"gemini-2.5-flash": "gemini-2.5-flash",
		`a"b`:              `a\"b`,
		`a\b`:              `a\\b`,
		"a\nb":             `a\nb`,
		"é ü":              "é ü",
	} {
		if got := escapeLabel(in); got != want {
			t.Errorf("escapeLabel(%q) = %q, want %q", in, got, want)
		}
	}
	var buf bytes.Buffer
	w := promWriter{buf: &buf}
	w.help("keyd_t", "gauge", "a \\ and\na newline")
	w.sample("keyd_t", 1.5, "model", "x\"y\\z\n")
	w.sample("keyd_t", 1e12, "model", "big")
	w.sample("keyd_t", math.Inf(+1), "model", "inf")
	want := "# HELP keyd_t a \\\\ and\\na newline\n# TYPE keyd_t gauge\nkeyd_t{model=\"x\\\"y\\\\z\\n\"} 1.5\n" +
		"keyd_t{model=\"big\"} 1000000000000\nkeyd_t{model=\"inf\"} +Inf\n"
	if buf.String() != want {
		t.Errorf("got\n%s\nwant\n%s", buf.String(), want)
	}
	checkExposition(t, buf.String())
}

func TestHistogram(t *testing.T) {
	h := newHistogram([]float64{0.01, 1})
	for _, d := range []time.Duration{0, 10 * time.Millisecond, 11 * time.Millisecond, time.Second, time.Hour} {
		h.observe(d)
	}
	var buf bytes.Buffer
	w := promWriter{buf: &buf}
	w.help("keyd_h_seconds", "histogram", "h")
	w.histogram("keyd_h_seconds", h)
	want := `# HELP keyd_h_seconds h
# TYPE keyd_h_seconds histogram
keyd_h_seconds_bucket{le="0.01"} 2
keyd_h_seconds_bucket{le="1"} 4
keyd_h_seconds_bucket{le="+Inf"} 5
keyd_h_seconds_sum 3601.021
keyd_h_seconds_count 5
`
	if buf.String() != want {
		t.Errorf("got\n%s\nwant\n%s", buf.String(), want)
	}
	if n := testing.AllocsPerRun(100, func() { h.observe(time.Millisecond) }); n != 0 {
		t.Errorf("observe allocates %v times", n)
	}
}

// TestLeaseCountingDoesNotAllocate: the counters add no allocation to a
// lease or report.
func TestLeaseCountingDoesNotAllocate(t *testing.T) {
	p := testPool(t, &memStore{}, metricsKeys)
	p.mu.Lock()
	c := p.modelCounters("m")
	p.mu.Unlock()
	aerr := &api.Error{Code: api.CodeNoCapacity}
	n := testing.AllocsPerRun(100, func() {
		p.mu.Lock()
		c = p.modelCounters("m")
		p.mu.Unlock()
		c.leaseDone(nil)
		c.leaseDone(aerr)
		p.m.reported(api.ClassSuccess)
		p.m.leaseWait.observe(time.Second)
	})
	if n != 0 {
		t.Errorf("counting allocates %v times", n)
	}
}

func TestMetricsOverTheSocket(t *testing.T) {
	d := startDaemon(t, socketKeys)
	d.do(t, "POST", "/v1/leases", `{"model":"m","tokens":10}`)
	req, _ := http.NewRequest("GET", "http://keyd/metrics", nil)
	resp, err := d.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != metricsContentType {
		t.Fatalf("GET /metrics: %d %s\n%s", resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
	text := string(body)
	checkExposition(t, text)
	for _, w := range []string{
		`keyd_leases_granted_total{model="m"} 1`,
		`keyd_open_leases 1`,
		`keyd_keys{state="no_secret"} 1`,
		`keyd_bucket_rpm_used{project="k1",model="m"} 1`,
	} {
		if !containsLine(strings.Split(text, "\n"), w) {
			t.Errorf("no line %s", w)
		}
	}
	// The startup fixups and the grant each took a transaction.
	m := regexp.MustCompile(`(?m)^keyd_store_commit_seconds_count (\d+)$`).FindStringSubmatch(text)
	if m == nil || m[1] == "0" {
		t.Errorf("no store commits counted")
	}
	if strings.Contains(text, exampleSecret) || strings.Contains(text, "AIza") {
		t.Errorf("a secret in the metrics")
	}
	if status, _ := d.do(t, "POST", "/metrics", ""); status != http.StatusMethodNotAllowed {
		t.Errorf("POST /metrics: %d", status)
	}
}

func TestMetricsListen(t *testing.T) {
	d := startDaemonWith(t, socketKeys, func(o *Options) {
		o.MetricsListen = "127.0.0.1:0"
		o.LogFormat = "json"
	})
	m := regexp.MustCompile(`"msg":"serving metrics","addr":"([^"]+)"`).FindStringSubmatch(d.log.String())
	if m == nil {
		t.Fatalf("no metrics address in the log:\n%s", d.log)
	}
	addr := m[1]
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if status, body := get("/metrics"); status != 200 || !strings.Contains(body, "keyd_build_info") {
		t.Fatalf("GET /metrics over TCP: %d\n%s", status, body)
	}
	for _, path := range []string{"/v1/status", "/v1/health", "/"} {
		if status, _ := get(path); status != http.StatusNotFound {
			t.Errorf("GET %s over TCP: %d, want 404", path, status)
		}
	}
	http.DefaultClient.CloseIdleConnections()
	if err := d.stop(); err != nil {
		t.Fatal(err)
	}
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Fatalf("the metrics address still answers after keyd stopped")
	}
	// Every log line is a JSON object.
	for _, l := range strings.Split(strings.TrimSpace(d.log.String()), "\n") {
		if !strings.HasPrefix(l, `{"time":`) || !strings.HasSuffix(l, "}") {
			t.Errorf("not a JSON log line: %s", l)
		}
	}
}

func TestCheckMetricsListen(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1:9464":  "127.0.0.1:9464",
		"127.0.0.2:1":     "127.0.0.2:1",
		"[::1]:9464":      "[::1]:9464",
		"localhost:9464":  "127.0.0.1:9464",
		"0.0.0.0:9464":    "",
		":9464":           "",
		"[::]:9464":       "",
		"10.1.2.3:9464":   "",
		"example.com:80":  "",
		"127.0.0.1":       "",
		"127.0.0.1:http":  "",
		"127.0.0.1:70000": "",
	} {
		got, err := checkMetricsListen(in)
		if got != want || (err == nil) != (want != "") {
			t.Errorf("checkMetricsListen(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

// TestMetricsListenSandboxed: under keyd.service's sandbox, creating the
// TCP socket fails with EAFNOSUPPORT (what net.Listen returns is built
// here as net builds it); the error must say why and the two ways out.
func TestMetricsListenSandboxed(t *testing.T) {
	denied := &net.OpError{Op: "listen", Net: "tcp", Err: os.NewSyscallError("socket", syscall.EAFNOSUPPORT)}
	msg := metricsListenError("127.0.0.1:9464", denied).Error()
	for _, want := range []string{"--metrics-listen 127.0.0.1:9464", "address family not supported", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "PrivateNetwork=no", "IPAddressAllow=localhost", "systemctl edit keyd", "GET /metrics on the socket"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q lacks %q", msg, want)
		}
	}
	// Any other failure is passed on as it is, with the flag and address.
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	_, err = net.Listen("tcp", busy.Addr().String())
	msg = metricsListenError(busy.Addr().String(), err).Error()
	if !strings.Contains(msg, "--metrics-listen "+busy.Addr().String()) || !strings.Contains(msg, "address already in use") || strings.Contains(msg, "PrivateNetwork") {
		t.Errorf("in-use error: %q", msg)
	}
}

func TestLogFlags(t *testing.T) {
	var stderr bytes.Buffer
	o, err := parseFlags([]string{"--log-format", "json", "--metrics-listen", "127.0.0.1:9464"}, io.Discard, &stderr)
	if err != nil || o.LogFormat != "json" || o.MetricsListen != "127.0.0.1:9464" {
		t.Fatalf("parse: %+v %v", o, err)
	}
	if o, _ := parseFlags(nil, io.Discard, &stderr); o.LogFormat != "text" || o.GCHeadroom != 64<<20 {
		t.Fatalf("default log format %q, gc headroom %d", o.LogFormat, o.GCHeadroom)
	}
	if o, err := parseFlags([]string{"--gc-headroom", "0"}, io.Discard, &stderr); err != nil || o.GCHeadroom != 0 {
		t.Fatalf("--gc-headroom 0: %d, %v", o.GCHeadroom, err)
	}
	for _, args := range [][]string{{"--log-format", "xml"}, {"--metrics-listen", "0.0.0.0:9464"}, {"--gc-headroom", "-1"}} {
		stderr.Reset()
		if _, err := parseFlags(args, io.Discard, &stderr); err == nil || !strings.Contains(stderr.String(), args[0]) {
			t.Errorf("%v: err %v, stderr %q", args, err, stderr.String())
		}
	}
	stderr.Reset()
	parseFlags([]string{"--help"}, io.Discard, &stderr)
	for _, want := range []string{"-log-format", "-metrics-listen HOST:PORT", "-gc-headroom MiB"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("--help lacks %s:\n%s", want, stderr.String())
		}
	}
}

// TestGCTuningLog: Main's one line on the GC headroom says what it chose,
// and GOGC in the environment turns the tuning off.
func TestGCTuningLog(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	for _, tc := range []struct {
		gogc     string
		headroom int64
		want     string
		tunes    bool
	}{
		{"", 64 << 20, `level=INFO msg="gc heap headroom" mib=64` + "\n", true},
		{"", 0, `level=INFO msg="gc heap headroom off" reason="--gc-headroom 0"` + "\n", false},
		{"400", 64 << 20, `level=INFO msg="gc heap headroom off" reason="GOGC=400 is set in the environment"` + "\n", false},
	} {
		t.Setenv("GOGC", tc.gogc)
		t.Setenv("GOMEMLIMIT", "")
		var logs bytes.Buffer
		stop := tuneGC(&logs, Options{GCHeadroom: tc.headroom})
		if !strings.HasSuffix(logs.String(), tc.want) || strings.Count(logs.String(), "\n") != 1 {
			t.Errorf("GOGC=%q, headroom %d: logged %q, want one line ending %q", tc.gogc, tc.headroom, logs.String(), tc.want)
		}
		if (stop != nil) != tc.tunes {
			t.Errorf("GOGC=%q, headroom %d: tuning %v, want %v", tc.gogc, tc.headroom, stop != nil, tc.tunes)
		}
		if stop != nil {
			stop()
		}
	}
}

// TestStateChangesAreLogged: one info line per state change, none for a
// verdict that changes nothing, and never a secret.
func TestStateChangesAreLogged(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var logs testutil.SyncBuffer
		p := newPool(&memStore{}, time.Now, slog.New(slog.NewTextHandler(&logs, nil)))
		p.mu.Lock()
		p.apply(testConfig(t, `{"keys":[
			{"key_id":"a","project":"p","model_name":"m","rpm":10,"tpm":100000},
			{"key_id":"d","project":"q","model_name":"m","rpm":10,"tpm":100000,"rpd":1,"priority":-1},
			{"key_id":"e","project":"r","model_name":"m","rpm":10,"tpm":100000,"priority":-2}]}`), time.Now(), &store.Batch{})
		p.mu.Unlock()
		ctx := context.Background()

		l1 := mustLease(t, p, api.LeaseRequest{Model: "m"})
		l2 := mustLease(t, p, api.LeaseRequest{Model: "m"}) // a again: priority
		mustReport(t, p, l1.LeaseID, api.ReportRequest{Status: 429, Error: readBody(t, "429_newer_limit0.json")})
		mustReport(t, p, l2.LeaseID, api.ReportRequest{Status: 429, Error: readBody(t, "429_newer_limit0.json")})
		mustLease(t, p, api.LeaseRequest{Model: "m"})       // d, its rpd used up
		l3 := mustLease(t, p, api.LeaseRequest{Model: "m"}) // e
		l4 := mustLease(t, p, api.LeaseRequest{Model: "m"})
		mustReport(t, p, l3.LeaseID, api.ReportRequest{Status: 429, Error: readBody(t, "429_prepayment_credits.json")})
		mustReport(t, p, l4.LeaseID, api.ReportRequest{Status: 429, Error: readBody(t, "429_prepayment_credits.json")})
		p.keyAction(ctx, "a", "disable", "admin uid 0")
		p.keyAction(ctx, "a", "enable", "admin uid 0")

		out := logs.String()
		for _, want := range []string{
			`level=INFO msg="bucket disabled" bucket=p/m reason=`,
			`level=INFO msg="bucket exhausted" bucket=q/m until=`,
			`reason="rpd 1/1 used until the day resets"`,
			`level=INFO msg="key disable" key=a by="admin uid 0" state=disabled`,
			`level=INFO msg="key enable" key=a by="admin uid 0" state=disabled`, // its bucket still is
		} {
			if !strings.Contains(out, want) {
				t.Errorf("log lacks %s", want)
			}
		}
		if n := strings.Count(out, `msg="bucket disabled"`); n != 1 {
			t.Errorf("%d lines for one bucket disabled", n)
		}
		if n := strings.Count(out, `level=INFO msg="project disabled" project=r`); n != 1 {
			t.Errorf("%d lines for one project disabled", n)
		}
		if strings.Contains(out, "until=0001") {
			t.Errorf("a zero until in the log")
		}
		if strings.Contains(out, "AIza") {
			t.Errorf("a secret in the log")
		}
		if t.Failed() {
			t.Logf("log:\n%s", out)
		}
	})
}

func TestRoutesAreSortedAndMatchTheAPI(t *testing.T) {
	var paths []string
	for _, rt := range routes {
		_, path, _ := strings.Cut(rt.pattern, " ")
		paths = append(paths, path)
	}
	for i := 1; i < len(paths); i++ {
		if paths[i-1] >= paths[i] {
			t.Errorf("route %s before %s: keep the table sorted by path", paths[i-1], paths[i])
		}
	}
	want := []string{api.RouteMetrics, api.RouteHealth, api.RouteKeys, api.RouteLeases, api.RouteLeaseID,
		api.RouteReload, api.RouteStatus, api.RouteUsage}
	if len(paths) != len(want) {
		t.Fatalf("routes %v, api constants %v", paths, want)
	}
	for i, w := range want {
		if !strings.HasPrefix(paths[i], w) || (!strings.HasSuffix(w, "/") && paths[i] != w) {
			t.Errorf("route %d is %s, api says %s", i, paths[i], w)
		}
	}
	if fmt.Sprint(routes[0].need) != "read" {
		t.Errorf("/metrics needs %s, want read", routes[0].need)
	}
}

// TestStoreDiagnosticsReachTheLog: the store's diagnostics go to keyd's
// log, recoveries and upgrades at info, failures at warn.
func TestStoreDiagnosticsReachTheLog(t *testing.T) {
	var buf bytes.Buffer
	logf := storeLogf(slog.New(slog.NewTextHandler(&buf, nil)))
	logf("store: applied %d write-ahead log records (up to %d) to %s", 3, 9, "/s/keyd.db")
	logf("store: upgraded %s to schema version %d (store id %x)", "/s/keyd.db", 3, []byte{1})
	logf("store: %v (retrying in %v; the log keeps the records meanwhile)", errors.New("checkpoint: disk full"), time.Second)
	want := []string{
		`level=INFO msg="store: applied 3 write-ahead log records (up to 9) to /s/keyd.db"`,
		`level=INFO msg="store: upgraded /s/keyd.db to schema version 3 (store id 01)"`,
		`level=WARN msg="store: checkpoint: disk full (retrying in 1s; the log keeps the records meanwhile)"`,
	}
	for _, w := range want {
		if !strings.Contains(buf.String(), w) {
			t.Errorf("log lacks %s:\n%s", w, buf.String())
		}
	}
}
