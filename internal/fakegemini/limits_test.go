package fakegemini

import (
	"fmt"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/gemini"
)

// quota is the QuotaFailure and RetryInfo of a 429 body.
type quota struct {
	ids, values, metrics []string
	dims                 []map[string]any
	retryInfo            string
	message              string
}

func readQuota(t *testing.T, r response) quota {
	t.Helper()
	if r.status != 429 {
		t.Fatalf("status %d, want 429: %s", r.status, r.body)
	}
	e := decode(t, r.body)["error"].(map[string]any)
	q := quota{message: e["message"].(string)}
	for _, d := range e["details"].([]any) {
		d := d.(map[string]any)
		switch d["@type"] {
		case gemini.TypeQuotaFailure:
			for _, v := range d["violations"].([]any) {
				v := v.(map[string]any)
				q.ids = append(q.ids, v["quotaId"].(string))
				q.values = append(q.values, v["quotaValue"].(string))
				q.metrics = append(q.metrics, v["quotaMetric"].(string))
				q.dims = append(q.dims, v["quotaDimensions"].(map[string]any))
			}
		case gemini.TypeRetryInfo:
			q.retryInfo = d["retryDelay"].(string)
		}
	}
	return q
}

func TestRPMSlidingWindow(t *testing.T) {
	f := newFake(t, basicConfig()) // flash: 5 RPM
	// k1 and k2 share p1's bucket: 5 requests at t0, 10s, ..., 40s.
	for i := range 5 {
		f.setNow(t0.Add(time.Duration(i) * 10 * time.Second))
		if r := f.gen(t, []string{"k1", "k2"}[i%2], flash, "x"); r.status != 200 {
			t.Fatalf("request %d: %d", i, r.status)
		}
	}
	f.setNow(t0.Add(45 * time.Second))
	r := f.gen(t, "k2", flash, "x")
	q := readQuota(t, r)
	if !reflect.DeepEqual(q.ids, []string{"GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}) || q.values[0] != "5" ||
		q.metrics[0] != "generativelanguage.googleapis.com/generate_content_free_tier_requests" ||
		!reflect.DeepEqual(q.dims[0], map[string]any{"location": "global", "model": flash}) || q.retryInfo != "15s" {
		t.Errorf("429 = %+v", q)
	}
	v := gemini.ClassifyBytes(r.status, r.body)
	if v.Class != api.ClassRateMinute || v.RetryDelay != 15*time.Second {
		t.Errorf("verdict %+v", v)
	}
	// Another project, another model: other buckets.
	if r := f.gen(t, "k3", flash, "x"); r.status != 200 {
		t.Errorf("k3 (p2): %d", r.status)
	}
	if r := f.gen(t, "k1", pro, "x"); r.status != 200 {
		t.Errorf("k1 pro: %d", r.status)
	}
	// The window is (now-60s, now]: at t0+60s the t0 request has left.
	f.setNow(t0.Add(60*time.Second - time.Nanosecond))
	if r := f.gen(t, "k1", flash, "x"); r.status != 429 {
		t.Errorf("at t0+60s-1ns: %d", r.status)
	}
	f.setNow(t0.Add(60 * time.Second))
	if r := f.gen(t, "k1", flash, "x"); r.status != 200 {
		t.Errorf("at t0+60s: %d %s", r.status, r.body)
	}
	if r := f.gen(t, "k1", flash, "x"); r.status != 429 {
		t.Errorf("6th in the window ending t0+60s: %d", r.status)
	}
	if got := f.CountsByKey(); !reflect.DeepEqual(got, map[string]int{"k1": 5, "k2": 2, "k3": 1}) {
		t.Errorf("CountsByKey = %v", got)
	}
	if v := f.Violations(); v != nil {
		t.Errorf("Violations = %q", v)
	}
}

func TestNewerFormat(t *testing.T) {
	cfg := basicConfig()
	cfg.QuotaFormat = QuotaNewer
	f := newFake(t, cfg)
	for range 5 {
		f.gen(t, "k1", flash, "x")
	}
	f.setNow(t0.Add(47345 * time.Millisecond))
	r := f.gen(t, "k1", flash, "x")
	q := readQuota(t, r)
	wantMsg := "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits. To monitor your current usage, head to: https://ai.dev/rate-limit. " +
		"\n* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 5, model: gemini-2.5-flash" +
		"\nPlease retry in 12.655s."
	if q.message != wantMsg || q.retryInfo != "12s" {
		t.Errorf("message %q\nwant    %q\nretryInfo %q", q.message, wantMsg, q.retryInfo)
	}
	e := decode(t, r.body)["error"].(map[string]any)
	var types []string
	for _, d := range e["details"].([]any) {
		types = append(types, d.(map[string]any)["@type"].(string))
	}
	if !reflect.DeepEqual(types, []string{gemini.TypeHelp, gemini.TypeQuotaFailure, gemini.TypeRetryInfo}) {
		t.Errorf("detail order %q", types)
	}
	if v := gemini.ClassifyBytes(r.status, r.body); v.Class != api.ClassRateMinute || v.RetryDelay != 12*time.Second {
		t.Errorf("verdict %+v", v)
	}
	// The message alone (a client that drops details) still classifies,
	// with the exact delay.
	if v := gemini.Classify(429, map[string]any{"message": q.message}); v.Class != api.ClassRateMinute || v.RetryDelay != 12655*time.Millisecond {
		t.Errorf("message-only verdict %+v", v)
	}
}

func TestTPM(t *testing.T) {
	f := newFake(t, basicConfig()) // flash: 1000 TPM, 5 RPM
	for i, at := range []time.Duration{0, 20 * time.Second} {
		f.setNow(t0.Add(at))
		if r := f.gen(t, "k1", flash, tokensText(400)); r.status != 200 {
			t.Fatalf("request %d: %d", i, r.status)
		}
	}
	f.setNow(t0.Add(30 * time.Second))
	r := f.gen(t, "k2", flash, tokensText(201)) // 400+400+201 > 1000
	q := readQuota(t, r)
	if !reflect.DeepEqual(q.ids, []string{"GenerateContentInputTokensPerModelPerMinute-FreeTier"}) || q.values[0] != "1000" ||
		q.metrics[0] != "generativelanguage.googleapis.com/generate_content_free_tier_input_token_count" || q.retryInfo != "30s" {
		t.Errorf("429 = %+v", q)
	}
	if r := f.gen(t, "k2", flash, tokensText(200)); r.status != 200 { // exactly 1000
		t.Errorf("200 tokens: %d %s", r.status, r.body)
	}
	// Only output tokens are free: TPM counts input only.
	if recs := f.Requests(); recs[3].PromptTokens != 200 || recs[3].OutputTokens != DefaultOutputTokens {
		t.Errorf("record %+v", recs[3])
	}
	// A prompt larger than TPM never fits: 429 with 60 s, even when empty.
	f.setNow(t0.Add(10 * time.Minute))
	q = readQuota(t, f.gen(t, "k1", flash, tokensText(1001)))
	if q.retryInfo != "60s" || q.ids[0] != "GenerateContentInputTokensPerModelPerMinute-FreeTier" {
		t.Errorf("oversized prompt: %+v", q)
	}
	if r := f.gen(t, "k1", flash, tokensText(1000)); r.status != 200 {
		t.Errorf("1000 tokens in an empty window: %d", r.status)
	}
	if v := f.Violations(); v != nil {
		t.Errorf("Violations = %q", v)
	}
}

func TestSeveralViolations(t *testing.T) {
	cfg := basicConfig()
	cfg.Models[0].Limits = Limits{RPM: 2, TPM: 100, RPD: 2}
	f := newFake(t, cfg)
	f.gen(t, "k1", flash, "x")
	f.gen(t, "k1", flash, "x")
	r := f.gen(t, "k1", flash, tokensText(100))
	q := readQuota(t, r)
	want := []string{"GenerateRequestsPerDayPerProjectPerModel-FreeTier", "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
		"GenerateContentInputTokensPerModelPerMinute-FreeTier"}
	if !reflect.DeepEqual(q.ids, want) || !reflect.DeepEqual(q.values, []string{"2", "2", "100"}) {
		t.Errorf("429 = %+v", q)
	}
	// The day wins, as in python-genai#2044's body.
	if v := gemini.ClassifyBytes(r.status, r.body); v.Class != api.ClassRateDay || !reflect.DeepEqual(v.QuotaIDs, want) {
		t.Errorf("verdict %+v", v)
	}
	if rec := f.Requests()[2]; !reflect.DeepEqual(rec.Quota, []QuotaKind{QuotaRPD, QuotaRPM, QuotaTPM}) || rec.Admitted {
		t.Errorf("record %+v", rec)
	}
}

// TestRPDResetsAtPacificMidnight runs a day's quota out and checks that it
// comes back at the next midnight America/Los_Angeles, not before, on an
// ordinary day and on both DST days of 2026.
func TestRPDResetsAtPacificMidnight(t *testing.T) {
	for _, c := range []struct {
		name       string
		start      time.Time
		nextMidUTC time.Time // the next midnight in Los Angeles
	}{
		{"ordinary PST day", time.Date(2026, 3, 4, 1, 0, 0, 0, Pacific), time.Date(2026, 3, 5, 8, 0, 0, 0, time.UTC)},
		{"spring forward (23 h)", time.Date(2026, 3, 8, 1, 0, 0, 0, Pacific), time.Date(2026, 3, 9, 7, 0, 0, 0, time.UTC)},
		{"fall back (25 h)", time.Date(2026, 11, 1, 1, 0, 0, 0, Pacific), time.Date(2026, 11, 2, 8, 0, 0, 0, time.UTC)},
		{"summer PDT day", time.Date(2026, 7, 1, 23, 59, 0, 0, Pacific), time.Date(2026, 7, 2, 7, 0, 0, 0, time.UTC)},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := basicConfig()
			cfg.Models[0].Limits = Limits{RPD: 3}
			f := newFake(t, cfg)
			f.setNow(c.start)
			for range 3 {
				if r := f.gen(t, "k1", flash, "x"); r.status != 200 {
					t.Fatalf("%d %s", r.status, r.body)
				}
			}
			for _, at := range []time.Time{c.start.Add(time.Second), c.nextMidUTC.Add(-time.Nanosecond)} {
				f.setNow(at)
				r := f.gen(t, "k2", flash, "x")
				q := readQuota(t, r)
				if q.ids[0] != "GenerateRequestsPerDayPerProjectPerModel-FreeTier" || q.values[0] != "3" {
					t.Errorf("at %v: %+v", at, q)
				}
				// RetryInfo is not the time to the reset: 20 to 60 s.
				v := gemini.ClassifyBytes(r.status, r.body)
				if v.Class != api.ClassRateDay || v.RetryDelay < 20*time.Second || v.RetryDelay >= 60*time.Second {
					t.Errorf("at %v: verdict %+v", at, v)
				}
			}
			f.setNow(c.nextMidUTC)
			if r := f.gen(t, "k2", flash, "x"); r.status != 200 {
				t.Errorf("at the next Pacific midnight %v: %d", c.nextMidUTC, r.status)
			}
			if v := f.Violations(); v != nil {
				t.Errorf("Violations = %q", v)
			}
		})
	}
}

