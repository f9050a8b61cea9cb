package fakegemini

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"google.golang.org/genai"

	"github.com/keyd/keyd/internal/gemini"
)

// Raw net/http tests: wire details a client library would hide.

// TestLiteralBodies compares the fake's error bodies with the literal
// bodies of shared/gemini-api.md kept in internal/gemini/testdata, as JSON
// values (the real API indents; the doc's copies do not).
func TestLiteralBodies(t *testing.T) {
	cfg := basicConfig()
	cfg.Models = append(cfg.Models,
		Model{Name: "free-flash", Tier: Free, Limits: Limits{TPM: 250000, RPD: 250}},
		Model{Name: "paid-flash", Tier: Paid, Limits: Limits{RPM: 500}})
	for _, c := range []struct {
		fixture string
		run     func(f *fake) response
	}{
		{"400_api_key_invalid.json", func(f *fake) response { return f.gen(t, "bad", flash, "x") }},
		{"400_api_key_not_found.json", func(f *fake) response { return f.gen(t, "gone", flash, "x") }},
		{"403_unregistered_caller.json", func(f *fake) response { return f.gen(t, "", flash, "x") }},
		{"403_leaked_key.json", func(f *fake) response { return f.gen(t, "leak", flash, "x") }},
		{"404_model_not_found.json", func(f *fake) response { return f.gen(t, "k1", "gemini-2.0-flash", "x") }},
		{"500_internal.json", func(f *fake) response {
			f.InjectNext(1, Fault{Kind: FaultInternal})
			return f.gen(t, "k1", flash, "x")
		}},
		{"503_overloaded.json", func(f *fake) response {
			f.InjectNext(1, Fault{Kind: FaultOverloaded})
			return f.gen(t, "k1", flash, "x")
		}},
		{"503_unavailable.json", func(f *fake) response {
			f.InjectNext(1, Fault{Kind: FaultUnavailable})
			return f.gen(t, "k1", flash, "x")
		}},
		{"429_no_details_capacity.json", func(f *fake) response {
			f.InjectNext(1, Fault{Kind: FaultCapacity})
			return f.gen(t, "k1", flash, "x")
		}},
		{"429_prepayment_credits.json", func(f *fake) response {
			f.InjectNext(1, Fault{Kind: FaultPrepayment})
			return f.gen(t, "k1", flash, "x")
		}},
		// 250000 tokens at t0, 1 more 34 s later: over TPM until t0+60s,
		// i.e. retry in 26 s.
		{"429_classic_tpm.json", func(f *fake) response {
			if r := f.gen(t, "k1", "free-flash", tokensText(250000)); r.status != 200 {
				t.Fatalf("first request: %d %s", r.status, r.body)
			}
			f.Advance(34 * time.Second)
			r := f.post(t, "k1", "/v1beta/models/free-flash:generateContent", textRequest("x"))
			return renameModel(t, r, "free-flash", flash)
		}},
		// The 251st request of the day at 10:00:02 PST: RetryInfo 22s
		// (20 s + 2 s since the minute's 40 s cycle).
		{"429_rpd.json", func(f *fake) response {
			f.setNow(t0.Add(2 * time.Second))
			for i := range 250 {
				if r := f.gen(t, "k2", "free-flash", "x"); r.status != 200 {
					t.Fatalf("request %d: %d %s", i, r.status, r.body)
				}
			}
			return renameModel(t, f.gen(t, "k1", "free-flash", "x"), "free-flash", flash)
		}},
		// 500 requests at t0, the 501st 26 s later: retry in 34 s.
		{"429_paid_rpm.json", func(f *fake) response {
			for range 500 {
				f.gen(t, "k1", "paid-flash", "x")
			}
			f.Advance(26 * time.Second)
			return renameModel(t, f.gen(t, "k2", "paid-flash", "x"), "paid-flash", flash)
		}},
	} {
		t.Run(c.fixture, func(t *testing.T) {
			f := newFake(t, cfg)
			r := c.run(f)
			want, err := os.ReadFile(filepath.Join("..", "gemini", "testdata", c.fixture))
			if err != nil {
				t.Fatal(err)
			}
			var got, exp any
			if err := json.Unmarshal(r.body, &got); err != nil {
				t.Fatalf("%d %s: %v", r.status, r.body, err)
			}
			if err := json.Unmarshal(want, &exp); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, exp) {
				t.Errorf("body\n%s\nwant\n%s", r.body, want)
			}
			if code := exp.(map[string]any)["error"].(map[string]any)["code"].(float64); r.status != int(code) {
				t.Errorf("status %d, want %v", r.status, code)
			}
			if ct := r.header.Get("Content-Type"); ct != "application/json; charset=UTF-8" {
				t.Errorf("Content-Type %q", ct)
			}
			if r.header.Get("Retry-After") != "" {
				t.Error("the real API sends no Retry-After")
			}
		})
	}
}

