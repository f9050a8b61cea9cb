package gemini

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genai"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/client"
	"github.com/keyd/keyd/internal/fakegemini"
)

func TestGenerateReportsUsage(t *testing.T) {
	w := setup(t, twoProjects, []string{"a", "b"}, fakeConfig(fakegemini.Model{ThoughtsTokens: 9}), Options{})
	cfg := &genai.GenerateContentConfig{SystemInstruction: genai.NewContentFromText("You are terse.", genai.RoleUser)}
	contents := genai.Text("Explain how AI works, in a few words.")
	resp, err := w.g.GenerateContent(context.Background(), flash, contents, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(resp.Text(), "Fake answer to: Explain how AI works") {
		t.Errorf("answer %q", resp.Text())
	}
	if cfg.AutomaticContinuation != nil {
		t.Error("the caller's config was changed")
	}
	recs := w.generations()
	if len(recs) != 1 || keyID(recs[0].Key) != "a" {
		t.Fatalf("fake saw %v", w.calls())
	}
	rec := recs[0]
	// The lease's estimate is the heuristic's, and errs high.
	same(t, "grants", w.grants(), []string{fmt.Sprintf("a:%d", HeuristicTokens(contents, cfg))})
	if est := HeuristicTokens(contents, cfg); est < int64(rec.PromptTokens) {
		t.Errorf("estimate %d < prompt tokens %d", est, rec.PromptTokens)
	}
	same(t, "reports", w.reports(), []string{"a:success"})

	// keyd reconciled TPM with the real prompt count.
	b := w.bucket(t, "p1")
	if b.TPM.Used != int64(rec.PromptTokens) || b.RPM.Used != 1 || b.InFlight != 0 {
		t.Errorf("bucket p1: TPM used %d (fake's prompt %d), RPM used %d, in flight %d", b.TPM.Used, rec.PromptTokens, b.RPM.Used, b.InFlight)
	}
	u := w.usage(t, "p1")
	if u.Requests != 1 || u.PromptTokens != int64(rec.PromptTokens) || u.OutputTokens != int64(rec.OutputTokens+rec.ThoughtsTokens) {
		t.Errorf("usage %+v; fake: prompt %d output %d thoughts %d", u, rec.PromptTokens, rec.OutputTokens, rec.ThoughtsTokens)
	}
	if rec.ThoughtsTokens != 9 {
		t.Errorf("fake thought %d tokens", rec.ThoughtsTokens)
	}

	// A second call reuses the cached genai client of key a.
	first := w.g.clients["a"].c
	if _, err := w.g.GenerateContent(context.Background(), flash, contents, cfg); err != nil {
		t.Fatal(err)
	}
	if w.g.clients["a"].c != first {
		t.Error("the genai client of key a was rebuilt")
	}
}

func TestStreamReportsLastChunkUsage(t *testing.T) {
	w := setup(t, twoProjects, []string{"a", "b"},
		fakeConfig(fakegemini.Model{OutputTokens: 20, ThoughtsTokens: 7, StreamChunks: 4}), Options{})
	var chunks []*genai.GenerateContentResponse
	var text strings.Builder
	for chunk, err := range w.g.GenerateContentStream(context.Background(), flash, genai.Text("stream me a story"), nil) {
		if err != nil {
			t.Fatal(err)
		}
		chunks = append(chunks, chunk)
		text.WriteString(chunk.Text())
	}
	if len(chunks) != 4 {
		t.Fatalf("%d chunks, want 4", len(chunks))
	}
	recs := w.generations()
	if len(recs) != 1 || recs[0].Method != fakegemini.MethodStream {
		t.Fatalf("fake saw %+v", recs)
	}
	rec := recs[0]
	last := chunks[3].UsageMetadata
	if int(last.CandidatesTokenCount) != rec.OutputTokens || int(last.PromptTokenCount) != rec.PromptTokens {
		t.Fatalf("last chunk usage %+v, fake record %+v", last, rec)
	}
	// Cumulative usage: the last chunk's, never the sum of the chunks'.
	u := w.usage(t, "p1")
	if u.Requests != 1 || u.PromptTokens != int64(rec.PromptTokens) || u.OutputTokens != int64(rec.OutputTokens+rec.ThoughtsTokens) {
		t.Errorf("usage %+v; fake: prompt %d output %d thoughts %d", u, rec.PromptTokens, rec.OutputTokens, rec.ThoughtsTokens)
	}
	if b := w.bucket(t, "p1"); b.TPM.Used != int64(rec.PromptTokens) || b.InFlight != 0 {
		t.Errorf("bucket p1: TPM used %d, in flight %d", b.TPM.Used, b.InFlight)
	}
	same(t, "reports", w.reports(), []string{"a:success"})
}

func TestStreamStoppedEarlyReportsWhatWasSeen(t *testing.T) {
	w := setup(t, twoProjects, []string{"a", "b"},
		fakeConfig(fakegemini.Model{OutputTokens: 20, ThoughtsTokens: 5, StreamChunks: 4}), Options{})
	var first *genai.GenerateContentResponse
	for chunk, err := range w.g.GenerateContentStream(context.Background(), flash, genai.Text("stop early"), nil) {
		if err != nil {
			t.Fatal(err)
		}
		first = chunk
		break
	}
	if first == nil {
		t.Fatal("no chunk")
	}
	fu := first.UsageMetadata
	if fu.CandidatesTokenCount != 5 {
		t.Fatalf("first chunk usage %+v", fu)
	}
	u := w.usage(t, "p1")
	if u.Requests != 1 || u.Errors != 0 || u.PromptTokens != int64(fu.PromptTokenCount) || u.OutputTokens != int64(fu.CandidatesTokenCount+fu.ThoughtsTokenCount) {
		t.Errorf("usage %+v, first chunk %+v", u, fu)
	}
	same(t, "reports", w.reports(), []string{"a:success"})
}

func TestInvalidKeyRetriedOnAnotherKey(t *testing.T) {
	fcfg := fakeConfig(fakegemini.Model{})
	fcfg.Keys[0].State = fakegemini.KeyInvalid
	w := setup(t, twoProjects, []string{"a", "b"}, fcfg, Options{})
	ctx := context.Background()
	for i := range 4 {
		if _, err := w.g.GenerateContent(ctx, flash, genai.Text(fmt.Sprintf("call %d", i)), nil); err != nil {
			t.Fatal(err)
		}
	}
	same(t, "fake calls", w.calls(), []string{"a:400", "b:200", "b:200", "b:200", "b:200"})
	same(t, "reports", w.reports(), []string{"a:key_invalid", "b:success", "b:success", "b:success", "b:success"})
	if k := w.key(t, "a"); k.State != api.StateDisabled {
		t.Errorf("key a is %s, want disabled", k.State)
	}
}

func TestRateLimitRetriedOnAnotherProject(t *testing.T) {
	// The fake allows project p1 1 RPM; keyd believes it has 100.
	fcfg := fakeConfig(fakegemini.Model{})
	fcfg.Projects = []fakegemini.Project{{Name: "p1", Models: map[string]fakegemini.Limits{flash: {RPM: 1}}}}
	w := setup(t, twoProjects, []string{"a", "b"}, fcfg, Options{})
	ctx := context.Background()
	for i := range 3 {
		if _, err := w.g.GenerateContent(ctx, flash, genai.Text(fmt.Sprintf("call %d", i)), nil); err != nil {
			t.Fatal(err)
		}
	}
	same(t, "fake calls", w.calls(), []string{"a:200", "a:429", "b:200", "b:200"})
	same(t, "reports", w.reports(), []string{"a:success", "a:rate_minute", "b:success", "b:success"})
	if b := w.bucket(t, "p1"); b.State != api.StateCooling {
		t.Errorf("bucket p1 is %s, want cooling", b.State)
	}
	if v := w.fake.Violations(); v != nil {
		t.Errorf("fake violations: %v", v)
	}
}

func TestServerErrorRetriedOnce(t *testing.T) {
	defer func(d time.Duration) { serverErrorDelay = d }(serverErrorDelay)
	serverErrorDelay = 10 * time.Millisecond
	w := setup(t, twoProjects, []string{"a", "b"}, fakeConfig(fakegemini.Model{}), Options{})
	ctx := context.Background()

	w.fake.InjectNext(1, fakegemini.Fault{Kind: fakegemini.FaultOverloaded})
	if _, err := w.g.GenerateContent(ctx, flash, genai.Text("one 503"), nil); err != nil {
		t.Fatal(err)
	}
	w.fake.InjectNext(2, fakegemini.Fault{Kind: fakegemini.FaultInternal})
	_, err := w.g.GenerateContent(ctx, flash, genai.Text("two 500s"), nil)
	ae, ok := errors.AsType[genai.APIError](err)
	if !ok || ae.Code != 500 || ae.Status != "INTERNAL" {
		t.Fatalf("err = %v, want the 500", err)
	}
	var ge *Error
	if !errors.As(err, &ge) || ge.Attempts != 2 || ge.Status != 500 {
		t.Errorf("err = %#v", err)
	}
	same(t, "fake calls", w.calls(), []string{"a:503", "a:200", "a:500", "a:500"})
	same(t, "reports", w.reports(), []string{"a:server_error", "a:success", "a:server_error", "a:server_error"})

	// Another 4xx is the request's fault: no retry.
	_, err = w.g.GenerateContent(ctx, "gemini-unknown", genai.Text("x"), nil)
	if err == nil || !client.IsUnknownModel(err) {
		t.Errorf("unknown model: err = %v", err)
	}
}

func TestMaxAttempts(t *testing.T) {
	fcfg := fakeConfig(fakegemini.Model{})
	fcfg.Keys[0].State = fakegemini.KeyInvalid
	w := setup(t, twoProjects, []string{"a", "b"}, fcfg, Options{MaxAttempts: 1})
	_, err := w.g.GenerateContent(context.Background(), flash, genai.Text("x"), nil)
	ae, ok := errors.AsType[genai.APIError](err)
	if !ok || ae.Code != 400 {
		t.Fatalf("err = %v", err)
	}
	same(t, "fake calls", w.calls(), []string{"a:400"})
}

func TestSecretNeverInErrors(t *testing.T) {
	fcfg := fakeConfig(fakegemini.Model{})
	fcfg.Keys[0].State = fakegemini.KeySuspended
	const oneKey = `{"keys":[{"key_id":"a","project":"p1","model_name":"gemini-2.5-flash","rpm":100,"tpm":1000000}]}`
	w := setup(t, oneKey, []string{"a"}, fcfg, Options{})
	// The fake names the key in its 403, as Gemini does.
	raw, err := http.Post(w.hs.URL+"/v1beta/models/"+flash+":generateContent?key="+secretOf("a"), "application/json",
		strings.NewReader(`{"contents":[{"parts":[{"text":"x"}]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(raw.Body)
	raw.Body.Close()
	if !strings.Contains(string(body), secretOf("a")) {
		t.Fatalf("the fake's 403 does not name the key; the test proves nothing: %s", body)
	}
	w.fake.Reset()

	_, err = w.g.GenerateContent(context.Background(), flash, genai.Text("x"), nil)
	if err == nil {
		t.Fatal("no error")
	}
	if strings.Contains(err.Error(), secretOf("a")) || strings.Contains(fmt.Sprintf("%+v %#v", err, err), secretOf("a")) {
		t.Errorf("the error holds the secret: %v", err)
	}
	ae, ok := errors.AsType[genai.APIError](err)
	if !ok || ae.Code != 403 || strings.Contains(fmt.Sprint(ae.Message, ae.Details), secretOf("a")) {
		t.Errorf("APIError %+v", ae)
	}
	if !strings.Contains(ae.Message, "api_key:AIza…") {
		t.Errorf("message %q", ae.Message)
	}
	same(t, "reports", w.reports(), []string{"a:key_denied"})
	same(t, "fake calls", w.calls(), []string{"a:403"})
}

func TestContextCanceledInFlight(t *testing.T) {
	w := setup(t, twoProjects, []string{"a", "b"}, fakeConfig(fakegemini.Model{}), Options{})
	w.fake.InjectNext(1, fakegemini.Fault{Kind: fakegemini.FaultLatency, Latency: 5 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := w.g.GenerateContent(ctx, flash, genai.Text("slow"), nil)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("took %v", d)
	}
	// Sent, then abandoned: a network error, counted without penalty.
	same(t, "reports", w.reports(), []string{"a:network_error"})
	if b := w.bucket(t, "p1"); b.InFlight != 0 || b.State != api.StateReady || b.RPM.Used != 1 {
		t.Errorf("bucket p1 %+v", b)
	}

	// A ctx already done: no lease, nothing sent.
	_, err = w.g.GenerateContent(ctx, flash, genai.Text("late"), nil)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v", err)
	}
	if n := len(w.grants()); n != 1 {
		t.Errorf("%d grants", n)
	}
}

func TestNeverSentReportsUnused(t *testing.T) {
	// Gemini unreachable: the dial fails, no request is written.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + ln.Addr().String()
	ln.Close()
	w := setup(t, twoProjects, []string{"a", "b"}, fakeConfig(fakegemini.Model{}),
		Options{BaseURL: dead, HTTPClient: &http.Client{Transport: &http.Transport{}}})
	_, err = w.g.GenerateContent(context.Background(), flash, genai.Text("x"), nil)
	if err == nil || strings.Contains(err.Error(), secretOf("a")) {
		t.Fatalf("err = %v", err)
	}
	same(t, "reports", w.reports(), []string{"a:unused"})
	if b := w.bucket(t, "p1"); b.RPM.Used != 0 || b.TPM.Used != 0 || b.InFlight != 0 {
		t.Errorf("bucket p1 after an unused lease: %+v", b)
	}

	// ctx ends while the connection is being made: never sent either.
	ctx, cancel := context.WithCancel(context.Background())
	tr := &http.Transport{DialContext: func(dctx context.Context, _, _ string) (net.Conn, error) {
		cancel()
		<-dctx.Done()
		return nil, dctx.Err()
	}}
	g := New(w.kc, Options{BaseURL: dead, HTTPClient: &http.Client{Transport: tr}, Logger: w.g.log})
	_, err = g.GenerateContent(ctx, flash, genai.Text("x"), nil)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v", err)
	}
	same(t, "reports", w.reports(), []string{"a:unused", "a:unused"})
	tr.CloseIdleConnections()
}

func TestNoCapacity(t *testing.T) {
	// c: 1 RPM. d: 60 RPM paced one a second (burst 1).
	const keys = `{"keys":[
 {"key_id":"c","project":"p1","model_name":"gemini-2.5-flash","rpm":1,"tpm":1000000},
 {"key_id":"d","project":"p2","model_name":"gemini-2.5-pro","rpm":60,"tpm":1000000,"burst_capacity":1}]}`
	fcfg := fakegemini.Config{
		Keys:   []fakegemini.Key{{Key: secretOf("c"), Project: "p1"}, {Key: secretOf("d"), Project: "p2"}},
		Models: []fakegemini.Model{{Name: flash}, {Name: "gemini-2.5-pro"}},
	}
	w := setup(t, keys, []string{"c", "d"}, fcfg, Options{})
	bg := context.Background()
	if _, err := w.g.GenerateContent(bg, flash, genai.Text("one"), nil); err != nil {
		t.Fatal(err)
	}
	// Next capacity in ~60 s, beyond the deadline: a typed error at once.
	ctx, cancel := context.WithTimeout(bg, 2*time.Second)
	defer cancel()
	start := time.Now()
	_, err := w.g.GenerateContent(ctx, flash, genai.Text("two"), nil)
	var nc *NoCapacityError
	if !errors.As(err, &nc) {
		t.Fatalf("err = %v", err)
	}
	if d, ok := client.IsNoCapacity(err); !ok || d < 30*time.Second || nc.RetryAfter != d || nc.Attempts != 0 {
		t.Errorf("IsNoCapacity = %v %v; %+v", d, ok, nc)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("a refusal took %v", d)
	}
	if !strings.Contains(err.Error(), "no capacity") {
		t.Errorf("message %q", err)
	}

	// Next capacity in ~1 s, within the deadline: wait, then succeed.
	if _, err := w.g.GenerateContent(bg, "gemini-2.5-pro", genai.Text("three"), nil); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	ctx, cancel = context.WithTimeout(bg, 5*time.Second)
	defer cancel()
	if _, err := w.g.GenerateContent(ctx, "gemini-2.5-pro", genai.Text("four"), nil); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Errorf("no wait for pacing: %v", d)
	}
	same(t, "fake calls", w.calls(), []string{"c:200", "d:200", "d:200"})
}

func TestCountTokensEstimate(t *testing.T) {
	w := setup(t, twoProjects, []string{"a", "b"}, fakeConfig(fakegemini.Model{}), Options{Estimate: EstimateCountTokens})
	cfg := &genai.GenerateContentConfig{SystemInstruction: genai.NewContentFromText("Be brief, be kind.", genai.RoleUser)}
	contents := []*genai.Content{
		genai.NewContentFromText("What is a lease?", genai.RoleUser),
		genai.NewContentFromText("A grant of a key for one call.", genai.RoleModel),
		genai.NewContentFromText("And a report? ünïcödé", genai.RoleUser),
	}
	if _, err := w.g.GenerateContent(context.Background(), flash, contents, cfg); err != nil {
		t.Fatal(err)
	}
	recs := w.generations()
	if len(recs) != 1 {
		t.Fatalf("fake saw %v", w.calls())
	}
	var counts int
	for _, r := range w.fake.Requests() {
		if r.Method == fakegemini.MethodCountTokens {
			counts++
		}
	}
	if counts != 1 {
		t.Errorf("%d countTokens requests", counts)
	}
	// The count lease (1 token) was refunded; the generation's lease
	// carried the exact count.
	same(t, "grants", w.grants(), []string{"a:1", fmt.Sprintf("a:%d", recs[0].PromptTokens)})
	same(t, "reports", w.reports(), []string{"a:unused", "a:success"})
	if u := w.usage(t, "p1"); u.Requests != 1 || u.Unused != 1 {
		t.Errorf("usage %+v", u)
	}
}

func TestCountTokensSkipsInvalidKey(t *testing.T) {
	fcfg := fakeConfig(fakegemini.Model{})
	fcfg.Keys[0].State = fakegemini.KeyInvalid
	w := setup(t, twoProjects, []string{"a", "b"}, fcfg, Options{Estimate: EstimateCountTokens})
	if _, err := w.g.GenerateContent(context.Background(), flash, genai.Text("hello there"), nil); err != nil {
		t.Fatal(err)
	}
	same(t, "reports", w.reports(), []string{"a:key_invalid", "b:unused", "b:success"})
	same(t, "fake calls", w.calls(), []string{"b:200"})
}

func TestMidStreamError(t *testing.T) {
	// A server whose stream sends one chunk, then an error event.
	var reqs atomic.Int32
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(rw http.ResponseWriter, r *http.Request) {
		reqs.Add(1)
		rw.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(rw, `data: {"candidates":[{"content":{"role":"model","parts":[{"text":"Hel"}]}}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1,"totalTokenCount":4}}`+"\r\n\r\n")
		io.WriteString(rw, `data: {"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}`+"\r\n\r\n")
	})
	hs := httptest.NewServer(mux)
	defer hs.Close()
	w := setup(t, twoProjects, []string{"a", "b"}, fakeConfig(fakegemini.Model{}), Options{BaseURL: hs.URL, HTTPClient: hs.Client()})
	var chunks int
	var last error
	for chunk, err := range w.g.GenerateContentStream(context.Background(), flash, genai.Text("x"), nil) {
		if last != nil {
			t.Fatal("an element after the error")
		}
		if err != nil {
			last = err
			continue
		}
		if chunk.Text() != "Hel" {
			t.Errorf("chunk %q", chunk.Text())
		}
		chunks++
	}
	ae, ok := errors.AsType[genai.APIError](last)
	if chunks != 1 || !ok || ae.Code != 503 {
		t.Fatalf("%d chunks, err %v", chunks, last)
	}
	if n := reqs.Load(); n != 1 {
		t.Errorf("%d requests: a stream that yielded was retried", n)
	}
	same(t, "reports", w.reports(), []string{"a:server_error"})
}

func TestStreamRetriedBeforeFirstChunk(t *testing.T) {
	fcfg := fakeConfig(fakegemini.Model{})
	fcfg.Keys[0].State = fakegemini.KeyLeaked
	w := setup(t, twoProjects, []string{"a", "b"}, fcfg, Options{})
	var n int
	for _, err := range w.g.GenerateContentStream(context.Background(), flash, genai.Text("x"), nil) {
		if err != nil {
			t.Fatal(err)
		}
		n++
	}
	if n != fakegemini.DefaultStreamChunks {
		t.Errorf("%d chunks", n)
	}
	same(t, "fake calls", w.calls(), []string{"a:403", "b:200"})
	same(t, "reports", w.reports(), []string{"a:key_denied", "b:success"})
}