func TestUnavailableModel(t *testing.T) {
	for _, format := range []QuotaFormat{QuotaClassic, QuotaNewer} {
		cfg := basicConfig()
		cfg.QuotaFormat = format
		cfg.Projects = []Project{{Name: "p2", Tier: Free, Models: map[string]Limits{pro: {Unavailable: true}}}}
		f := newFake(t, cfg)
		if r := f.gen(t, "k1", pro, "x"); r.status != 200 { // p1 (paid): available
			t.Fatalf("p1: %d", r.status)
		}
		r := f.gen(t, "k3", pro, "x")
		q := readQuota(t, r)
		if !reflect.DeepEqual(q.values, []string{"0", "0", "0"}) || q.ids[0] != "GenerateRequestsPerDayPerProjectPerModel-FreeTier" {
			t.Errorf("%s: %+v", format, q)
		}
		if format == QuotaNewer && !strings.Contains(q.message, "limit: 0, model: gemini-2.5-pro") {
			t.Errorf("newer message %q", q.message)
		}
		if v := gemini.ClassifyBytes(r.status, r.body); v.Class != api.ClassQuotaZero || !v.ZeroQuota {
			t.Errorf("%s: verdict %+v", format, v)
		}
		if rec := f.Requests()[1]; !reflect.DeepEqual(rec.Quota, []QuotaKind{QuotaZero}) {
			t.Errorf("record %+v", rec)
		}
		if st := f.Stats(); st.Refused["zero"] != 1 {
			t.Errorf("stats %+v", st)
		}
	}
}