// renameModel replaces a model name in a body (the fixtures name
// gemini-2.5-flash; the tests need models with other limits).
func renameModel(t *testing.T, r response, from, to string) response {
	t.Helper()
	r.body = []byte(strings.ReplaceAll(string(r.body), `"`+from+`"`, `"`+to+`"`))
	return r
}

func TestQueryKeyAuth(t *testing.T) {
	f := newFake(t, basicConfig())
	if r := f.post(t, "", "/v1beta/models/"+flash+":generateContent?key=k3", textRequest("hi")); r.status != 200 {
		t.Fatalf("?key=: %d %s", r.status, r.body)
	}
	// The header wins over ?key=.
	if r := f.post(t, "k1", "/v1beta/models/"+flash+":generateContent?key=bad", textRequest("hi")); r.status != 200 {
		t.Fatalf("header + bad ?key=: %d %s", r.status, r.body)
	}
	if r := f.post(t, "", "/v1beta/models/"+flash+":generateContent?key=bad", textRequest("hi")); r.status != 400 {
		t.Fatalf("bad ?key=: %d %s", r.status, r.body)
	}
	if r := f.do(t, http.MethodGet, "/v1beta/models?key=k1", "", nil); r.status != 200 {
		t.Fatalf("list with ?key=: %d %s", r.status, r.body)
	}
	if r := f.do(t, http.MethodGet, "/v1beta/models", "", nil); r.status != 403 {
		t.Fatalf("list without key: %d %s", r.status, r.body)
	}
	if r := f.post(t, "", "/v1/models/"+flash+":countTokens?key=k1", textRequest("hi")); r.status != 200 {
		t.Fatalf("v1 countTokens: %d %s", r.status, r.body)
	}
	recs := f.Requests()
	want := []string{"k3", "k1", "bad", "k1", "", "k1"}
	for i, r := range recs {
		if r.Key != want[i] {
			t.Errorf("record %d key %q, want %q", i, r.Key, want[i])
		}
	}
	if got := f.CountsByKey(); !reflect.DeepEqual(got, map[string]int{"k1": 1, "k3": 1}) {
		t.Errorf("CountsByKey = %v", got)
	}
}

