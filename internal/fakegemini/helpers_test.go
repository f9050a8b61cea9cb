package fakegemini

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"google.golang.org/genai"
)

// t0 is Wednesday 2026-03-04 10:00:00 in Los Angeles (PST, 18:00 UTC).
var t0 = time.Date(2026, 3, 4, 10, 0, 0, 0, Pacific)

const (
	flash = "gemini-2.5-flash"
	pro   = "gemini-2.5-pro"
)

// fake is a Server on an httptest.Server with a frozen clock at t0 (moved
// only by Advance / setNow).
type fake struct {
	*Server
	hs *httptest.Server
}

func newFake(t *testing.T, cfg Config) *fake {
	t.Helper()
	if cfg.Clock == nil {
		cfg.Clock = func() time.Time { return t0 }
	}
	s := New(cfg)
	hs := httptest.NewServer(s)
	t.Cleanup(hs.Close)
	return &fake{s, hs}
}

// setNow moves the fake's clock to at.
func (f *fake) setNow(at time.Time) { f.Advance(at.Sub(f.Now())) }

// basicConfig: keys k1, k2 in project p1, k3 in p2; flash (free tier,
// 5 RPM, 1000 TPM, 20 RPD) and pro (paid, no limits).
func basicConfig() Config {
	return Config{
		Keys: []Key{{Key: "k1", Project: "p1"}, {Key: "k2", Project: "p1"}, {Key: "k3", Project: "p2"},
			{Key: "bad", State: KeyInvalid}, {Key: "gone", State: KeyNotFound},
			{Key: "leak", Project: "p1", State: KeyLeaked}, {Key: "susp", Project: "p1", State: KeySuspended}},
		Models: []Model{
			{Name: flash, Limits: Limits{RPM: 5, TPM: 1000, RPD: 20}, Tier: Free},
			{Name: pro, Tier: Paid, ThoughtsTokens: 30, OutputTokens: 10, StreamChunks: 4},
		},
	}
}

func (f *fake) client(t *testing.T, key string) *genai.Client {
	t.Helper()
	c, err := genai.NewClient(context.Background(), &genai.ClientConfig{
		APIKey:      key,
		Backend:     genai.BackendGeminiAPI,
		HTTPOptions: genai.HTTPOptions{BaseURL: f.hs.URL},
	})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// response is a raw HTTP answer.
type response struct {
	status int
	header http.Header
	body   []byte
}

// post sends body (a value encoded to JSON, or a string/[]byte as is) to
// path with the key in the header (when key != "").
func (f *fake) post(t *testing.T, key, path string, body any) response {
	t.Helper()
	return f.do(t, http.MethodPost, path, key, body)
}

func (f *fake) do(t *testing.T, method, path, key string, body any) response {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		enc, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(enc)
	}
	req, err := http.NewRequest(method, f.hs.URL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if key != "" {
		req.Header.Set("x-goog-api-key", key)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := f.hs.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return response{resp.StatusCode, resp.Header, b}
}

// gen is a raw generateContent of text to model with key.
func (f *fake) gen(t *testing.T, key, model, text string) response {
	t.Helper()
	return f.post(t, key, "/v1beta/models/"+model+":generateContent", textRequest(text))
}

func textRequest(text string) map[string]any {
	return map[string]any{"contents": []any{map[string]any{"role": "user", "parts": []any{map[string]any{"text": text}}}}}
}

// tokensText is a prompt of exactly n tokens.
func tokensText(n int) string { return strings.Repeat("abcd", n) }

// decode decodes JSON b into a map.
func decode(t *testing.T, b []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	return m
}