func TestPaidTierAndProjectOverride(t *testing.T) {
	cfg := basicConfig()
	cfg.Projects = []Project{{Name: "p2", Tier: Paid, Models: map[string]Limits{flash: {RPM: 1, RPD: 1}}}}
	f := newFake(t, cfg)
	f.gen(t, "k3", flash, "x")
	q := readQuota(t, f.gen(t, "k3", flash, "x"))
	if !reflect.DeepEqual(q.ids, []string{"GenerateRequestsPerDayPerProjectPerModel", "GenerateRequestsPerMinutePerProjectPerModel"}) ||
		!reflect.DeepEqual(q.metrics, []string{"generativelanguage.googleapis.com/generate_requests_per_model_per_day",
			"generativelanguage.googleapis.com/generate_requests_per_model"}) {
		t.Errorf("paid 429 %+v", q)
	}
	// p1 keeps the model's defaults (5 RPM, free).
	for i := range 5 {
		if r := f.gen(t, "k1", flash, "x"); r.status != 200 {
			t.Fatalf("p1 request %d: %d", i, r.status)
		}
	}
}

func TestKeyWithoutProject(t *testing.T) {
	cfg := basicConfig()
	cfg.Keys = append(cfg.Keys, Key{Key: "solo1"}, Key{Key: "solo2"})
	cfg.Models[0].Limits = Limits{RPM: 1}
	f := newFake(t, cfg)
	for _, k := range []string{"solo1", "solo2"} {
		if r := f.gen(t, k, flash, "x"); r.status != 200 {
			t.Errorf("%s: %d", k, r.status)
		}
	}
	if r := f.gen(t, "solo1", flash, "x"); r.status != 429 {
		t.Errorf("solo1 again: %d", r.status)
	}
	if rec := f.Requests()[0]; rec.Project != "solo1" {
		t.Errorf("project %q", rec.Project)
	}
}