func TestSSEFraming(t *testing.T) {
	f := newFake(t, basicConfig())
	r := f.post(t, "", "/v1beta/models/"+pro+":streamGenerateContent?alt=sse&key=k1", textRequest("Spanish for paw?"))
	if r.status != 200 || r.header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("%d %q", r.status, r.header.Get("Content-Type"))
	}
	body := string(r.body)
	t.Logf("stream:\n%s", body)
	if !strings.HasSuffix(body, "\r\n\r\n") || strings.Contains(strings.ReplaceAll(body, "\r\n", ""), "\n") ||
		strings.Contains(strings.ReplaceAll(body, "\r\n", ""), "\r") {
		t.Fatalf("not CRLF-framed: %q", body)
	}
	events := strings.Split(strings.TrimSuffix(body, "\r\n\r\n"), "\r\n\r\n")
	if len(events) != 4 {
		t.Fatalf("%d events, want 4", len(events))
	}
	prev := 0.0
	for i, ev := range events {
		data, ok := strings.CutPrefix(ev, "data: ")
		if !ok || strings.Contains(data, "\r\n") {
			t.Fatalf("event %d: %q", i, ev)
		}
		if strings.Contains(data, ":0,") || strings.Contains(data, ":0}") || strings.Contains(data, `:""`) {
			t.Errorf("event %d has a zero-valued field: %s", i, data)
		}
		m := decode(t, []byte(data))
		u := m["usageMetadata"].(map[string]any)
		cands := u["candidatesTokenCount"].(float64)
		if u["promptTokenCount"] != 4.0 || cands <= prev || u["thoughtsTokenCount"] != 30.0 || u["totalTokenCount"] != 4+cands+30 {
			t.Errorf("event %d usage %v", i, u)
		}
		prev = cands
		cand := m["candidates"].([]any)[0].(map[string]any)
		_, hasFinish := cand["finishReason"]
		if hasFinish != (i == len(events)-1) {
			t.Errorf("event %d: finishReason present %v", i, hasFinish)
		}
		if m["modelVersion"] != pro || m["responseId"] == "" {
			t.Errorf("event %d: %v", i, m)
		}
	}
	if prev != 10 {
		t.Errorf("final candidatesTokenCount %v, want 10", prev)
	}

	// Without alt=sse: the same chunks as one JSON array.
	r = f.post(t, "k1", "/v1beta/models/"+pro+":streamGenerateContent", textRequest("Spanish for paw?"))
	var arr []map[string]any
	if err := json.Unmarshal(r.body, &arr); err != nil || len(arr) != 4 {
		t.Fatalf("array stream: %v, %d chunks: %s", err, len(arr), r.body)
	}
	if arr[3]["usageMetadata"].(map[string]any)["candidatesTokenCount"] != 10.0 {
		t.Errorf("array last chunk: %v", arr[3])
	}
}

func TestBadRequests(t *testing.T) {
	f := newFake(t, basicConfig())
	for _, c := range []struct {
		name, path string
		body       any
		status     int
		msg        string
	}{
		{"no contents", ":generateContent", map[string]any{}, 400, "* GenerateContentRequest.contents: contents is not specified\n"},
		{"empty body", ":generateContent", "", 400, "* GenerateContentRequest.contents: contents is not specified\n"},
		{"bad JSON", ":generateContent", "{", 400, "Invalid JSON payload received. Unexpected token."},
		{"empty parts", ":streamGenerateContent?alt=sse", map[string]any{"contents": []any{map[string]any{"parts": []any{}}}}, 400,
			"* GenerateContentRequest.contents[0].parts: contents.parts must not be empty.\n"},
		{"countTokens without contents", ":countTokens", map[string]any{}, 400, "* CountTokensRequest.contents: contents is not specified\n"},
		{"snake_case fields", ":generateContent", map[string]any{"contents": textRequest("hi")["contents"],
			"system_instruction": map[string]any{"parts": []any{map[string]any{"text": "abcdefgh"}}}}, 200, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := f.post(t, "k1", "/v1beta/models/"+flash+c.path, c.body)
			if r.status != c.status {
				t.Fatalf("%d %s", r.status, r.body)
			}
			if c.status == 200 {
				if u := decode(t, r.body)["usageMetadata"].(map[string]any); u["promptTokenCount"] != 3.0 {
					t.Errorf("usage %v", u)
				}
				return
			}
			e := decode(t, r.body)["error"].(map[string]any)
			if e["message"] != c.msg || e["status"] != "INVALID_ARGUMENT" {
				t.Errorf("error %v", e)
			}
			if v := gemini.ClassifyBytes(r.status, r.body); v.Class != "client_error" {
				t.Errorf("class %s", v.Class)
			}
		})
	}
	for _, r := range f.Requests() {
		if r.Admitted != (r.Status == 200) {
			t.Errorf("record %+v: a failed request was counted", r)
		}
	}
	// Unknown paths and methods.
	for _, p := range []string{"/v1beta/models/" + flash + ":embedContent", "/v2/models", "/"} {
		if r := f.post(t, "k1", p, "{}"); r.status != 404 {
			t.Errorf("POST %s: %d", p, r.status)
		}
	}
	if r := f.do(t, http.MethodGet, "/v1beta/models/"+flash+":generateContent", "k1", nil); r.status != 404 {
		t.Errorf("GET generateContent: %d", r.status)
	}
}

