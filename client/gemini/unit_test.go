package gemini

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/genai"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/fakegemini"
	classify "github.com/keyd/keyd/internal/gemini"
)

func TestHeuristicTokens(t *testing.T) {
	text := func(s string) []*genai.Content { return genai.Text(s) }
	cases := []struct {
		name     string
		contents []*genai.Content
		cfg      *genai.GenerateContentConfig
		want     int64
	}{
		{"empty", nil, nil, 1},
		{"40 bytes", text(strings.Repeat("abcd", 10)), nil, 11},       // 10 + 10%
		{"41 bytes", text(strings.Repeat("abcd", 10) + "e"), nil, 13}, // ceil(41/4)=11, +10% = 12.1 → 13
		{"utf-8 bytes", text("ééé"), nil, 3},                          // 6 bytes: ceil(6/4) = 2, +10% → 3
		{"system", text("abcd"), &genai.GenerateContentConfig{SystemInstruction: genai.NewContentFromText("abcdabcd", genai.RoleUser)}, 4},
		{"image", []*genai.Content{genai.NewContentFromBytes([]byte("png"), "image/png", genai.RoleUser)}, nil, 284}, // 258 + 10% → 283.8
		{"two parts", []*genai.Content{{Role: "user", Parts: []*genai.Part{{Text: "a"}, {Text: "b"}}}}, nil, 3},
	}
	for _, tc := range cases {
		if got := HeuristicTokens(tc.contents, tc.cfg); got != tc.want {
			t.Errorf("%s: HeuristicTokens = %d, want %d", tc.name, got, tc.want)
		}
	}

	// Tools and function parts count by their JSON; a bigger tool, more tokens.
	tool := func(desc string) *genai.GenerateContentConfig {
		return &genai.GenerateContentConfig{Tools: []*genai.Tool{{FunctionDeclarations: []*genai.FunctionDeclaration{{Name: "f", Description: desc}}}}}
	}
	small, big := HeuristicTokens(text("x"), tool("d")), HeuristicTokens(text("x"), tool(strings.Repeat("d", 400)))
	if small <= HeuristicTokens(text("x"), nil) || big-small < 100 {
		t.Errorf("tools: %d, %d", small, big)
	}
	call := []*genai.Content{{Role: "model", Parts: []*genai.Part{genai.NewPartFromFunctionCall("lookup", map[string]any{"q": strings.Repeat("z", 100)})}}}
	if n := HeuristicTokens(call, nil); n < 25 {
		t.Errorf("function call: %d", n)
	}
}

// TestHeuristicErrsHigh checks the heuristic against the fake's count
// (which is ceil(runes/4) per part, like Gemini's order of magnitude).
func TestHeuristicErrsHigh(t *testing.T) {
	for _, s := range []string{"hi", "Explain how AI works", strings.Repeat("lorem ipsum ", 300), "日本語のテキスト", "ünïcödé"} {
		got := HeuristicTokens(genai.Text(s), nil)
		if want := int64(fakegemini.TextTokens(s)); got < want {
			t.Errorf("%q: heuristic %d < fake's %d", s, got, want)
		}
	}
}

func TestUsageOf(t *testing.T) {
	if usageOf(nil) != nil || usageOf(&genai.GenerateContentResponseUsageMetadata{CandidatesTokenCount: 3}) != nil {
		t.Error("usage without a prompt count")
	}
	got := usageOf(&genai.GenerateContentResponseUsageMetadata{PromptTokenCount: 8, CandidatesTokenCount: 12, ThoughtsTokenCount: 1171, TotalTokenCount: 1191})
	if want := (&api.Usage{PromptTokens: 8, OutputTokens: 1183, TotalTokens: 1191}); *got != *want {
		t.Errorf("usage %+v, want %+v", got, want)
	}
}

// TestErrorBodyRoundTrip serves every literal Gemini error body of
// internal/gemini/testdata, takes the genai.APIError the SDK makes of it,
// and checks that the body rebuilt from it classifies as the original
// does, and what the retry policy makes of it.
func TestErrorBodyRoundTrip(t *testing.T) {
	retry := map[string]int{
		"400_api_key_invalid": retryOther, "400_api_key_not_found": retryOther, "400_bad_request": retryNone,
		"403_consumer_suspended": retryOther, "403_leaked_key": retryOther, "403_unregistered_caller": retryOther,
		"404_model_not_found": retryNone, "500_internal": retryServer, "503_overloaded": retryServer, "503_unavailable": retryServer,
	}
	files, err := filepath.Glob("../../internal/gemini/testdata/*.json")
	if err != nil || len(files) < 15 {
		t.Fatalf("fixtures: %v %v", files, err)
	}
	var body []byte
	var status int
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		w.Write(body)
	}))
	defer hs.Close()
	c, err := genai.NewClient(context.Background(), &genai.ClientConfig{APIKey: "k", Backend: genai.BackendGeminiAPI,
		HTTPClient: hs.Client(), HTTPOptions: genai.HTTPOptions{BaseURL: hs.URL}})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".json")
		body, err = os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		status, _ = strconv.Atoi(name[:3])
		_, err := c.Models.GenerateContent(context.Background(), flash, genai.Text("x"), nil)
		ae, ok := errors.AsType[genai.APIError](err)
		if !ok {
			t.Errorf("%s: err %v", name, err)
			continue
		}
		var raw any
		if err := json.Unmarshal(body, &raw); err != nil {
			t.Fatal(err)
		}
		want := classify.Classify(status, raw)
		got := classify.Classify(ae.Code, errorBody(ae, secretOf("a")))
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: rebuilt body classifies as %+v, the original as %+v", name, got, want)
		}
		wantRetry, ok := retry[name]
		if !ok && status == 429 {
			wantRetry = retryOther
		}
		if k := retryKind(ae); k != wantRetry {
			t.Errorf("%s: retryKind %d, want %d", name, k, wantRetry)
		}
	}
}

func TestCleaning(t *testing.T) {
	const secret = "my-secret-value"
	ae := genai.APIError{Code: 403, Status: "PERMISSION_DENIED",
		Message: "Consumer 'api_key:AIzaSyABCDEFGHIJKLMNOPQRSTUVWXYZ012345678' and my-secret-value",
		Details: []map[string]any{{"metadata": map[string]any{"key": "my-secret-value", "n": 3.0}, "list": []any{"x my-secret-value"}}}}
	c := cleanAPIError(ae, secret)
	b, _ := json.Marshal(errorBody(c, secret))
	if strings.Contains(string(b), secret) || strings.Contains(string(b), "AIzaSyABCD") {
		t.Errorf("not clean: %s", b)
	}
	if !strings.Contains(string(b), `"n":3`) || c.Code != 403 {
		t.Errorf("cleaning lost data: %s", b)
	}
	if ae.Details[0]["metadata"].(map[string]any)["key"] != secret {
		t.Error("cleaning changed the original")
	}

	err := cleanError(errors.Join(context.Canceled, errors.New("dial my-secret-value")), secret)
	if strings.Contains(err.Error(), secret) || !errors.Is(err, context.Canceled) {
		t.Errorf("cleanError = %v", err)
	}
	plain := errors.New("connection refused")
	if cleanError(plain, secret) != plain {
		t.Error("a clean error was wrapped")
	}
}
