package gemini

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/keyd/keyd/api"
)

const fakeKey = "AIzaSyFAKEFAKEFAKEFAKEFAKEFAKEFAKEFAKE12"

// fixture is one literal body of shared/gemini-api.md, in testdata/.
type fixture struct {
	file    string
	status  int
	class   string
	retry   time.Duration
	zero    bool
	ids     []string
	reason  string
	summary string // checked when not empty
	quotas  []Quota
}

var fixtures = []fixture{
	{file: "429_classic_tpm.json", status: 429, class: api.ClassRateMinute, retry: 26 * time.Second,
		ids:     []string{"GenerateContentInputTokensPerModelPerMinute-FreeTier"},
		summary: "429 per-minute quota GenerateContentInputTokensPerModelPerMinute-FreeTier; retry in 26s",
		quotas: []Quota{{ID: "GenerateContentInputTokensPerModelPerMinute-FreeTier", Dimension: QuotaTPM,
			Model: "gemini-2.5-flash", Value: 250000, HasValue: true}}},
	{file: "429_rpd.json", status: 429, class: api.ClassRateDay, retry: 22 * time.Second,
		ids:     []string{"GenerateRequestsPerDayPerProjectPerModel-FreeTier"},
		summary: "429 per-day quota GenerateRequestsPerDayPerProjectPerModel-FreeTier",
		quotas: []Quota{{ID: "GenerateRequestsPerDayPerProjectPerModel-FreeTier", Dimension: QuotaRPD,
			Model: "gemini-2.5-flash", Value: 250, HasValue: true}}},
	// Details carry no quotaValue: the zero comes from the message's "limit: 0".
	{file: "429_newer_limit0.json", status: 429, class: api.ClassQuotaZero, retry: 38 * time.Second, zero: true,
		ids: []string{"GenerateContentInputTokensPerModelPerMinute-FreeTier", "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"},
		quotas: []Quota{
			{ID: "GenerateContentInputTokensPerModelPerMinute-FreeTier", Dimension: QuotaTPM, Model: "gemini-2.5-pro"},
			{ID: "GenerateRequestsPerMinutePerProjectPerModel-FreeTier", Dimension: QuotaRPM, Model: "gemini-2.5-pro"}}},
	// python-genai#2044: PerDay + PerMinute + input TPM in one body; the day wins.
	{file: "429_multi_day_minute_tpm.json", status: 429, class: api.ClassRateDay, retry: 47 * time.Second,
		ids: []string{
			"GenerateRequestsPerDayPerProjectPerModel-FreeTier",
			"GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
			"GenerateContentInputTokensPerModelPerMinute-FreeTier",
		},
		summary: "429 per-day quota GenerateRequestsPerDayPerProjectPerModel-FreeTier",
		quotas: []Quota{
			{ID: "GenerateRequestsPerDayPerProjectPerModel-FreeTier", Dimension: QuotaRPD, Model: "gemini-2.0-flash"},
			{ID: "GenerateRequestsPerMinutePerProjectPerModel-FreeTier", Dimension: QuotaRPM, Model: "gemini-2.0-flash"},
			{ID: "GenerateContentInputTokensPerModelPerMinute-FreeTier", Dimension: QuotaTPM, Model: "gemini-2.0-flash"}}},
	{file: "429_paid_rpm.json", status: 429, class: api.ClassRateMinute, retry: 34 * time.Second,
		ids: []string{"GenerateRequestsPerMinutePerProjectPerModel"},
		quotas: []Quota{{ID: "GenerateRequestsPerMinutePerProjectPerModel", Dimension: QuotaRPM,
			Model: "gemini-2.5-flash", Value: 500, HasValue: true}}},
	{file: "429_legacy_2024_rpm.json", status: 429, class: api.ClassRateMinute, reason: "RATE_LIMIT_EXCEEDED",
		ids:     []string{"GenerateContentRequestsPerMinutePerProjectPerRegion"},
		summary: "429 per-minute quota GenerateContentRequestsPerMinutePerProjectPerRegion",
		quotas:  []Quota{{ID: "GenerateContentRequestsPerMinutePerProjectPerRegion", Dimension: QuotaRPM, Value: 60, HasValue: true}}},
	{file: "429_legacy_2024_limit0.json", status: 429, class: api.ClassQuotaZero, zero: true, reason: "RATE_LIMIT_EXCEEDED",
		ids:    []string{"GenerateContentRequestsPerMinutePerProjectPerRegion"},
		quotas: []Quota{{ID: "GenerateContentRequestsPerMinutePerProjectPerRegion", Dimension: QuotaRPM, Value: 0, HasValue: true}}},
	{file: "429_no_details_capacity.json", status: 429, class: api.ClassCapacity,
		summary: "429 capacity: Resource has been exhausted (e.g. check quota)."},
	{file: "429_prepayment_credits.json", status: 429, class: api.ClassBilling},
	{file: "400_api_key_invalid.json", status: 400, class: api.ClassKeyInvalid, reason: "API_KEY_INVALID",
		summary: "400 API_KEY_INVALID: API key not valid. Please pass a valid API key."},
	{file: "400_api_key_not_found.json", status: 400, class: api.ClassKeyInvalid, reason: "API_KEY_INVALID",
		summary: "400 API_KEY_INVALID: API Key not found. Please pass a valid API key."},
	{file: "400_bad_request.json", status: 400, class: api.ClassClientError,
		summary: "400 INVALID_ARGUMENT: * GenerateContentRequest.contents: contents is not specified"},
	{file: "403_unregistered_caller.json", status: 403, class: api.ClassKeyDenied},
	{file: "403_leaked_key.json", status: 403, class: api.ClassKeyDenied,
		summary: "403 PERMISSION_DENIED: Your API key was reported as leaked. Please use another API key."},
	{file: "403_consumer_suspended.json", status: 403, class: api.ClassKeyDenied, reason: "CONSUMER_SUSPENDED",
		summary: "403 CONSUMER_SUSPENDED: Permission denied: Consumer 'api_key:AIza…' has been suspended."},
	{file: "404_model_not_found.json", status: 404, class: api.ClassClientError},
	{file: "500_internal.json", status: 500, class: api.ClassServerError},
	{file: "503_overloaded.json", status: 503, class: api.ClassServerError,
		summary: "503 UNAVAILABLE: The model is overloaded. Please try again later."},
	{file: "503_unavailable.json", status: 503, class: api.ClassServerError},
}

