package daemon

import (
	"context"
	"encoding/json"
	"fmt"
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
	`keys.json says 10: set "rpm": 5 for its keys (k1, k2); keyd enforces 5 until then (keyctl reset k1 forgets it)`

// quota429 is Gemini's 429 for violations of (quotaId, quotaValue) pairs on
// model, as the report's error field carries it (decoded JSON). Model ""
// gives quotas without quotaDimensions.model: project-wide ones.
func quota429(t *testing.T, model string, idValues ...string) any {
	t.Helper()
	qf := gemini.QuotaFailure{}
	for i := 0; i < len(idValues); i += 2 {
		dims := map[string]string{"location": "global"}
		if model != "" {
			dims["model"] = model
		}
		qf.Violations = append(qf.Violations, gemini.QuotaViolation{
			QuotaMetric:     "generativelanguage.googleapis.com/generate_content_free_tier_requests",
			QuotaID:         idValues[i],
			QuotaDimensions: dims,
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
		`keys.json says 10: set "rpm": 4 for its keys (k1, k2); keyd enforces 4 until then (keyctl reset k1 forgets it)`
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
		`keys.json says 8: set "rpm": 4 for its keys (k1, k2); keyd enforces 4 until then (keyctl reset k1 forgets it)`
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
		`project p1 model gemini-2.5-flash: Gemini reports tpm 250000 (quota GenerateContentInputTokensPerModelPerMinute-FreeTier), keys.json says 1000000: set "tpm": 250000 for its keys (k1, k2); keyd enforces 250000 until then (keyctl reset k1 forgets it)`,
		`project p1 model gemini-2.5-flash: Gemini reports rpd 20 (quota GenerateRequestsPerDayPerProjectPerModel-FreeTier), keys.json says none: set "rpd": 20 for its keys (k1, k2); keyd enforces 20 until then (keyctl reset k1 forgets it)`,
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

	// A later 429 reports the same quota at a value no lower than
	// keys.json's: keys.json's holds again. (Another quota's value, such as
	// the paid tier's, does not speak for it: see TestLearnedLimitsPerQuota.)
	p3 := learnPool(t, freeTier, &clock, &logs)
	next()
	report429(t, p3, quota429(t, "gemini-2.5-flash", freeRPM, "5"))
	next()
	r = report429(t, p3, quota429(t, "gemini-2.5-flash", freeRPM, "1000"))
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

// checkRPM fails the test unless bucket p1 of p enforces rpm and has
// exactly the warnings want.
func checkRPM(t *testing.T, p *pool, step string, rpm int64, want ...string) {
	t.Helper()
	b := bucketOf(t, p.status("test"), "p1")
	if b.RPM.Limit != rpm {
		t.Fatalf("%s: bucket p1 enforces rpm %d, want %d (warnings %q)", step, b.RPM.Limit, rpm, b.Warnings)
	}
	if strings.Join(b.Warnings, "\n") != strings.Join(want, "\n") {
		t.Fatalf("%s: warnings\n%q\nwant\n%q", step, b.Warnings, want)
	}
}

// TestLearnedLimitsPerQuota: limits are learned per quota; the lowest of
// a dimension binds and is the one the warning names. A report of one
// quota never clears or raises the limit another quota taught.
func TestLearnedLimitsPerQuota(t *testing.T) {
	clock := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	var logs testutil.SyncBuffer
	p := learnPool(t, freeTier, &clock, &logs)
	next := func() { clock = clock.Add(25 * time.Hour) } // past any cooldown or day
	const (
		perProject = "GenerateRequestsPerMinutePerProject" // no quotaDimensions.model
		paid       = "GenerateRequestsPerMinutePerProjectPerModel"
	)
	projectWarning := func(v int) string {
		return fmt.Sprintf(`project p1 model gemini-2.5-flash: Gemini reports rpm %d (quota GenerateRequestsPerMinutePerProject), `+
			`keys.json says 10: set "rpm": %d for its keys (k1, k2); keyd enforces %d until then (keyctl reset k1 forgets it)`, v, v, v)
	}
	noRPMAction := func(step string, r *api.ReportResponse) {
		t.Helper()
		if strings.Contains(r.Action, "rpm") {
			t.Fatalf("%s: action %q changes rpm", step, r.Action)
		}
	}

	report429(t, p, quota429(t, "gemini-2.5-flash", freeRPM, "5"))
	checkRPM(t, p, "free-tier quota 5", 5, rpmWarning)

	// Other quotas of the same dimension at or above keys.json's, with a
	// model or project-wide, say nothing about freeRPM's.
	for _, body := range []any{quota429(t, "", perProject, "100"), quota429(t, "gemini-2.5-flash", paid, "1000")} {
		next()
		noRPMAction("another quota above keys.json's", report429(t, p, body))
		checkRPM(t, p, "another quota above keys.json's", 5, rpmWarning)
	}
	// One below keys.json's but above 5 is kept, and does not bind.
	next()
	noRPMAction("project-wide 8", report429(t, p, quota429(t, "", perProject, "8")))
	checkRPM(t, p, "project-wide 8", 5, rpmWarning)
	// Below 5 it binds, and the warning names it.
	next()
	if r := report429(t, p, quota429(t, "", perProject, "3")); !strings.HasSuffix(r.Action, "; rpm limited to 3 as Gemini reports (keys.json says 10)") {
		t.Fatalf("project-wide 3: action %q", r.Action)
	}
	checkRPM(t, p, "project-wide 3", 3, projectWarning(3))
	// Its own quota at 8 again: freeRPM's 5 binds again.
	next()
	if r := report429(t, p, quota429(t, "", perProject, "8")); !strings.HasSuffix(r.Action, "; rpm limited to 5 as Gemini reports (keys.json says 10)") {
		t.Fatalf("project-wide 8 again: action %q", r.Action)
	}
	checkRPM(t, p, "project-wide 8 again", 5, rpmWarning)
	// freeRPM no lower than keys.json's clears only freeRPM's: 8 binds.
	next()
	if r := report429(t, p, quota429(t, "gemini-2.5-flash", freeRPM, "10")); !strings.HasSuffix(r.Action, "; rpm limited to 8 as Gemini reports (keys.json says 10)") {
		t.Fatalf("free-tier quota 10: action %q", r.Action)
	}
	checkRPM(t, p, "free-tier quota 10", 8, projectWarning(8))
	// And the project-wide quota no lower than keys.json's clears the last.
	next()
	if r := report429(t, p, quota429(t, "", perProject, "100")); !strings.HasSuffix(r.Action, "; rpm back to keys.json's 10 (Gemini reports 100)") {
		t.Fatalf("project-wide 100: action %q", r.Action)
	}
	checkRPM(t, p, "project-wide 100", 10)
	p.mu.Lock()
	n := len(p.learned)
	p.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d buckets with learned limits after the last one cleared", n)
	}

	// The log warns once per binding limit: 5, 3, 5 again, 8.
	warns := regexp.MustCompile(`level=WARN msg="project p1 model gemini-2.5-flash: Gemini reports rpm (\d+) `).FindAllStringSubmatch(logs.String(), -1)
	var got []string
	for _, m := range warns {
		got = append(got, m[1])
	}
	if strings.Join(got, " ") != "5 3 5 8" {
		t.Fatalf("warn lines for rpm %q, want 5 3 5 8:\n%s", got, logs.String())
	}
	if !strings.Contains(logs.String(), `level=INFO msg="quota warning cleared: Gemini reports a limit no lower than keys.json's" bucket=p1/gemini-2.5-flash limit=rpm keys_json=10 gemini_reported=100 quota=GenerateRequestsPerMinutePerProject`) {
		t.Fatalf("the log does not say the warning cleared:\n%s", logs.String())
	}
}

// TestResetForgetsLearnedLimits: keyctl reset of a key forgets the
// learned limits of that key's buckets, and only those: the way out after
// a tier upgrade, which no 429 announces.
func TestResetForgetsLearnedLimits(t *testing.T) {
	clock := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	var logs testutil.SyncBuffer
	p := learnPool(t, freeTier, &clock, &logs)
	report429(t, p, quota429(t, "gemini-2.5-flash", freeRPD, "20", freeRPM, "5"))
	b := bucketOf(t, p.status("test"), "p1")
	if len(b.Warnings) != 2 || b.RPM.Limit != 5 || b.RPD.Limit != 20 {
		t.Fatalf("after the 429: %+v", b)
	}

	// Another project's key: p1 keeps them.
	if _, err := p.keyAction(context.Background(), "k3", "reset", "test"); err != nil {
		t.Fatal(err)
	}
	if b := bucketOf(t, p.status("test"), "p1"); len(b.Warnings) != 2 || b.RPM.Limit != 5 || b.RPD.Limit != 20 {
		t.Fatalf("after resetting p2's key: %+v", b)
	}
	// A key of p1's bucket: keys.json's limits again, the window kept.
	if _, err := p.keyAction(context.Background(), "k2", "reset", "test"); err != nil {
		t.Fatal(err)
	}
	b = bucketOf(t, p.status("test"), "p1")
	if b.Warnings != nil || b.State != api.StateReady || b.RPM.Limit != 10 || b.RPD.Limit != 0 || b.RPM.Used != 1 {
		t.Fatalf("after resetting k2: %+v", b)
	}
	for _, line := range []string{
		`level=INFO msg="quota warning cleared: a key of the bucket was reset" bucket=p1/gemini-2.5-flash limit=rpm keys_json=10 gemini_reported=5 quota=` + freeRPM + ` key=k2 by=test`,
		`level=INFO msg="quota warning cleared: a key of the bucket was reset" bucket=p1/gemini-2.5-flash limit=rpd keys_json=0 gemini_reported=20 quota=` + freeRPD + ` key=k2 by=test`,
	} {
		if !strings.Contains(logs.String(), line) {
			t.Errorf("no line %s in the log:\n%s", line, logs.String())
		}
	}
	// A 429 teaches them again.
	clock = clock.Add(25 * time.Hour)
	report429(t, p, quota429(t, "gemini-2.5-flash", freeRPM, "5"))
	checkRPM(t, p, "the next 429", 5, rpmWarning)
}

// TestQuotaWarningBurstCapacity: when burst_capacity is above the rpm
// Gemini reports, the fix the warning gives lowers it too, else keys.json
// would reject the rpm; following the fix clears the warning.
func TestQuotaWarningBurstCapacity(t *testing.T) {
	const oneKey = `{"keys":[{"key_id":"k1","project":"p1","model_name":"gemini-2.5-flash","rpm":10,"tpm":1000000,"burst_capacity":BURST}]}`
	for _, tc := range []struct {
		burst string
		set   string
	}{
		{"10", `set "rpm": 5 and "burst_capacity": 5 or less for its keys (k1)`},
		{"6", `set "rpm": 5 and "burst_capacity": 5 or less for its keys (k1)`},
		{"5", `set "rpm": 5 for its keys (k1)`},
		{"0", `set "rpm": 5 for its keys (k1)`},
	} {
		clock := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
		var logs testutil.SyncBuffer
		keysJSON := strings.Replace(oneKey, "BURST", tc.burst, 1)
		p := learnPool(t, keysJSON, &clock, &logs)
		report429(t, p, quota429(t, "gemini-2.5-flash", freeRPM, "5"))
		want := `project p1 model gemini-2.5-flash: Gemini reports rpm 5 (quota GenerateRequestsPerMinutePerProjectPerModel-FreeTier), keys.json says 10: ` +
			tc.set + `; keyd enforces 5 until then (keyctl reset k1 forgets it)`
		checkRPM(t, p, "burst_capacity "+tc.burst, 5, want)
		if !strings.Contains(logs.String(), `level=WARN msg="`+strings.ReplaceAll(want, `"`, `\"`)+`"`) {
			t.Fatalf("burst_capacity %s: no warn line %q:\n%s", tc.burst, want, logs.String())
		}
		// Doing what it says is a valid keys.json, which clears it.
		fixed := strings.Replace(keysJSON, `"rpm":10`, `"rpm":5`, 1)
		if strings.Contains(tc.set, "burst_capacity") {
			fixed = strings.Replace(fixed, `"burst_capacity":`+tc.burst, `"burst_capacity":5`, 1)
		}
		if _, err := p.reload(func() (*config.Config, error) { return testConfig(t, fixed), nil }); err != nil {
			t.Fatalf("burst_capacity %s: reload of the fix: %v", tc.burst, err)
		}
		checkRPM(t, p, "burst_capacity "+tc.burst+" after the fix", 5)
	}
}

// TestLearnedLimitsOfARemovedBucket: a bucket removed from keys.json
// loses its learned limits, so that one added back starts from keys.json.
func TestLearnedLimitsOfARemovedBucket(t *testing.T) {
	clock := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	var logs testutil.SyncBuffer
	p := learnPool(t, freeTier, &clock, &logs)
	report429(t, p, quota429(t, "gemini-2.5-flash", freeRPM, "5"))
	checkRPM(t, p, "after the 429", 5, rpmWarning)
	reload := func(keysJSON string) {
		t.Helper()
		if _, err := p.reload(func() (*config.Config, error) { return testConfig(t, keysJSON), nil }); err != nil {
			t.Fatal(err)
		}
	}
	onlyP2 := `{"keys":[{"key_id":"k3","project":"p2","model_name":"gemini-2.5-flash","rpm":10,"tpm":1000000,"priority":-1}]}`
	reload(onlyP2)
	p.mu.Lock()
	_, kept := p.learned[config.BucketID{Project: "p1", Model: "gemini-2.5-flash"}]
	p.mu.Unlock()
	if kept {
		t.Fatal("the learned limits of p1, gone from keys.json, are kept")
	}
	if !strings.Contains(logs.String(), `level=INFO msg="quota warning cleared: the bucket is no longer in keys.json" bucket=p1/gemini-2.5-flash limit=rpm keys_json=10 gemini_reported=5 quota=`+freeRPM) {
		t.Fatalf("the log does not say the warning cleared:\n%s", logs.String())
	}
	reload(freeTier)
	checkRPM(t, p, "p1 added back", 10)
}

// restarts returns a function that starts a pool on keysJSON with a real
// store in one directory, as keyd starts (apply, Load, restore, commit),
// closing the previous one; the test's end closes the last.
func restarts(t *testing.T, clock *time.Time) func(keysJSON string) (*pool, *testutil.SyncBuffer) {
	dir := t.TempDir()
	var st *store.DB
	t.Cleanup(func() {
		if st != nil {
			st.Close()
		}
	})
	return func(keysJSON string) (*pool, *testutil.SyncBuffer) {
		t.Helper()
		if st != nil {
			if err := st.Close(); err != nil {
				t.Fatal(err)
			}
		}
		var err error
		if st, err = store.Open(dir, store.Options{}); err != nil {
			t.Fatal(err)
		}
		logs := &testutil.SyncBuffer{}
		p := newPool(st, func() time.Time { return *clock }, slog.New(slog.NewTextHandler(logs, nil)))
		cfg := testConfig(t, keysJSON)
		s, err := st.Load(clock.Add(-(cfg.LeaseTTL + leaseGrace)), restoreDays(cfg, *clock))
		if err != nil {
			t.Fatal(err)
		}
		batch := &store.Batch{}
		p.mu.Lock()
		p.apply(cfg, *clock, batch)
		p.restore(s, *clock, batch)
		p.mu.Unlock()
		if err := st.Commit(context.Background(), batch); err != nil {
			t.Fatal(err)
		}
		return p, logs
	}
}

// TestLearnedLimitsSurviveARestart: learned limits are in the store, with
// the bucket's record, so a restart keeps enforcing and warning about
// them (logged again at start); a restart under another keys.json value
// forgets them for good, as a reload does; and so does keyctl reset.
func TestLearnedLimitsSurviveARestart(t *testing.T) {
	clock := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	start := restarts(t, &clock)
	warnLine := `level=WARN msg="` + strings.ReplaceAll(rpmWarning, `"`, `\"`) + `" bucket=p1/gemini-2.5-flash`

	p, _ := start(freeTier)
	report429(t, p, quota429(t, "gemini-2.5-flash", freeRPM, "5"))
	checkRPM(t, p, "learned", 5, rpmWarning)

	clock = clock.Add(2 * time.Minute) // past the cooldown
	p, logs := start(freeTier)
	checkRPM(t, p, "after a restart", 5, rpmWarning)
	if !strings.Contains(logs.String(), warnLine) {
		t.Fatalf("the restart did not log the warning:\n%s", logs)
	}

	// keys.json's rpm changed while keyd was stopped: forgotten, and not
	// back when keys.json says 10 again.
	p, logs = start(strings.ReplaceAll(freeTier, `"rpm":10`, `"rpm":8`))
	checkRPM(t, p, "keys.json changed", 8)
	if !strings.Contains(logs.String(), `msg="learned limits forgotten at start: keys.json changed them" bucket=p1/gemini-2.5-flash kept=0 forgotten=1`) {
		t.Fatalf("no log line for the forgotten limit:\n%s", logs)
	}
	p, _ = start(freeTier)
	checkRPM(t, p, "keys.json back to 10", 10)

	// keyctl reset forgets for good too.
	report429(t, p, quota429(t, "gemini-2.5-flash", freeRPM, "5"))
	checkRPM(t, p, "learned again", 5, rpmWarning)
	if _, err := p.keyAction(context.Background(), "k1", "reset", "test"); err != nil {
		t.Fatal(err)
	}
	checkRPM(t, p, "reset", 10)
	p, _ = start(freeTier)
	checkRPM(t, p, "reset, then a restart", 10)
}

// TestReloadsForgetLearnedLimitsDurably: what a reload forgets stays
// forgotten after a restart: keys.json's limit changed and changed back,
// or the bucket removed and added back.
func TestReloadsForgetLearnedLimitsDurably(t *testing.T) {
	clock := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	start := restarts(t, &clock)
	reload := func(p *pool, keysJSON string) {
		t.Helper()
		if _, err := p.reload(func() (*config.Config, error) { return testConfig(t, keysJSON), nil }); err != nil {
			t.Fatal(err)
		}
	}
	without := `{"keys":[{"key_id":"k3","project":"p2","model_name":"gemini-2.5-flash","rpm":10,"tpm":1000000}]}`
	for _, c := range []struct{ name, between string }{
		{"limit changed and back", strings.ReplaceAll(freeTier, `"rpm":10`, `"rpm":8`)},
		{"bucket removed and back", without},
	} {
		p, _ := start(freeTier)
		report429(t, p, quota429(t, "gemini-2.5-flash", freeRPM, "5"))
		checkRPM(t, p, c.name+": learned", 5, rpmWarning)
		reload(p, c.between)
		reload(p, freeTier)
		checkRPM(t, p, c.name+": reloaded back", 10)
		clock = clock.Add(2 * time.Minute) // past the cooldown
		p, _ = start(freeTier)
		checkRPM(t, p, c.name+": restarted", 10)
	}
}
