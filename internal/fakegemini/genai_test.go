package fakegemini

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"google.golang.org/genai"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/gemini"
)

// Tests through google.golang.org/genai, the SDK keyd's Go code uses.

func TestGenaiGenerateContent(t *testing.T) {
	f := newFake(t, basicConfig())
	c := f.client(t, "k1")
	ctx := context.Background()
	cfg := &genai.GenerateContentConfig{SystemInstruction: genai.NewContentFromText("You are terse.", genai.RoleUser)}
	resp, err := c.Models.GenerateContent(ctx, flash, genai.Text("hello world"), cfg)
	if err != nil {
		t.Fatal(err)
	}
	// "hello world" is 11 runes: 3 tokens; "You are terse." 14 runes: 4.
	u := resp.UsageMetadata
	if u.PromptTokenCount != 7 || u.CandidatesTokenCount != DefaultOutputTokens || u.TotalTokenCount != 7+DefaultOutputTokens || u.ThoughtsTokenCount != 0 {
		t.Errorf("usage = %+v", u)
	}
	if len(u.PromptTokensDetails) != 1 || u.PromptTokensDetails[0].Modality != genai.MediaModalityText || u.PromptTokensDetails[0].TokenCount != 7 {
		t.Errorf("promptTokensDetails = %+v", u.PromptTokensDetails)
	}
	if got := utf8.RuneCountInString(resp.Text()); got != 4*DefaultOutputTokens {
		t.Errorf("answer is %d runes, want %d: %q", got, 4*DefaultOutputTokens, resp.Text())
	}
	if !strings.HasPrefix(resp.Text(), "Fake answer to: hello world.") {
		t.Errorf("answer = %q", resp.Text())
	}
	if fr := resp.Candidates[0].FinishReason; fr != genai.FinishReasonStop {
		t.Errorf("finishReason = %q", fr)
	}
	if resp.ModelVersion != flash || len(resp.ResponseID) != 23 {
		t.Errorf("modelVersion %q, responseId %q", resp.ModelVersion, resp.ResponseID)
	}

	// countTokens of the contents alone (the SDK cannot send the system
	// instruction to the Gemini API's countTokens).
	ct, err := c.Models.CountTokens(ctx, flash, genai.Text("hello world"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if ct.TotalTokens != 3 {
		t.Errorf("countTokens = %d, want 3", ct.TotalTokens)
	}
	// The generateContentRequest form counts what generateContent counts.
	r := f.post(t, "k1", "/v1beta/models/"+flash+":countTokens", map[string]any{"generateContentRequest": map[string]any{
		"model":             "models/" + flash,
		"contents":          textRequest("hello world")["contents"],
		"systemInstruction": map[string]any{"parts": []any{map[string]any{"text": "You are terse."}}},
	}})
	if got := decode(t, r.body)["totalTokens"]; r.status != 200 || got != 7.0 {
		t.Errorf("countTokens(generateContentRequest) = %d %v, want 7", r.status, got)
	}

	// Determinism: the same prompt gives the same answer and usage.
	again, err := c.Models.GenerateContent(ctx, flash, genai.Text("hello world"), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if again.Text() != resp.Text() || !reflect.DeepEqual(again.UsageMetadata, resp.UsageMetadata) {
		t.Error("same request, different answer")
	}
	if again.ResponseID == resp.ResponseID {
		t.Error("two answers share a responseId")
	}
}

// streamAll runs a stream and returns its chunks.
func streamAll(t *testing.T, c *genai.Client, model string, contents []*genai.Content, cfg *genai.GenerateContentConfig) []*genai.GenerateContentResponse {
	t.Helper()
	var chunks []*genai.GenerateContentResponse
	for chunk, err := range c.Models.GenerateContentStream(context.Background(), model, contents, cfg) {
		if err != nil {
			t.Fatal(err)
		}
		chunks = append(chunks, chunk)
	}
	return chunks
}

func TestGenaiStreamMatchesGenerate(t *testing.T) {
	f := newFake(t, basicConfig())
	c := f.client(t, "k2")
	for _, tc := range []struct {
		name, model string
		cfg         *genai.GenerateContentConfig
		chunks      int
		finish      genai.FinishReason
		out, think  int32
	}{
		{"flash", flash, nil, DefaultStreamChunks, genai.FinishReasonStop, DefaultOutputTokens, 0},
		{"flash max tokens", flash, &genai.GenerateContentConfig{MaxOutputTokens: 2}, 2, genai.FinishReasonMaxTokens, 2, 0},
		{"pro thinking", pro, nil, 4, genai.FinishReasonStop, 10, 30},
		{"pro budget 12", pro, &genai.GenerateContentConfig{ThinkingConfig: &genai.ThinkingConfig{ThinkingBudget: genai.Ptr[int32](12)}}, 4, genai.FinishReasonStop, 10, 12},
		{"pro budget 0", pro, &genai.GenerateContentConfig{ThinkingConfig: &genai.ThinkingConfig{ThinkingBudget: genai.Ptr[int32](0)}}, 4, genai.FinishReasonStop, 10, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			contents := genai.Text("Explain how AI works, in a few words.") // 37 runes: 10 tokens
			whole, err := c.Models.GenerateContent(context.Background(), tc.model, contents, tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			chunks := streamAll(t, c, tc.model, contents, tc.cfg)
			if len(chunks) != tc.chunks {
				t.Fatalf("%d chunks, want %d", len(chunks), tc.chunks)
			}
			var text strings.Builder
			prev := int32(0)
			for i, ch := range chunks {
				text.WriteString(ch.Text())
				u := ch.UsageMetadata
				if u == nil || u.PromptTokenCount != 10 || u.CandidatesTokenCount <= prev || u.TotalTokenCount != u.PromptTokenCount+u.CandidatesTokenCount+u.ThoughtsTokenCount {
					t.Errorf("chunk %d usage = %+v", i, u)
				}
				prev = u.CandidatesTokenCount
				fr := ch.Candidates[0].FinishReason
				if last := i == len(chunks)-1; last && fr != tc.finish || !last && fr != "" {
					t.Errorf("chunk %d finishReason %q", i, fr)
				}
				if ch.ResponseID != chunks[0].ResponseID || ch.ModelVersion != tc.model {
					t.Errorf("chunk %d responseId %q modelVersion %q", i, ch.ResponseID, ch.ModelVersion)
				}
			}
			last := chunks[len(chunks)-1].UsageMetadata
			if !reflect.DeepEqual(last, whole.UsageMetadata) {
				t.Errorf("last chunk usage %+v\n!= generateContent usage %+v", last, whole.UsageMetadata)
			}
			if last.CandidatesTokenCount != tc.out || last.ThoughtsTokenCount != tc.think {
				t.Errorf("usage %+v, want %d out, %d thoughts", last, tc.out, tc.think)
			}
			if text.String() != whole.Text() {
				t.Errorf("stream text %q != %q", text.String(), whole.Text())
			}
			if whole.Candidates[0].FinishReason != tc.finish {
				t.Errorf("generateContent finishReason %q", whole.Candidates[0].FinishReason)
			}
		})
	}
}

func TestGenaiModels(t *testing.T) {
	cfg := basicConfig()
	cfg.Models = append(cfg.Models, Model{Name: "gemini-2.5-flash-lite", InputTokenLimit: 1000, OutputTokenLimit: 100})
	f := newFake(t, cfg)
	c := f.client(t, "k1")
	ctx := context.Background()

	var names []string
	page, err := c.Models.List(ctx, &genai.ListModelsConfig{PageSize: 2})
	for err == nil {
		for _, m := range page.Items {
			names = append(names, m.Name)
		}
		page, err = page.Next(ctx)
	}
	if !errors.Is(err, genai.ErrPageDone) {
		t.Fatal(err)
	}
	want := []string{"models/" + flash, "models/" + pro, "models/gemini-2.5-flash-lite"}
	if !reflect.DeepEqual(names, want) {
		t.Errorf("paged list = %q, want %q", names, want)
	}
	names = nil
	for m, err := range c.Models.All(ctx) {
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, m.Name)
	}
	if !reflect.DeepEqual(names, want) {
		t.Errorf("All = %q, want %q", names, want)
	}

	m, err := c.Models.Get(ctx, "gemini-2.5-flash-lite", nil)
	if err != nil {
		t.Fatal(err)
	}
	if m.Name != "models/gemini-2.5-flash-lite" || m.DisplayName != "Gemini 2.5 Flash Lite" || m.InputTokenLimit != 1000 || m.OutputTokenLimit != 100 ||
		!reflect.DeepEqual(m.SupportedActions, []string{"generateContent", "countTokens"}) {
		t.Errorf("Get = %+v", m)
	}
	if m, err := c.Models.Get(ctx, "models/"+pro, nil); err != nil || !m.Thinking {
		t.Errorf("Get(models/pro) = %+v, %v", m, err)
	}
	_, err = c.Models.Get(ctx, "gemini-9", nil)
	var ae genai.APIError
	if !errors.As(err, &ae) || ae.Code != 404 || ae.Status != "NOT_FOUND" {
		t.Errorf("Get(unknown) = %v", err)
	}

	// A prompt over inputTokenLimit is a 400, not counted.
	_, err = c.Models.GenerateContent(ctx, "gemini-2.5-flash-lite", genai.Text(tokensText(1001)), nil)
	if !errors.As(err, &ae) || ae.Code != 400 || !strings.Contains(ae.Message, "The input token count (1001) exceeds the maximum number of tokens allowed (1000).") {
		t.Errorf("over inputTokenLimit: %v", err)
	}
}

// TestGenaiErrorsClassify checks that every error the fake makes reaches a
// genai client as an APIError whose body keyd's classifier reads right.
func TestGenaiErrorsClassify(t *testing.T) {
	type tc struct {
		name   string
		setup  func(f *fake)
		key    string
		model  string
		prompt string
		code   int
		status string
		class  string
		ids    []string
		detail bool // the body has details
	}
	exhaust := func(n int, key string) func(f *fake) {
		return func(f *fake) {
			for range n {
				f.gen(t, key, flash, "x")
			}
		}
	}
	cases := []tc{
		{name: "invalid key", key: "bad", code: 400, status: "INVALID_ARGUMENT", class: api.ClassKeyInvalid, detail: true},
		{name: "unknown key", key: "nobody", code: 400, status: "INVALID_ARGUMENT", class: api.ClassKeyInvalid, detail: true},
		{name: "key not found", key: "gone", code: 400, status: "INVALID_ARGUMENT", class: api.ClassKeyInvalid, detail: true},
		{name: "leaked key", key: "leak", code: 403, status: "PERMISSION_DENIED", class: api.ClassKeyDenied},
		{name: "suspended key", key: "susp", code: 403, status: "PERMISSION_DENIED", class: api.ClassKeyDenied, detail: true},
		{name: "unknown model", key: "k1", model: "gemini-2.0-flash", code: 404, status: "NOT_FOUND", class: api.ClassClientError},
		{name: "500", key: "k1", setup: func(f *fake) { f.InjectNext(1, Fault{Kind: FaultInternal}) },
			code: 500, status: "INTERNAL", class: api.ClassServerError},
		{name: "503 overloaded", key: "k1", setup: func(f *fake) { f.InjectNext(1, Fault{Kind: FaultOverloaded}) },
			code: 503, status: "UNAVAILABLE", class: api.ClassServerError},
		{name: "503 unavailable", key: "k1", setup: func(f *fake) { f.InjectNext(1, Fault{Kind: FaultUnavailable}) },
			code: 503, status: "UNAVAILABLE", class: api.ClassServerError},
		{name: "429 capacity", key: "k1", setup: func(f *fake) { f.InjectNext(1, Fault{Kind: FaultCapacity}) },
			code: 429, status: "RESOURCE_EXHAUSTED", class: api.ClassCapacity},
		{name: "429 prepayment", key: "k1", setup: func(f *fake) { f.InjectNext(1, Fault{Kind: FaultPrepayment}) },
			code: 429, status: "RESOURCE_EXHAUSTED", class: api.ClassBilling},
		{name: "429 rpm", key: "k2", setup: exhaust(5, "k1"), code: 429, status: "RESOURCE_EXHAUSTED", class: api.ClassRateMinute,
			ids: []string{"GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}, detail: true},
		{name: "429 tpm", key: "k1", prompt: tokensText(1001), code: 429, status: "RESOURCE_EXHAUSTED", class: api.ClassRateMinute,
			ids: []string{"GenerateContentInputTokensPerModelPerMinute-FreeTier"}, detail: true},
		{name: "429 rpd", key: "k1", setup: func(f *fake) {
			for i := range 20 {
				f.setNow(t0.Add(time.Duration(i) * Window))
				f.gen(t, "k2", flash, "x")
			}
		}, code: 429, status: "RESOURCE_EXHAUSTED", class: api.ClassRateDay,
			ids: []string{"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}, detail: true},
		{name: "429 zero", key: "k3", setup: nil, model: "gemini-3-pro", code: 429, status: "RESOURCE_EXHAUSTED", class: api.ClassQuotaZero,
			ids: []string{"GenerateRequestsPerDayPerProjectPerModel-FreeTier", "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
				"GenerateContentInputTokensPerModelPerMinute-FreeTier"}, detail: true},
	}
	for _, format := range []QuotaFormat{QuotaClassic, QuotaNewer} {
		for _, c := range cases {
			t.Run(string(format)+"/"+c.name, func(t *testing.T) {
				cfg := basicConfig()
				cfg.QuotaFormat = format
				cfg.Models = append(cfg.Models, Model{Name: "gemini-3-pro", Tier: Free, Limits: Limits{Unavailable: true}})
				f := newFake(t, cfg)
				if c.setup != nil {
					c.setup(f)
				}
				model, prompt := c.model, c.prompt
				if model == "" {
					model = flash
				}
				if prompt == "" {
					prompt = "hi"
				}
				_, err := f.client(t, c.key).Models.GenerateContent(context.Background(), model, genai.Text(prompt), nil)
				var ae genai.APIError
				if !errors.As(err, &ae) {
					t.Fatalf("err = %v, want an APIError", err)
				}
				if ae.Code != c.code || ae.Status != c.status || (len(ae.Details) > 0) != c.detail {
					t.Errorf("APIError = %d %s, %d details; want %d %s, details %v", ae.Code, ae.Status, len(ae.Details), c.code, c.status, c.detail)
				}
				// The classifier on the error as genai decoded it ...
				v := gemini.Classify(ae.Code, ae)
				if v.Class != c.class || !reflect.DeepEqual(v.QuotaIDs, c.ids) {
					t.Errorf("Classify(APIError) = %s %q, want %s %q", v.Class, v.QuotaIDs, c.class, c.ids)
				}
				if c.code == 429 && c.detail && v.RetryDelay <= 0 {
					t.Errorf("no retry delay: %+v", v)
				}
				// ... and on the raw body.
				r := f.gen(t, c.key, model, prompt)
				if c.setup != nil && c.class != api.ClassRateMinute && c.class != api.ClassRateDay {
					return // the injected fault is spent
				}
				if vb := gemini.ClassifyBytes(r.status, r.body); vb.Class != c.class {
					t.Errorf("ClassifyBytes = %s, want %s: %s", vb.Class, c.class, r.body)
				}
			})
		}
	}
}

// TestGenaiStreamRefused: a refused stream is an APIError before any chunk.
func TestGenaiStreamRefused(t *testing.T) {
	f := newFake(t, basicConfig())
	c := f.client(t, "k1")
	for range 5 {
		streamAll(t, c, flash, genai.Text("x"), nil)
	}
	n := 0
	for chunk, err := range c.Models.GenerateContentStream(context.Background(), flash, genai.Text("x"), nil) {
		n++
		var ae genai.APIError
		if chunk != nil || !errors.As(err, &ae) || ae.Code != 429 || len(ae.Details) != 3 {
			t.Fatalf("chunk %v, err %v", chunk, err)
		}
		if v := gemini.Classify(ae.Code, ae); v.Class != api.ClassRateMinute || v.RetryDelay != time.Minute {
			t.Errorf("verdict %+v", v)
		}
	}
	if n != 1 {
		t.Errorf("%d items, want the error alone", n)
	}
	if c := f.CountsByKey(); c["k1"] != 5 {
		t.Errorf("CountsByKey %v", c)
	}
}