func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestFixtures(t *testing.T) {
	for _, f := range fixtures {
		t.Run(f.file, func(t *testing.T) {
			raw := readFixture(t, f.file)

			// The same body as bytes, as decoded JSON (float64 numbers),
			// and as the inner object must give the same verdict.
			var decoded map[string]any
			if err := json.Unmarshal(raw, &decoded); err != nil {
				t.Fatal(err)
			}
			inner, _ := decoded["error"].(map[string]any)
			vb := ClassifyBytes(f.status, raw)
			for name, v := range map[string]Verdict{
				"Classify(outer)": Classify(f.status, decoded),
				"Classify(inner)": Classify(f.status, inner),
			} {
				if !reflect.DeepEqual(v, vb) {
					t.Errorf("%s = %+v, ClassifyBytes = %+v", name, v, vb)
				}
			}

			v := vb
			if v.HTTPStatus != f.status {
				t.Errorf("HTTPStatus = %d, want %d", v.HTTPStatus, f.status)
			}
			if v.Class != f.class {
				t.Errorf("Class = %q, want %q", v.Class, f.class)
			}
			if v.RetryDelay != f.retry {
				t.Errorf("RetryDelay = %v, want %v", v.RetryDelay, f.retry)
			}
			if v.ZeroQuota != f.zero {
				t.Errorf("ZeroQuota = %v, want %v", v.ZeroQuota, f.zero)
			}
			if !slices.Equal(v.QuotaIDs, f.ids) {
				t.Errorf("QuotaIDs = %q, want %q", v.QuotaIDs, f.ids)
			}
			if v.Reason != f.reason {
				t.Errorf("Reason = %q, want %q", v.Reason, f.reason)
			}
			if !reflect.DeepEqual(v.Quotas, f.quotas) {
				t.Errorf("Quotas = %+v\nwant     %+v", v.Quotas, f.quotas)
			}
			if want, _ := inner["status"].(string); v.Status != want {
				t.Errorf("Status = %q, want %q", v.Status, want)
			}
			if v.Message == "" {
				t.Error("Message is empty")
			}
			if f.summary != "" && v.Summary() != f.summary {
				t.Errorf("Summary() = %q\nwant        %q", v.Summary(), f.summary)
			}
			checkInvariants(t, v)
		})
	}
}

// TestFixturesAllListed keeps testdata/ and the table in step.
func TestFixturesAllListed(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	listed := map[string]bool{}
	for _, f := range fixtures {
		listed[f.file] = true
	}
	for _, p := range files {
		if !listed[filepath.Base(p)] {
			t.Errorf("%s has no row in fixtures", p)
		}
	}
	if len(files) != len(fixtures) {
		t.Errorf("%d files in testdata, %d rows in fixtures", len(files), len(fixtures))
	}
}

func TestRedactSuspendedKey(t *testing.T) {
	raw := readFixture(t, "403_consumer_suspended.json")
	if !strings.Contains(string(raw), fakeKey) {
		t.Fatal("fixture lost its fake key")
	}
	v := ClassifyBytes(403, raw)
	want := "Permission denied: Consumer 'api_key:AIza…' has been suspended."
	if v.Message != want {
		t.Errorf("Message = %q, want %q", v.Message, want)
	}
	for _, s := range []string{v.Message, v.Summary()} {
		if strings.Contains(s, "FAKE") || strings.Contains(s, "AIzaSy") {
			t.Errorf("key not redacted: %q", s)
		}
	}
}

