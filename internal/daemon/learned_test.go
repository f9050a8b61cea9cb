package daemon

import (
	"encoding/json"
	"log/slog"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/config"
	"github.com/keyd/keyd/internal/gemini"
	"github.com/keyd/keyd/internal/store"
	"github.com/keyd/keyd/internal/testutil"
)

// freeTier is keys.json for a project that is really on Gemini's free
// tier: p1's two keys share a bucket whose limits are too high.
const freeTier = `{"keys":[
	{"key_id":"k1","project":"p1","model_name":"gemini-2.5-flash","rpm":10,"tpm":1000000},
	{"key_id":"k2","project":"p1","model_name":"gemini-2.5-flash","rpm":10,"tpm":1000000},
	{"key_id":"k3","project":"p2","model_name":"gemini-2.5-flash","rpm":10,"tpm":1000000,"priority":-1}]}`

const (
	freeRPM = "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
	freeRPD = "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
	freeTPM = "GenerateContentInputTokensPerModelPerMinute-FreeTier"
)

// rpmWarning is the warning a free-tier rpm of 5 gives freeTier's p1.
const rpmWarning = `project p1 model gemini-2.5-flash: Gemini reports rpm 5 (quota GenerateRequestsPerMinutePerProjectPerModel-FreeTier), ` +
	`keys.json says 10: set "rpm": 5 for its keys (k1, k2); keyd enforces 5 until then`