// TestConcurrentAdmission: many clients at the same instant; exactly RPM
// get through.
func TestConcurrentAdmission(t *testing.T) {
	cfg := basicConfig()
	cfg.Models[0].Limits = Limits{RPM: 10, TPM: 1000000, RPD: 1000}
	f := newFake(t, cfg)
	var wg sync.WaitGroup
	codes := make([]int, 64)
	for i := range codes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			key := []string{"k1", "k2"}[i%2]
			req, _ := http.NewRequest(http.MethodPost, f.hs.URL+"/v1beta/models/"+flash+":streamGenerateContent?alt=sse&key="+key,
				strings.NewReader(`{"contents":[{"parts":[{"text":"hi"}]}]}`))
			resp, err := f.hs.Client().Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			resp.Body.Close()
			codes[i] = resp.StatusCode
		}()
	}
	wg.Wait()
	n := map[int]int{}
	for _, c := range codes {
		n[c]++
	}
	if n[200] != 10 || n[429] != 54 {
		t.Errorf("statuses %v", n)
	}
	c := f.CountsByKey()
	if c["k1"]+c["k2"] != 10 {
		t.Errorf("CountsByKey %v", c)
	}
	if v := f.Violations(); v != nil {
		t.Errorf("Violations = %q", v)
	}
}