func TestFaults(t *testing.T) {
	cfg := basicConfig()
	cfg.Models[0].Limits = Limits{} // no limits on flash
	cfg.Faults = []FaultRule{{Fault: Fault{Kind: FaultCapacity}, Every: 3, Model: pro}}
	f := newFake(t, cfg)

	statuses := func(n int, key, model string) []int {
		var out []int
		for range n {
			out = append(out, f.gen(t, key, model, "x").status)
		}
		return out
	}
	// Config rule: every 3rd pro request.
	if got := statuses(6, "k1", pro); !reflect.DeepEqual(got, []int{200, 200, 429, 200, 200, 429}) {
		t.Errorf("every 3rd: %v", got)
	}
	// InjectNext goes first, then is spent.
	f.InjectNext(2, Fault{Kind: FaultOverloaded})
	if got := statuses(3, "k1", flash); !reflect.DeepEqual(got, []int{503, 503, 200}) {
		t.Errorf("InjectNext(2): %v", got)
	}
	// A Fail function, for one key.
	f.Fail(func(q Request) *Fault {
		if q.Key == "k2" && q.Method == MethodGenerate {
			return &Fault{Kind: FaultInternal}
		}
		return nil
	})
	if got := statuses(2, "k2", flash); !reflect.DeepEqual(got, []int{500, 500}) {
		t.Errorf("Fail(k2): %v", got)
	}
	// A custom answer, for countTokens only.
	if err := f.AddRule(FaultRule{Fault: Fault{Kind: FaultCustom, Status: 504, Body: json.RawMessage(`{"error":{"code":504,"message":"Deadline expired before operation could complete.","status":"DEADLINE_EXCEEDED"}}`)},
		Method: MethodCountTokens, Count: 1}); err != nil {
		t.Fatal(err)
	}
	r := f.post(t, "k1", "/v1beta/models/"+flash+":countTokens", textRequest("x"))
	if v := gemini.ClassifyBytes(r.status, r.body); r.status != 504 || v.Status != "DEADLINE_EXCEEDED" || v.Class != "server_error" {
		t.Errorf("custom: %d %s", r.status, r.body)
	}
	// ConsumeQuota: the failed request counts.
	f.InjectNext(1, Fault{Kind: FaultInternal, ConsumeQuota: true})
	f.gen(t, "k3", flash, "x")
	recs := f.Requests()
	last := recs[len(recs)-1]
	if last.Status != 500 || !last.Admitted || last.Fault != FaultInternal || last.Error != "INTERNAL" {
		t.Errorf("ConsumeQuota record %+v", last)
	}
	st := f.Stats()
	if st.Faults["capacity"] != 2 || st.Faults["overloaded"] != 2 || st.Faults["internal"] != 3 || st.Faults["custom"] != 1 || st.Refused["capacity"] != 2 {
		t.Errorf("stats %+v", st)
	}
	// Bad faults are refused.
	if err := f.AddRule(FaultRule{Fault: Fault{Kind: "boom"}}); err == nil {
		t.Error("AddRule(boom) accepted")
	}
}