// quota429 is Gemini's 429 for violations of (quotaId, quotaValue) pairs on
// model, as the report's error field carries it (decoded JSON).
func quota429(t *testing.T, model string, idValues ...string) any {
	t.Helper()
	qf := gemini.QuotaFailure{}
	for i := 0; i < len(idValues); i += 2 {
		qf.Violations = append(qf.Violations, gemini.QuotaViolation{
			QuotaMetric:     "generativelanguage.googleapis.com/generate_content_free_tier_requests",
			QuotaID:         idValues[i],
			QuotaDimensions: map[string]string{"location": "global", "model": model},
			QuotaValue:      idValues[i+1],
		})
	}
	raw, err := json.Marshal(gemini.ErrorBody{Error: gemini.ErrorDetail{Code: 429, Status: "RESOURCE_EXHAUSTED",
		Message: "You exceeded your current quota, please check your plan and billing details.",
		Details: []any{qf, gemini.RetryInfo{RetryDelay: "22s"}}}})
	if err != nil {
		t.Fatal(err)
	}
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// learnPool is a pool on keysJSON whose clock moves only when the test
// moves *clock, logging at debug to logs.
func learnPool(t *testing.T, keysJSON string, clock *time.Time, logs *testutil.SyncBuffer) *pool {
	t.Helper()
	p := newPool(&memStore{}, func() time.Time { return *clock },
		slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	p.mu.Lock()
	p.apply(testConfig(t, keysJSON), *clock, &store.Batch{})
	p.mu.Unlock()
	return p
}

func bucketOf(t *testing.T, st *api.Status, project string) api.BucketState {
	t.Helper()
	for _, b := range st.Buckets {
		if b.Project == project {
			return b
		}
	}
	t.Fatalf("no bucket of project %s in %+v", project, st.Buckets)
	return api.BucketState{}
}

// report429 leases on p (key k1 or k2 of p1 while they can) and reports
// body for the lease.
func report429(t *testing.T, p *pool, body any) *api.ReportResponse {
	t.Helper()
	l := mustLease(t, p, api.LeaseRequest{Model: "gemini-2.5-flash", Tokens: 10})
	return mustReport(t, p, l.LeaseID, api.ReportRequest{Status: 429, Error: body})
}

// TestQuotaBelowKeysJSONWarnsAndLowersTheLimit: a 429 whose quotaValue is
// below keys.json's limit gives one bucket warning with the fix, logged
// once at warn, and the bucket enforces the lower value until a reload
// changes keys.json's.
func TestQuotaBelowKeysJSONWarnsAndLowersTheLimit(t *testing.T) {
	clock := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	var logs testutil.SyncBuffer
	p := learnPool(t, freeTier, &clock, &logs)
	warnLine := `level=WARN msg="` + strings.ReplaceAll(rpmWarning, `"`, `\"`) + `" bucket=p1/gemini-2.5-flash`

	r := report429(t, p, quota429(t, "gemini-2.5-flash", freeRPM, "5"))
	if r.Classification != api.ClassRateMinute ||
		!strings.HasSuffix(r.Action, "; rpm limited to 5 as Gemini reports (keys.json says 10)") {
		t.Fatalf("report: %+v", r)
	}
	st := p.status("test")
	b := bucketOf(t, st, "p1")
	if len(b.Warnings) != 1 || b.Warnings[0] != rpmWarning {
		t.Fatalf("bucket warnings %q\nwant %q", b.Warnings, rpmWarning)
	}
	if b.RPM.Limit != 5 || b.TPM.Limit != 1000000 || b.RPD.Limit != 0 {
		t.Fatalf("bucket limits rpm %d tpm %d rpd %d, want 5 1000000 0", b.RPM.Limit, b.TPM.Limit, b.RPD.Limit)
	}
	if other := bucketOf(t, st, "p2"); other.Warnings != nil || other.RPM.Limit != 10 {
		t.Fatalf("another project's bucket changed: %+v", other)
	}
	if len(st.Config.Warnings) != 0 {
		t.Fatalf("config warnings %q: the bucket's belong to the bucket", st.Config.Warnings)
	}
	// In the status JSON, as an additive field of the bucket only.
	raw, _ := json.Marshal(st)
	wantJSON, _ := json.Marshal(rpmWarning)
	if !strings.Contains(string(raw), `"rpm":{"used":1,"limit":5},`) ||
		!strings.Contains(string(raw), `"in_flight":0,"warnings":[`+string(wantJSON)+`]}`) ||
		strings.Count(string(raw), `"warnings"`) != 2 { // config's and p1's
		t.Fatalf("status JSON %s", raw)
	}
	if n := strings.Count(logs.String(), warnLine); n != 1 {
		t.Fatalf("%d warn lines %q in the log:\n%s", n, warnLine, logs.String())
	}

	// The same value again, in more reports: no new line, no new action.
	clock = clock.Add(2 * time.Minute) // past the cooldown
	for range 3 {
		if r := report429(t, p, quota429(t, "gemini-2.5-flash", freeRPM, "5")); strings.Contains(r.Action, "limited") {
			t.Fatalf("a known limit reported again: %q", r.Action)
		}
		clock = clock.Add(10 * time.Minute)
	}
	if n := strings.Count(logs.String(), "level=WARN"); n != 1 {
		t.Fatalf("%d warn lines after repeated reports, want 1:\n%s", n, logs.String())
	}

	// The bucket holds to 5 in any 60 s window.
	clock = clock.Add(time.Hour)
	for i := range 5 {
		mustLease(t, p, api.LeaseRequest{Model: "gemini-2.5-flash", Tokens: 10})
		clock = clock.Add(time.Second * time.Duration(i))
	}
	if l := mustLease(t, p, api.LeaseRequest{Model: "gemini-2.5-flash", Tokens: 10}); l.KeyID != "k3" {
		t.Fatalf("the 6th lease within a minute went to %s, want k3 of p2: p1 enforces rpm 5", l.KeyID)
	}

	// A new value: a new line and warning.
	clock = clock.Add(time.Hour)
	if r := report429(t, p, quota429(t, "gemini-2.5-flash", freeRPM, "4")); !strings.HasSuffix(r.Action, "; rpm limited to 4 as Gemini reports (keys.json says 10)") {
		t.Fatalf("action %q", r.Action)
	}
	four := `project p1 model gemini-2.5-flash: Gemini reports rpm 4 (quota GenerateRequestsPerMinutePerProjectPerModel-FreeTier), ` +
		`keys.json says 10: set "rpm": 4 for its keys (k1, k2); keyd enforces 4 until then`
	if w := bucketOf(t, p.status("test"), "p1").Warnings; len(w) != 1 || w[0] != four {
		t.Fatalf("warnings %q, want %q", w, four)
	}
	if n := strings.Count(logs.String(), "level=WARN"); n != 2 {
		t.Fatalf("%d warn lines after a new value, want 2:\n%s", n, logs.String())
	}

	// A reload that leaves the bucket's rpm as it was keeps the warning.
	reload := func(keysJSON string) {
		t.Helper()
		if _, err := p.reload(func() (*config.Config, error) { return testConfig(t, keysJSON), nil }); err != nil {
			t.Fatal(err)
		}
	}
	reload(strings.Replace(freeTier, `"priority":-1`, `"priority":-2`, 1))
	if b := bucketOf(t, p.status("test"), "p1"); len(b.Warnings) != 1 || b.RPM.Limit != 4 {
		t.Fatalf("after a reload that kept rpm: %+v", b)
	}
	// One that changes rpm clears it, even to a value still too high:
	// keys.json's holds again, until Gemini's next 429 says otherwise.
	reload(strings.ReplaceAll(freeTier, `"rpm":10`, `"rpm":8`))
	if b := bucketOf(t, p.status("test"), "p1"); b.Warnings != nil || b.RPM.Limit != 8 {
		t.Fatalf("after a reload that set rpm 8: %+v", b)
	}
	clock = clock.Add(time.Hour)
	report429(t, p, quota429(t, "gemini-2.5-flash", freeRPM, "4"))
	eight := `project p1 model gemini-2.5-flash: Gemini reports rpm 4 (quota GenerateRequestsPerMinutePerProjectPerModel-FreeTier), ` +
		`keys.json says 8: set "rpm": 4 for its keys (k1, k2); keyd enforces 4 until then`
	if b := bucketOf(t, p.status("test"), "p1"); len(b.Warnings) != 1 || b.Warnings[0] != eight || b.RPM.Limit != 4 {
		t.Fatalf("after a 429 on rpm 8: %+v\nwant warning %q", b, eight)
	}
	// Setting Gemini's value clears it for good.
	reload(strings.ReplaceAll(freeTier, `"rpm":10`, `"rpm":4`))
	if b := bucketOf(t, p.status("test"), "p1"); b.Warnings != nil || b.RPM.Limit != 4 {
		t.Fatalf("after a reload that set rpm 4: %+v", b)
	}
	if !strings.Contains(logs.String(), `level=INFO msg="quota warning cleared: keys.json changed the limit" bucket=p1/gemini-2.5-flash limit=rpm keys_json=4 gemini_reported=4`) {
		t.Fatalf("the log does not say the warning cleared:\n%s", logs.String())
	}
	if strings.Contains(logs.String(), "AIza") {
		t.Fatalf("a secret in the log:\n%s", logs.String())
	}
}

// TestQuotaDimensions: rpd against none and tpm, several at once; values
// not lower, zero, or of another model teach nothing; a later higher value
// clears what an earlier one taught.
func TestQuotaDimensions(t *testing.T) {
	clock := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	var logs testutil.SyncBuffer
	p := learnPool(t, freeTier, &clock, &logs)
	next := func() { clock = clock.Add(25 * time.Hour) } // past any cooldown or day

	// The Dec 2025 free tier: rpd 20 (keys.json: none) and tpm 250000.
	r := report429(t, p, quota429(t, "gemini-2.5-flash", freeRPD, "20", freeRPM, "10", freeTPM, "250000"))
	if r.Classification != api.ClassRateDay ||
		!regexp.MustCompile(`^bucket p1/gemini-2.5-flash exhausted until \S+; tpm limited to 250000 as Gemini reports \(keys.json says 1000000\); rpd limited to 20 as Gemini reports \(keys.json says none\)$`).MatchString(r.Action) {
		t.Fatalf("report: %+v", r)
	}
	b := bucketOf(t, p.status("test"), "p1")
	want := []string{
		`project p1 model gemini-2.5-flash: Gemini reports tpm 250000 (quota GenerateContentInputTokensPerModelPerMinute-FreeTier), keys.json says 1000000: set "tpm": 250000 for its keys (k1, k2); keyd enforces 250000 until then`,
		`project p1 model gemini-2.5-flash: Gemini reports rpd 20 (quota GenerateRequestsPerDayPerProjectPerModel-FreeTier), keys.json says none: set "rpd": 20 for its keys (k1, k2); keyd enforces 20 until then`,
	}
	if strings.Join(b.Warnings, "\n") != strings.Join(want, "\n") || b.RPM.Limit != 10 || b.TPM.Limit != 250000 || b.RPD.Limit != 20 {
		t.Fatalf("bucket %+v\nwant warnings %q", b, want)
	}
	// A request above the learned tpm could never be sent on p1.
	p.mu.Lock()
	d := p.buckets[config.BucketID{Project: "p1", Model: "gemini-2.5-flash"}].Check(clock, 300000)
	p.mu.Unlock()
	if !d.Never || d.Reason != "300000 tokens exceed tpm 250000" {
		t.Fatalf("check of 300000 tokens: %+v", d)
	}

	// Neither a value as high as keys.json's, nor 0 (quota_zero's), nor
	// another model's quota is learned.
	p2 := learnPool(t, freeTier, &clock, &logs)
	for _, body := range []any{
		quota429(t, "gemini-2.5-flash", freeRPM, "10"),
		quota429(t, "gemini-2.5-flash", freeRPM, "500"),
		quota429(t, "gemini-2.5-pro", freeRPM, "5"),
		quota429(t, "gemini-2.5-flash", "GenerateContentInputTokensPerModelPerDay", "5"),
		quota429(t, "gemini-2.5-flash", freeRPM, "five"),
	} {
		next()
		if r := report429(t, p2, body); strings.Contains(r.Action, "limited") {
			t.Fatalf("action %q", r.Action)
		}
	}
	next()
	if r := report429(t, p2, quota429(t, "gemini-2.5-flash", freeRPM, "0", freeTPM, "0")); r.Classification != api.ClassQuotaZero || r.Action != "bucket p1/gemini-2.5-flash disabled" {
		t.Fatalf("quota 0: %+v", r)
	}
	if b := bucketOf(t, p2.status("test"), "p1"); b.Warnings != nil || b.RPM.Limit != 10 || b.TPM.Limit != 1000000 {
		t.Fatalf("bucket %+v: nothing should be learned", b)
	}
	if !strings.Contains(logs.String(), `level=DEBUG msg="429 names another model's quota; not compared with keys.json" bucket=p1/gemini-2.5-flash`) {
		t.Errorf("no debug line for another model's quota:\n%s", logs.String())
	}

	// The project moved up a tier: a later 429 reports a limit above
	// keys.json's, and keys.json's holds again.
	p3 := learnPool(t, freeTier, &clock, &logs)
	next()
	report429(t, p3, quota429(t, "gemini-2.5-flash", freeRPM, "5"))
	next()
	r = report429(t, p3, quota429(t, "gemini-2.5-flash", "GenerateRequestsPerMinutePerProjectPerModel", "1000"))
	if !strings.HasSuffix(r.Action, "; rpm back to keys.json's 10 (Gemini reports 1000)") {
		t.Fatalf("action %q", r.Action)
	}
	if b := bucketOf(t, p3.status("test"), "p1"); b.Warnings != nil || b.RPM.Limit != 10 {
		t.Fatalf("bucket %+v", b)
	}
	if strings.Contains(logs.String(), "AIza") {
		t.Fatalf("a secret in the log:\n%s", logs.String())
	}
}

// TestQuotaWarningOverTheSocket reports a free-tier 429 to a running keyd
// and reads the warning in GET /v1/status and in keyd's log.
func TestQuotaWarningOverTheSocket(t *testing.T) {
	d := startDaemon(t, `{"keys":[
		{"key_id":"k1","project":"p1","model_name":"gemini-2.5-flash","rpm":10,"tpm":1000000},
		{"key_id":"k2","project":"p1","model_name":"gemini-2.5-flash","rpm":10,"tpm":1000000}]}`)
	status, body := d.do(t, "POST", "/v1/leases", `{"model":"gemini-2.5-flash","tokens":10}`)
	if status != 200 {
		t.Fatalf("lease: %d %s", status, body)
	}
	var l api.Lease
	json.Unmarshal(body, &l)
	rep, _ := json.Marshal(api.ReportRequest{Status: 429, Error: quota429(t, "gemini-2.5-flash", freeRPM, "5")})
	status, body = d.do(t, "POST", "/v1/leases/"+l.LeaseID+"/report", string(rep))
	if status != 200 || !strings.Contains(string(body), `rpm limited to 5 as Gemini reports (keys.json says 10)`) {
		t.Fatalf("report: %d %s", status, body)
	}
	status, body = d.do(t, "GET", "/v1/status", "")
	if status != 200 {
		t.Fatalf("status: %d %s", status, body)
	}
	var st api.Status
	if err := json.Unmarshal(body, &st); err != nil {
		t.Fatal(err)
	}
	if b := st.Buckets[0]; len(b.Warnings) != 1 || b.Warnings[0] != rpmWarning || b.RPM.Limit != 5 {
		t.Fatalf("bucket %+v\nwant warning %q", b, rpmWarning)
	}
	if strings.Contains(string(body), exampleSecret) {
		t.Fatalf("status holds a secret: %s", body)
	}
	warnLine := `level=WARN msg="` + strings.ReplaceAll(rpmWarning, `"`, `\"`) + `" bucket=p1/gemini-2.5-flash`
	if n := strings.Count(d.log.String(), warnLine); n != 1 {
		t.Fatalf("%d lines %q in the log:\n%s", n, warnLine, d.log)
	}
}