func TestRedact(t *testing.T) {
	key35 := "AIza" + strings.Repeat("x", 35) // a real key's length
	for in, want := range map[string]string{
		"key=" + key35 + "&alt=sse":              "key=AIza…&alt=sse",
		"a " + key35 + "_more-chars b":           "a AIza… b",
		"Consumer 'api_key:whatever' x":          "Consumer 'api_key:AIza…' x",
		"Consumer 'API_KEY:" + fakeKey + "' x":   "Consumer 'API_KEY:AIza…' x",
		"AIza" + strings.Repeat("x", 34) + " ok": "AIza" + strings.Repeat("x", 34) + " ok", // too short to be a key
		"no key here":                            "no key here",
		"the api_key: field":                     "the api_key: field",
		"bad \xff utf8":                          "bad \uFFFD utf8",
	} {
		if got := Redact(in); got != want {
			t.Errorf("Redact(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestMessageTruncation(t *testing.T) {
	// A key straddling the 300-byte cut must not leak partly.
	msg := strings.Repeat("é", 149) + " " + fakeKey + " " + strings.Repeat("z", 500)
	body, _ := json.Marshal(map[string]any{"error": map[string]any{"code": 500, "message": msg, "status": "INTERNAL"}})
	v := ClassifyBytes(500, body)
	if len(v.Message) > MaxMessageBytes {
		t.Errorf("len(Message) = %d > %d", len(v.Message), MaxMessageBytes)
	}
	if !strings.HasSuffix(v.Message, "…") {
		t.Errorf("cut Message does not end in …: %q", v.Message)
	}
	if strings.Contains(v.Message, "FAKE") {
		t.Errorf("key leaked: %q", v.Message)
	}
	checkInvariants(t, v)

	// Many keys shrink under redaction; a key cut where the long message is
	// first cut must not surface in what is left.
	many := strings.Repeat(fakeKey+" ", 40)
	v = Classify(500, map[string]any{"message": many})
	if strings.Contains(v.Message, "FAKE") || leaksKey(v.Message) {
		t.Errorf("key leaked: %q", v.Message)
	}
	for cut := 0; cut < 60; cut++ {
		s := strings.Repeat(fakeKey, 40)[:1264-cut] // keys without separators, cut anywhere
		if got := sanitize(s, MaxMessageBytes); strings.Contains(got, "FAKE") {
			t.Fatalf("cut %d leaked: %q", cut, got)
		}
	}

	long := strings.Repeat("é", 200) // 400 bytes; the cut must fall on a rune boundary
	if got := clip(long, 300); len(got) > 300 || !utf8.ValidString(got) {
		t.Errorf("clip: len %d, valid %v", len(got), utf8.ValidString(got))
	}
}

// TestCases covers statuses and shapes not in the doc's literal bodies.
func TestCases(t *testing.T) {
	newerMsg := "You exceeded your current quota. \n* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 0, model: gemini-2.5-pro\nPlease retry in 38.863719904s."
	cases := []struct {
		name    string
		status  int
		body    any
		class   string
		retry   time.Duration
		zero    bool
		ids     []string
		reason  string
		message string // checked when not empty
		summary string // checked when not empty
	}{
		{name: "network error, nil body", status: 0, body: nil, class: api.ClassNetworkError, summary: "network error"},
		{name: "network error, text", status: 0, body: "dial tcp 127.0.0.1:443: connect: connection refused",
			class: api.ClassNetworkError, summary: "network error: dial tcp 127.0.0.1:443: connect: connection refused"},
		{name: "success", status: 200, body: map[string]any{"candidates": []any{}}, class: api.ClassSuccess, summary: "200 ok"},
		{name: "success 204", status: 204, class: api.ClassSuccess},
		{name: "402 prepay depleted", status: 402,
			body:  map[string]any{"error": map[string]any{"code": 402, "message": "Your prepayment credits are depleted.", "status": "RESOURCE_EXHAUSTED"}},
			class: api.ClassBilling, summary: "402 billing: Your prepayment credits are depleted."},
		{name: "429 newer format, message only: retry from message", status: 429,
			body:  map[string]any{"error": map[string]any{"code": 429, "message": newerMsg, "status": "RESOURCE_EXHAUSTED"}},
			class: api.ClassQuotaZero, retry: 38863719904 * time.Nanosecond, zero: true},
		{name: "429 newer format, message limit 20 only", status: 429,
			body:  map[string]any{"message": strings.Replace(newerMsg, "limit: 0", "limit: 20", 1)},
			class: api.ClassRateMinute, retry: 38863719904 * time.Nanosecond},
		{name: "429 quotaValue number 0", status: 429,
			body: map[string]any{"details": []any{map[string]any{"@type": TypeQuotaFailure, "violations": []any{
				map[string]any{"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier", "quotaValue": 0.0}}}}},
			class: api.ClassQuotaZero, zero: true, ids: []string{"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}},
		{name: "429 zero beats day beats minute", status: 429,
			body: map[string]any{"details": []any{map[string]any{"@type": TypeQuotaFailure, "violations": []any{
				map[string]any{"quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "quotaValue": "5"},
				map[string]any{"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier", "quotaValue": "20"},
				map[string]any{"quotaId": "GenerateContentInputTokensPerModelPerMinute-FreeTier", "quotaValue": "0"}}}}},
			class: api.ClassQuotaZero, zero: true, ids: []string{
				"GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
				"GenerateRequestsPerDayPerProjectPerModel-FreeTier",
				"GenerateContentInputTokensPerModelPerMinute-FreeTier"},
			summary: "429 zero quota GenerateRequestsPerMinutePerProjectPerModel-FreeTier, GenerateRequestsPerDayPerProjectPerModel-FreeTier, GenerateContentInputTokensPerModelPerMinute-FreeTier: not available to this project"},
		{name: "429 paid-tier TPM", status: 429,
			body: map[string]any{"details": []any{map[string]any{"@type": TypeQuotaFailure, "violations": []any{
				map[string]any{"quotaId": "GenerateContentPaidTierInputTokensPerModelPerMinute", "quotaValue": "1000000"}}},
				map[string]any{"@type": TypeRetryInfo, "retryDelay": "12.5s"}}},
			class: api.ClassRateMinute, retry: 12500 * time.Millisecond, ids: []string{"GenerateContentPaidTierInputTokensPerModelPerMinute"}},
		{name: "429 RetryInfo wins over message", status: 429,
			body: map[string]any{"message": "Please retry in 99s.", "details": []any{
				map[string]any{"@type": TypeRetryInfo, "retryDelay": "3s"}}},
			class: api.ClassCapacity, retry: 3 * time.Second},
		{name: "429 unknown quota window is per-minute", status: 429,
			body: map[string]any{"details": []any{map[string]any{"@type": TypeQuotaFailure, "violations": []any{
				map[string]any{"quotaId": "SpendPerProject"}}}}},
			class: api.ClassRateMinute, ids: []string{"SpendPerProject"}},
		{name: "429 tokens per day", status: 429,
			body: map[string]any{"details": []any{map[string]any{"@type": TypeQuotaFailure, "violations": []any{
				map[string]any{"quotaId": "GenerateContentInputTokensPerModelPerDay"}}}}},
			class: api.ClassRateDay, ids: []string{"GenerateContentInputTokensPerModelPerDay"}},
		{name: "429 RATE_LIMIT_EXCEEDED alone", status: 429,
			body:  map[string]any{"details": []any{map[string]any{"@type": TypeErrorInfo, "reason": "RATE_LIMIT_EXCEEDED"}}},
			class: api.ClassRateMinute, reason: "RATE_LIMIT_EXCEEDED"},
		{name: "429 Help only is capacity", status: 429,
			body: map[string]any{"message": "You exceeded your current quota, please check your plan and billing details.", "details": []any{
				map[string]any{"@type": TypeHelp, "links": []any{}}}},
			class: api.ClassCapacity},
		{name: "429 PREPAYMENT CREDITS any case", status: 429,
			body: map[string]any{"message": "PREPAYMENT CREDITS DEPLETED"}, class: api.ClassBilling},
		{name: "429 nil body", status: 429, class: api.ClassCapacity, summary: "429 capacity"},
		{name: "400 message only, key not valid", status: 400,
			body: map[string]any{"message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT"}, class: api.ClassKeyInvalid},
		{name: "400 API_KEY_EXPIRED", status: 400,
			body:  map[string]any{"message": "API key expired. Please renew the API key.", "details": []any{map[string]any{"@type": TypeErrorInfo, "reason": "API_KEY_EXPIRED"}}},
			class: api.ClassKeyInvalid, reason: "API_KEY_EXPIRED"},
		{name: "400 FAILED_PRECONDITION", status: 400,
			body:  map[string]any{"error": map[string]any{"code": 400, "message": "User location is not supported for the API use.", "status": "FAILED_PRECONDITION"}},
			class: api.ClassClientError, summary: "400 FAILED_PRECONDITION: User location is not supported for the API use."},
		{name: "401", status: 401, class: api.ClassClientError, summary: "401 unauthorized"},
		{name: "403 no body", status: 403, class: api.ClassKeyDenied},
		{name: "499 cancelled", status: 499, body: map[string]any{"status": "CANCELLED", "message": "The operation was cancelled."}, class: api.ClassClientError},
		{name: "504", status: 504, body: map[string]any{"status": "DEADLINE_EXCEEDED"}, class: api.ClassServerError, summary: "504 DEADLINE_EXCEEDED"},
		{name: "302 is a server error", status: 302, class: api.ClassServerError},
		{name: "negative status", status: -1, class: api.ClassServerError},

		// Odd shapes.
		{name: "details is an object", status: 429,
			body: map[string]any{"details": map[string]any{"@type": TypeQuotaFailure, "violations": map[string]any{
				"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}}},
			class: api.ClassRateDay, ids: []string{"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}},
		{name: "details is a string", status: 429, body: map[string]any{"details": "nope", "message": 42}, class: api.ClassCapacity},
		{name: "details without @type", status: 429,
			body: map[string]any{"details": []any{
				map[string]any{"violations": []any{map[string]any{"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}}},
				map[string]any{"retryDelay": "4.2s"}, "junk", nil, 7.0}},
			class: api.ClassRateDay, retry: 4200 * time.Millisecond, ids: []string{"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}},
		{name: "retryDelay as object", status: 429,
			body:  map[string]any{"details": []any{map[string]any{"@type": TypeRetryInfo, "retryDelay": map[string]any{"seconds": "7", "nanos": 5e8}}}},
			class: api.ClassCapacity, retry: 7500 * time.Millisecond},
		{name: "retryDelay as number", status: 429,
			body:  map[string]any{"details": []any{map[string]any{"@type": TypeRetryInfo, "retryDelay": 9.0}}},
			class: api.ClassCapacity, retry: 9 * time.Second},
		{name: "retryDelay negative or garbage", status: 429,
			body: map[string]any{"details": []any{
				map[string]any{"@type": TypeRetryInfo, "retryDelay": "-5s"},
				map[string]any{"@type": TypeRetryInfo, "retryDelay": "soon"},
				map[string]any{"@type": TypeRetryInfo, "retryDelay": "99999999999999999999s"}}},
			class: api.ClassCapacity},
		{name: "quotaValue as string with spaces", status: 429,
			body: map[string]any{"details": []any{map[string]any{"@type": TypeQuotaFailure, "violations": []any{
				map[string]any{"quotaId": "X", "quotaValue": " 0 "}}}}},
			class: api.ClassQuotaZero, zero: true, ids: []string{"X"}},
		{name: "error is a string", status: 503, body: map[string]any{"error": "upstream connect error"},
			class: api.ClassServerError, message: "upstream connect error"},
		{name: "array-wrapped body (stream without alt=sse)", status: 429,
			body:  []any{map[string]any{"error": map[string]any{"code": 429.0, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED"}}},
			class: api.ClassCapacity, message: "Resource has been exhausted (e.g. check quota)."},
		{name: "client wrapper holding the body as a JSON string", status: 429,
			body: map[string]any{"error": map[string]any{"code": 429, "status": "Too Many Requests",
				"message": `{"error":{"code":429,"message":"m","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}]}}`}},
			class: api.ClassRateDay, ids: []string{"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}, message: "m"},
		{name: "typed ErrorBody", status: 400,
			body: ErrorBody{Error: ErrorDetail{Code: 400, Message: "API key not valid. Please pass a valid API key.", Status: "INVALID_ARGUMENT",
				Details: []any{ErrorInfo{Reason: "API_KEY_INVALID", Domain: "googleapis.com"}}}},
			class: api.ClassKeyInvalid, reason: "API_KEY_INVALID"},
		{name: "pointer to ErrorBody", status: 429,
			body: &ErrorBody{Error: ErrorDetail{Code: 429, Status: "RESOURCE_EXHAUSTED",
				Details: []any{QuotaFailure{Violations: []QuotaViolation{{QuotaID: "GenerateRequestsPerDayPerProjectPerModel-FreeTier", QuotaValue: "20"}}}, RetryInfo{RetryDelay: "22s"}}}},
			class: api.ClassRateDay, retry: 22 * time.Second, ids: []string{"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}},
		{name: "json.RawMessage", status: 403, body: json.RawMessage(`{"error":{"code":403,"message":"leaked","status":"PERMISSION_DENIED"}}`),
			class: api.ClassKeyDenied, message: "leaked"},
		{name: "number body", status: 500, body: 3.0, class: api.ClassServerError},
		{name: "unencodable body", status: 500, body: func() {}, class: api.ClassServerError},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			v := Classify(c.status, c.body)
			if v.Class != c.class {
				t.Errorf("Class = %q, want %q", v.Class, c.class)
			}
			if v.RetryDelay != c.retry {
				t.Errorf("RetryDelay = %v, want %v", v.RetryDelay, c.retry)
			}
			if v.ZeroQuota != c.zero {
				t.Errorf("ZeroQuota = %v, want %v", v.ZeroQuota, c.zero)
			}
			if !slices.Equal(v.QuotaIDs, c.ids) {
				t.Errorf("QuotaIDs = %q, want %q", v.QuotaIDs, c.ids)
			}
			if v.Reason != c.reason {
				t.Errorf("Reason = %q, want %q", v.Reason, c.reason)
			}
			if c.message != "" && v.Message != c.message {
				t.Errorf("Message = %q, want %q", v.Message, c.message)
			}
			if c.summary != "" && v.Summary() != c.summary {
				t.Errorf("Summary() = %q\nwant        %q", v.Summary(), c.summary)
			}
			checkInvariants(t, v)
		})
	}
}

// TestQuotas checks each violation's dimension and quotaValue: the doc's
// bodies not in testdata/, quota ids of every window, and odd values.
func TestQuotas(t *testing.T) {
	violation := func(id string, value any) map[string]any {
		v := map[string]any{"quotaId": id, "quotaDimensions": map[string]any{"location": "global", "model": "gemini-2.5-flash"}}
		if value != nil {
			v["quotaValue"] = value
		}
		return v
	}
	body := func(vs ...any) map[string]any {
		return map[string]any{"error": map[string]any{"code": 429, "status": "RESOURCE_EXHAUSTED", "details": []any{
			map[string]any{"@type": TypeQuotaFailure, "violations": vs},
			map[string]any{"@type": TypeRetryInfo, "retryDelay": "22s"}}}}
	}
	const (
		rpm = "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
		rpd = "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
		tpm = "GenerateContentInputTokensPerModelPerMinute-FreeTier"
	)
	flash := func(id, dim string, value int64, has bool) Quota {
		return Quota{ID: id, Dimension: dim, Model: "gemini-2.5-flash", Value: value, HasValue: has}
	}
	cases := []struct {
		name string
		body any
		want []Quota
	}{
		// shared/gemini-api.md: the Dec 2025 free tier, a live 429 with quotaValue "20".
		{"free tier rpd 20", body(violation(rpd, "20")), []Quota{flash(rpd, QuotaRPD, 20, true)}},
		{"free tier rpm 5", body(violation(rpm, "5")), []Quota{flash(rpm, QuotaRPM, 5, true)}},
		{"paid tier tpm", body(violation("GenerateContentPaidTierInputTokensPerModelPerMinute", "1000000")),
			[]Quota{flash("GenerateContentPaidTierInputTokensPerModelPerMinute", QuotaTPM, 1000000, true)}},
		// python-genai#2044 with values: every violation, in order.
		{"day, minute and tpm at once", body(violation(rpd, "200"), violation(rpm, "15"), violation(tpm, "1000000")),
			[]Quota{flash(rpd, QuotaRPD, 200, true), flash(rpm, QuotaRPM, 15, true), flash(tpm, QuotaTPM, 1000000, true)}},
		{"tokens per day is no keys.json limit", body(violation("GenerateContentInputTokensPerModelPerDay", "5000000")),
			[]Quota{flash("GenerateContentInputTokensPerModelPerDay", "", 5000000, true)}},
		{"output tokens per minute is not tpm", body(violation("GenerateContentOutputTokensPerModelPerMinute", "8000")),
			[]Quota{flash("GenerateContentOutputTokensPerModelPerMinute", "", 8000, true)}},
		{"spend", body(violation("SpendPerProject", "10")), []Quota{flash("SpendPerProject", "", 10, true)}},
		{"window only in the metric", body(map[string]any{
			"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests_per_minute", "quotaValue": "7"}),
			[]Quota{{Dimension: QuotaRPM, Value: 7, HasValue: true}}},
		{"metric without a window", body(map[string]any{
			"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests", "quotaValue": "20"}),
			[]Quota{{Value: 20, HasValue: true}}},
		{"quotaDimensions not an object", body(map[string]any{"quotaId": rpm, "quotaDimensions": "gemini-2.5-flash", "quotaValue": "5"}),
			[]Quota{{ID: rpm, Dimension: QuotaRPM, Value: 5, HasValue: true}}},

		// Odd values.
		{"missing", body(violation(rpm, nil)), []Quota{flash(rpm, QuotaRPM, 0, false)}},
		{"empty", body(violation(rpm, "")), []Quota{flash(rpm, QuotaRPM, 0, false)}},
		{"null", body(map[string]any{"quotaId": rpm, "quotaValue": nil}), []Quota{{ID: rpm, Dimension: QuotaRPM}}},
		{"zero", body(violation(rpm, "0")), []Quota{flash(rpm, QuotaRPM, 0, true)}},
		{"spaces", body(violation(rpd, " 20 ")), []Quota{flash(rpd, QuotaRPD, 20, true)}},
		{"non-numeric", body(violation(rpm, "five")), []Quota{flash(rpm, QuotaRPM, 0, false)}},
		{"number", body(violation(rpm, 5.0)), []Quota{flash(rpm, QuotaRPM, 5, true)}},
		{"json.Number", body(violation(tpm, json.Number("250000"))), []Quota{flash(tpm, QuotaTPM, 250000, true)}},
		{"whole float string", body(violation(rpm, "5.0")), []Quota{flash(rpm, QuotaRPM, 5, true)}},
		{"exponent", body(violation(tpm, "2.5e5")), []Quota{flash(tpm, QuotaTPM, 250000, true)}},
		{"fractional", body(violation(rpm, "5.5")), []Quota{flash(rpm, QuotaRPM, 0, false)}},
		{"fractional number", body(violation(rpm, 0.5)), []Quota{flash(rpm, QuotaRPM, 0, false)}},
		{"negative", body(violation(rpm, "-5")), []Quota{flash(rpm, QuotaRPM, 0, false)}},
		{"negative number", body(violation(rpm, -5.0)), []Quota{flash(rpm, QuotaRPM, 0, false)}},
		{"plus sign", body(violation(rpm, "+5")), []Quota{flash(rpm, QuotaRPM, 0, false)}},
		{"hex", body(violation(rpm, "0x10")), []Quota{flash(rpm, QuotaRPM, 0, false)}},
		{"underscores", body(violation(rpm, "1_000")), []Quota{flash(rpm, QuotaRPM, 0, false)}},
		{"infinity", body(violation(rpm, "Infinity")), []Quota{flash(rpm, QuotaRPM, 0, false)}},
		{"nan", body(violation(rpm, "NaN")), []Quota{flash(rpm, QuotaRPM, 0, false)}},
		{"bool", body(violation(rpm, true)), []Quota{flash(rpm, QuotaRPM, 0, false)}},
		{"object", body(violation(rpm, map[string]any{"value": 5})), []Quota{flash(rpm, QuotaRPM, 0, false)}},
		{"max int64", body(violation(tpm, "9223372036854775807")), []Quota{flash(tpm, QuotaTPM, math.MaxInt64, true)}},
		{"above int64", body(violation(tpm, "9223372036854775808")), []Quota{flash(tpm, QuotaTPM, 0, false)}},
		{"huge", body(violation(tpm, "99999999999999999999")), []Quota{flash(tpm, QuotaTPM, 0, false)}},
		{"huge exponent", body(violation(tpm, "1e300")), []Quota{flash(tpm, QuotaTPM, 0, false)}},
		{"huge number", body(violation(tpm, 1e20)), []Quota{flash(tpm, QuotaTPM, 0, false)}},
		{"very long digits", body(violation(tpm, strings.Repeat("9", 500))), []Quota{flash(tpm, QuotaTPM, 0, false)}},

		// Legacy ErrorInfo values, and no quota without a limit or a value.
		{"legacy value only", map[string]any{"message": "Quota exceeded for quota metric 'Generate Content API requests per minute'",
			"details": []any{map[string]any{"@type": TypeErrorInfo, "reason": "RATE_LIMIT_EXCEEDED",
				"metadata": map[string]any{"quota_limit_value": "60"}}}},
			[]Quota{{Dimension: QuotaRPM, Value: 60, HasValue: true}}},
		{"RATE_LIMIT_EXCEEDED alone", map[string]any{"details": []any{map[string]any{"@type": TypeErrorInfo, "reason": "RATE_LIMIT_EXCEEDED"}}}, nil},
		{"no details", map[string]any{"message": "Resource has been exhausted (e.g. check quota)."}, nil},
		// The message's "limit: N" lines do not say their window: not quotas.
		{"message lines", map[string]any{"message": "* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 20, model: gemini-2.5-flash"}, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			v := Classify(429, c.body)
			if !reflect.DeepEqual(v.Quotas, c.want) {
				t.Errorf("Quotas = %+v\nwant     %+v", v.Quotas, c.want)
			}
			// The same body as bytes reads the same (numbers as json.Number).
			if raw, err := json.Marshal(c.body); err == nil {
				if vb := ClassifyBytes(429, raw); !reflect.DeepEqual(vb.Quotas, c.want) {
					t.Errorf("ClassifyBytes: Quotas = %+v\nwant     %+v", vb.Quotas, c.want)
				}
			}
			checkInvariants(t, v)
		})
	}

	// A raw JSON number too large for a float64's integers stays exact.
	raw := `{"error":{"code":429,"details":[{"@type":"` + TypeQuotaFailure + `","violations":[{"quotaId":"` + tpm +
		`","quotaValue":9223372036854775807},{"quotaId":"` + rpm + `","quotaValue":1e2}]}]}}`
	want := []Quota{{ID: tpm, Dimension: QuotaTPM, Value: math.MaxInt64, HasValue: true}, {ID: rpm, Dimension: QuotaRPM, Value: 100, HasValue: true}}
	if v := ClassifyBytes(429, []byte(raw)); !reflect.DeepEqual(v.Quotas, want) {
		t.Errorf("raw numbers: Quotas = %+v, want %+v", v.Quotas, want)
	}

	// Quota ids and models are redacted like every other field.
	v := Classify(429, body(map[string]any{"quotaId": "q " + fakeKey, "quotaDimensions": map[string]any{"model": fakeKey}, "quotaValue": "1"}))
	if len(v.Quotas) != 1 || strings.Contains(v.Quotas[0].ID+v.Quotas[0].Model, "FAKE") {
		t.Errorf("key not redacted: %+v", v.Quotas)
	}
}

func TestClassifyBytesNonJSON(t *testing.T) {
	for _, c := range []struct {
		status  int
		body    string
		class   string
		message string
	}{
		{502, "  <html><body>Bad Gateway</body></html>\n", api.ClassServerError, "<html><body>Bad Gateway</body></html>"},
		{429, "", api.ClassCapacity, ""},
		{429, "Your prepayment credits are depleted.", api.ClassBilling, "Your prepayment credits are depleted."},
		{400, `{"error": truncated`, api.ClassClientError, `{"error": truncated`},
		{503, `{"error":{"message":"a"}} {"trailing":1}`, api.ClassServerError, `{"error":{"message":"a"}} {"trailing":1}`},
		{0, "connection reset by peer", api.ClassNetworkError, "connection reset by peer"},
		{429, "Quota exceeded for metric: x, limit: 0, model: m\nPlease retry in 2s.", api.ClassQuotaZero, "Quota exceeded for metric: x, limit: 0, model: m\nPlease retry in 2s."},
	} {
		v := ClassifyBytes(c.status, []byte(c.body))
		if v.Class != c.class || v.Message != c.message {
			t.Errorf("ClassifyBytes(%d, %q) = %q %q, want %q %q", c.status, c.body, v.Class, v.Message, c.class, c.message)
		}
		checkInvariants(t, v)
	}
	if v := ClassifyBytes(429, []byte("Please retry in 2s.")); v.RetryDelay != 2*time.Second {
		t.Errorf("retry delay from a text body: %v", v.RetryDelay)
	}
}

func TestClassifyBytesSSE(t *testing.T) {
	raw := readFixture(t, "429_rpd.json")
	body := "data: " + strings.ReplaceAll(string(raw), "\n", "") + "\r\n\r\n"
	if v := ClassifyBytes(429, []byte(body)); v.Class != api.ClassRateDay || v.RetryDelay != 22*time.Second {
		t.Errorf("SSE-framed body: %+v", v)
	}
}

// TestBuildClassicBody builds the doc's classic 429 with the ErrorBody types
// and checks it equals the literal fixture as JSON.
func TestBuildClassicBody(t *testing.T) {
	b := ErrorBody{Error: ErrorDetail{
		Code:    429,
		Message: "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
		Status:  "RESOURCE_EXHAUSTED",
		Details: []any{
			QuotaFailure{Violations: []QuotaViolation{{
				QuotaMetric:     "generativelanguage.googleapis.com/generate_content_free_tier_input_token_count",
				QuotaID:         "GenerateContentInputTokensPerModelPerMinute-FreeTier",
				QuotaDimensions: map[string]string{"location": "global", "model": "gemini-2.5-flash"},
				QuotaValue:      "250000",
			}}},
			Help{Links: []HelpLink{{Description: "Learn more about Gemini API quotas", URL: "https://ai.google.dev/gemini-api/docs/rate-limits"}}},
			RetryInfo{RetryDelay: FormatDuration(26 * time.Second)},
		},
	}}
	got, err := json.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(got), `{"error":{"code":429,"message":`) || !strings.Contains(string(got), `{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":`) {
		t.Errorf("unexpected encoding: %s", got)
	}
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(readFixture(t, "429_classic_tpm.json"), &w); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(g, w) {
		t.Errorf("built body differs from fixture:\n got %s", got)
	}

	// The other detail types carry their @type too.
	for _, c := range []struct {
		v   any
		typ string
	}{
		{ErrorInfo{Reason: "API_KEY_INVALID"}, TypeErrorInfo},
		{LocalizedMessage{Locale: "en-US"}, TypeLocalizedMessage},
		{RetryInfo{RetryDelay: "1s"}, TypeRetryInfo},
		{&QuotaFailure{Violations: nil}, TypeQuotaFailure},
		{&Help{Links: []HelpLink{{URL: "u"}}}, TypeHelp},
		{&ErrorInfo{Metadata: map[string]string{"consumer": "projects/1"}}, TypeErrorInfo},
	} {
		v, typ := c.v, c.typ
		enc, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := json.Unmarshal(enc, &m); err != nil || m["@type"] != typ {
			t.Errorf("%T encodes as %s", v, enc)
		}
	}
}

func TestFormatDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		26 * time.Second:              "26s",
		38863719904 * time.Nanosecond: "38.863719904s",
		500 * time.Millisecond:        "0.5s",
		time.Nanosecond:               "0.000000001s",
		0:                             "0s",
		-time.Second:                  "0s",
		65205 * time.Second:           "65205s",
	} {
		if got := FormatDuration(d); got != want {
			t.Errorf("FormatDuration(%v) = %q, want %q", d, got, want)
		}
		if d > 0 {
			if back, ok := parseProtoDuration(FormatDuration(d)); !ok || back != d {
				t.Errorf("round trip of %v gave %v %v", d, back, ok)
			}
		}
	}
}

// checkInvariants asserts what every Verdict promises.
func checkInvariants(t testing.TB, v Verdict) {
	t.Helper()
	known := []string{api.ClassSuccess, api.ClassRateMinute, api.ClassRateDay, api.ClassQuotaZero, api.ClassCapacity,
		api.ClassBilling, api.ClassKeyInvalid, api.ClassKeyDenied, api.ClassClientError, api.ClassServerError, api.ClassNetworkError}
	if !slices.Contains(known, v.Class) {
		t.Errorf("Class %q is not a known class", v.Class)
	}
	if v.RetryDelay < 0 {
		t.Errorf("RetryDelay %v < 0", v.RetryDelay)
	}
	if len(v.Message) > MaxMessageBytes || !utf8.ValidString(v.Message) {
		t.Errorf("Message: len %d, valid UTF-8 %v", len(v.Message), utf8.ValidString(v.Message))
	}
	if (v.Class == api.ClassQuotaZero) && !v.ZeroQuota {
		t.Error("ClassQuotaZero without ZeroQuota")
	}
	s := v.Summary()
	if s == "" || strings.ContainsAny(s, "\r\n") || !utf8.ValidString(s) {
		t.Errorf("Summary() = %q: want one non-empty line", s)
	}
	all := append([]string{v.Message, v.Status, v.Reason, s}, v.QuotaIDs...)
	for _, q := range v.Quotas {
		all = append(all, q.ID, q.Model)
		switch q.Dimension {
		case "", QuotaRPM, QuotaTPM, QuotaRPD:
		default:
			t.Errorf("quota dimension %q", q.Dimension)
		}
		if q.Value < 0 || !q.HasValue && q.Value != 0 {
			t.Errorf("quota value %d, HasValue %v", q.Value, q.HasValue)
		}
	}
	for _, x := range all {
		if leaksKey(x) {
			t.Errorf("unredacted text: %q", x)
		}
	}
}

// leaksKey reports whether s holds an API key or a consumer token that is
// not (a cut-off prefix of) the redaction.
func leaksKey(s string) bool {
	if apiKeyRe.MatchString(s) {
		return true
	}
	for _, m := range consumerRe.FindAllString(s, -1) {
		tok := m[len("api_key:"):]
		if tok != RedactedKey && !(strings.HasSuffix(tok, "…") && strings.HasPrefix(RedactedKey, strings.TrimSuffix(tok, "…"))) {
			return true
		}
	}
	return false
}

func FuzzClassifyBytes(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "*.json"))
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(429, b)
	}
	for _, s := range []string{
		"", "null", "[]", "[[[[]]]]", `{"error":null}`, `{"error":[{"error":"x"}]}`, `"{\"error\":{}}"`,
		`{"error":{"details":{"violations":"x"}}}`, `{"details":[{"retryDelay":{"seconds":1e300}}]}`,
		`{"message":"Please retry in 1e9s limit: 0. limit:"}`, "data: {}", "\xff\xfe",
		`{"error":{"message":"{\"error\":{\"message\":\"{\\\"error\\\":{}}\"}}"}}`,
	} {
		f.Add(429, []byte(s))
		f.Add(400, []byte(s))
	}
	f.Fuzz(func(t *testing.T, status int, body []byte) {
		checkInvariants(t, ClassifyBytes(status, body))
		checkInvariants(t, Classify(status, string(body)))
	})
}