// TestViolationsFromRecord checks the independent check on made-up
// records, including what the fake itself would never admit.
func TestViolationsFromRecord(t *testing.T) {
	cfg := basicConfig() // flash: 5 RPM, 1000 TPM, 20 RPD (free); pro: none
	cfg.Models = append(cfg.Models, Model{Name: "gone", Limits: Limits{Unavailable: true}})
	s := New(cfg)
	rec := func(at time.Time, project, model string, tokens int) Record {
		return Record{Time: at, Project: project, Model: model, Admitted: true, PromptTokens: tokens, Status: 200}
	}
	spaced := func(n int, step time.Duration, start time.Time, project, model string, tokens int) []Record {
		var out []Record
		for i := range n {
			out = append(out, rec(start.Add(time.Duration(i)*step), project, model, tokens))
		}
		return out
	}
	for _, c := range []struct {
		name string
		recs []Record
		want []string // substrings, one per finding
	}{
		{"5 in a minute", spaced(5, 14*time.Second, t0, "p1", flash, 1), nil},
		{"6 spaced by 12s (the 6th at t0+60s: the first has left)", spaced(6, 12*time.Second, t0, "p1", flash, 1), nil},
		{"6 spaced by 11.9s", spaced(6, 11900*time.Millisecond, t0, "p1", flash, 1),
			[]string{"project p1, model gemini-2.5-flash: 6 requests in the 60s window ending 2026-03-04T18:00:59.5Z, over rpm 5"}},
		{"6 at once, unsorted, in two projects", append(spaced(3, 0, t0, "p1", flash, 1), append(spaced(3, 0, t0, "p2", flash, 1), spaced(3, 0, t0.Add(-time.Second), "p1", flash, 1)...)...),
			[]string{"project p1, model gemini-2.5-flash: 6 requests in the 60s window ending 2026-03-04T18:00:00Z, over rpm 5"}},
		{"not admitted records do not count", func() []Record {
			r := spaced(8, 0, t0, "p1", flash, 1)
			for i := 5; i < 8; i++ {
				r[i].Admitted = false
			}
			return r
		}(), nil},
		{"tokens", append(spaced(2, 30*time.Second, t0, "p1", flash, 500), rec(t0.Add(59*time.Second), "p1", flash, 1)),
			[]string{"1001 input tokens in the 60s window ending 2026-03-04T18:00:59Z, over tpm 1000"}},
		{"21 a day, spread over the PST day", spaced(21, time.Hour+time.Minute, time.Date(2026, 3, 4, 0, 0, 0, 0, Pacific), "p1", flash, 1),
			[]string{"project p1, model gemini-2.5-flash: 21 requests on 2026-03-04 (America/Los_Angeles), over rpd 20"}},
		{"21 over a 25 h DST day (the last at 23:40 PST, 24h40m after midnight)", spaced(21, 74*time.Minute, time.Date(2026, 11, 1, 0, 0, 0, 0, Pacific), "p1", flash, 1),
			[]string{"21 requests on 2026-11-01"}},
		{"20 + 20 across the spring-forward midnight", append(spaced(20, time.Minute, time.Date(2026, 3, 8, 23, 0, 0, 0, Pacific), "p1", flash, 1),
			spaced(20, time.Minute, time.Date(2026, 3, 9, 0, 0, 0, 0, Pacific), "p1", flash, 1)...), nil},
		{"no limits on pro", spaced(100, 0, t0, "p1", pro, 1000), nil},
		{"unavailable", spaced(1, 0, t0, "p1", "gone", 1), []string{"project p1, model gone: 1 requests admitted, but the model is unavailable (limit 0)"}},
		{"unknown model", spaced(1, 0, t0, "p1", "nope", 1), []string{"for a model the fake does not serve"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := s.violations(c.recs)
			if len(got) != len(c.want) {
				t.Fatalf("violations = %q, want %d", got, len(c.want))
			}
			for i, w := range c.want {
				if !strings.Contains(got[i], w) {
					t.Errorf("violation %q does not contain %q", got[i], w)
				}
			}
		})
	}
}

// TestDayRetryRange checks the per-day RetryInfo over a day.
func TestDayRetryRange(t *testing.T) {
	for s := 0; s < 2*86400; s += 7 {
		at := time.Date(2026, 3, 8, 0, 0, 0, 0, Pacific).Add(time.Duration(s)*time.Second + 123*time.Millisecond)
		if d := dayRetry(at); d < 20*time.Second || d >= 60*time.Second {
			t.Fatalf("dayRetry(%v) = %v", at, d)
		}
	}
	if got := fmt.Sprint(Day(time.Date(2026, 3, 9, 6, 59, 59, 0, time.UTC)), " ", Day(time.Date(2026, 3, 9, 7, 0, 0, 0, time.UTC))); got != "2026-03-08 2026-03-09" {
		t.Errorf("Day across the spring midnight: %s", got)
	}
}