func TestLatency(t *testing.T) {
	f := newFake(t, basicConfig())
	f.InjectNext(1, Fault{Kind: FaultLatency, Latency: 30 * time.Millisecond})
	start := time.Now()
	if r := f.gen(t, "k1", flash, "x"); r.status != 200 {
		t.Fatalf("%d %s", r.status, r.body)
	}
	if d := time.Since(start); d < 30*time.Millisecond {
		t.Errorf("answered in %v, before the injected latency", d)
	}
	if r := f.Requests()[0]; r.Fault != FaultLatency || !r.Admitted {
		t.Errorf("record %+v", r)
	}

	// A client that gives up during the latency: the request was
	// admitted (it counts), and is recorded as 499.
	cfg := basicConfig()
	cfg.Latency = time.Hour
	g := newFake(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err := g.client(t, "k1").Models.GenerateContent(ctx, flash, genai.Text("x"), nil)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v", err)
	}
	g.hs.Close() // waits for the handler
	if r := g.Requests()[0]; r.Status != 499 || !r.Admitted || r.Error != "CANCELLED" {
		t.Errorf("record %+v", r)
	}
}

func TestAdminEndpoints(t *testing.T) {
	f := newFake(t, basicConfig())
	for range 6 {
		f.gen(t, "k1", flash, "x")
	}
	var st Stats
	r := f.do(t, http.MethodGet, "/_fake/stats", "", nil)
	if err := json.Unmarshal(r.body, &st); err != nil {
		t.Fatal(err)
	}
	if st.Requests != 6 || st.Admitted != 5 || st.CountsByKey["k1"] != 5 || st.Refused["rpm"] != 1 || st.ByStatus["429"] != 1 ||
		st.Buckets["p1/"+flash] != 5 || st.Violations == nil || len(st.Violations) != 0 || !st.Now.Equal(t0) {
		t.Errorf("stats %s", r.body)
	}
	if !strings.Contains(string(r.body), `"violations": []`) {
		t.Errorf("violations not an empty list: %s", r.body)
	}

	r = f.post(t, "", "/_fake/clock", map[string]any{"advance": "61s"})
	if r.status != 200 || !f.Now().Equal(t0.Add(61*time.Second)) {
		t.Fatalf("advance: %d %s", r.status, r.body)
	}
	if r := f.gen(t, "k1", flash, "x"); r.status != 200 {
		t.Errorf("after the window: %d", r.status)
	}
	r = f.post(t, "", "/_fake/clock", map[string]any{"set": "2026-03-05T00:00:00-08:00"})
	if r.status != 200 || !f.Now().Equal(time.Date(2026, 3, 5, 0, 0, 0, 0, Pacific)) {
		t.Fatalf("set: %d %s", r.status, r.body)
	}
	if r := f.post(t, "", "/_fake/faults", map[string]any{"kind": "overloaded", "count": 1}); r.status != 200 {
		t.Fatalf("faults: %d %s", r.status, r.body)
	}
	if r := f.gen(t, "k1", flash, "x"); r.status != 503 {
		t.Errorf("after POST /_fake/faults: %d", r.status)
	}
	if r := f.post(t, "", "/_fake/faults", map[string]any{"kind": "overloaded", "cont": 1}); r.status != 400 {
		t.Errorf("unknown field accepted: %d %s", r.status, r.body)
	}
	r = f.do(t, http.MethodGet, "/_fake/requests", "", nil)
	var recs []Record
	if err := json.Unmarshal(r.body, &recs); err != nil || len(recs) != 8 || recs[5].Quota[0] != QuotaRPM {
		t.Errorf("requests: %v %s", err, r.body)
	}
	if r := f.post(t, "", "/_fake/reset", nil); r.status != 200 || len(f.Requests()) != 0 {
		t.Errorf("reset: %d", r.status)
	}
	if r := f.do(t, http.MethodGet, "/_fake/nothing", "", nil); r.status != 404 {
		t.Errorf("unknown admin path: %d", r.status)
	}
}
