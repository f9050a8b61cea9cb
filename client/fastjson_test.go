package client

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/fastjson"
)

func TestAppendMatchesMarshal(t *testing.T) {
	// An added field must be added to the encoders and this test.
	if n := reflect.TypeFor[api.LeaseRequest]().NumField(); n != 5 {
		t.Fatalf("api.LeaseRequest has %d fields: update appendLeaseRequest and this test", n)
	}
	if n := reflect.TypeFor[api.ReportRequest]().NumField(); n != 4 {
		t.Fatalf("api.ReportRequest has %d fields: update appendReportRequest and this test", n)
	}
	leases := []api.LeaseRequest{
		{Model: "gemini-2.5-flash", Tokens: 1000, Client: "bench"},
		{Model: "m", Tokens: 10, WorkloadType: "light", WaitMS: 1500, Client: "t"},
		{}, {Tokens: -1}, {WaitMS: 1 << 62}, {WorkloadType: "w"}, {Client: " c "},
		{Model: "a<b"}, {Model: "é"}, {Client: `q"`}, {WorkloadType: "\x7f"}, {Client: "\n"},
	}
	for _, r := range leases {
		got, ok := appendLeaseRequest(nil, &r)
		want, err := json.Marshal(&r)
		if err != nil {
			t.Fatal(err)
		}
		if ok && string(got) != string(want) {
			t.Errorf("%+v:\n got %s\nwant %s", r, got, want)
		}
		if !ok && fastjson.Plain(r.Model+r.WorkloadType+r.Client) {
			t.Errorf("%+v declined", r)
		}
	}
	reports := []api.ReportRequest{
		{Status: 200, Usage: &api.Usage{PromptTokens: 900, OutputTokens: 100}},
		{Status: 200, Usage: &api.Usage{PromptTokens: 1, OutputTokens: 2, TotalTokens: 3}},
		{Status: 200, Usage: &api.Usage{}}, {Status: 200, Usage: &api.Usage{TotalTokens: 7}},
		{Outcome: api.OutcomeUnused}, {Outcome: "x", Status: 5}, {}, {Status: -1},
		{Outcome: "<"}, {Status: 429, Error: json.RawMessage(`{"error":{"code":429}}`)},
		{Status: 500, Error: "boom"},
	}
	for _, r := range reports {
		got, ok := appendReportRequest(nil, &r)
		want, err := json.Marshal(&r)
		if err != nil {
			t.Fatal(err)
		}
		if ok && string(got) != string(want) {
			t.Errorf("%+v:\n got %s\nwant %s", r, got, want)
		}
		if !ok && r.Error == nil && fastjson.Plain(r.Outcome) {
			t.Errorf("%+v declined", r)
		}
	}
}

// Answers that probe where the fast decoders stop and encoding/json takes
// over. They seed the fuzz targets too.
var leaseAnswers = []string{
	`{"lease_id":"l1","key_id":"k1","project":"p","model":"m","secret":"AIza-x_y","tokens":1000,"expires_at":"2026-11-29T14:03:04.56789Z"}` + "\n",
	`{"lease_id":"l1","key_id":"k1","project":"p","model":"m","secret":"s","tokens":1,"expires_at":"2026-11-29T14:03:04-07:30"}`,
	`{}`, ` { } `, `{"lease_id":"l1"}`, `{"lease_id":"l1","lease_id":"l2"}`, `{"Lease_ID":"l1"}`, `{"extra":1}`,
	`{"secret":"a\"b"}`, `{"secret":"a\u0041"}`, `{"secret":"é"}`, `{"secret":null}`, `{"tokens":null}`,
	`{"tokens":1.0}`, `{"tokens":1e3}`, `{"tokens":-0}`, `{"tokens":01}`, `{"tokens":"1"}`,
	`{"tokens":9223372036854775808}`, `{"tokens":-9223372036854775808}`,
	`{"expires_at":"2026-11-29"}`, `{"expires_at":"2026-11-29T14:03:04Z"}`, `{"expires_at":"2026-11-29T24:00:00Z"}`,
	`{"expires_at":"2026-11-29t14:03:04z"}`, `{"expires_at":null}`, `{"expires_at":5}`, `{"expires_at":""}`,
	`{"lease_id":"l1"}x`, `{"lease_id":"l1"} {}`, `{"lease_id":"l1",}`, `{"lease_id":"l1"`, `[]`, ``, `null`,
}

var reportAnswers = []string{
	`{"lease_id":"l1","key_id":"k1","classification":"success"}` + "\n",
	`{"lease_id":"l1","key_id":"k1","classification":"rate_minute","action":"bucket p/m cooling for 1m0s","duplicate":true}`,
	`{"duplicate":false}`, `{"duplicate":true }`, `{"duplicate":tru}`, `{"duplicate":truex}`, `{"duplicate":null}`,
	`{"duplicate":1}`, `{"duplicate":"true"}`, `{"action":"a \u003cb\u003e"}`, `{"Action":"x"}`, `{"classification":1}`,
	`{"lease_id":"a","lease_id":"b"}`, `{"x":true}`, `{}`, `{"duplicate":false}x`,
}

// checkAnswer checks that decoding body as the client does gives what
// json.Unmarshal alone gives, and that whatever the fast parser accepts,
// json.Unmarshal decodes without error to the same value.
func checkAnswer[T any](t *testing.T, body string, parse func([]byte, *T) bool) {
	t.Helper()
	var fast T
	if parse([]byte(body), &fast) {
		var v T
		if err := json.Unmarshal([]byte(body), &v); err != nil || !reflect.DeepEqual(v, fast) {
			t.Fatalf("%q: the fast decoder accepted %+v; encoding/json: %+v, %v", body, fast, v, err)
		}
	}
	got, gotErr := decodeAnswer([]byte(body), parse)
	var want T
	wantErr := json.Unmarshal([]byte(body), &want)
	if !reflect.DeepEqual(*got, want) || !reflect.DeepEqual(gotErr, wantErr) {
		t.Fatalf("%q: got %+v, %v; encoding/json alone: %+v, %v", body, *got, gotErr, want, wantErr)
	}
}

func TestFastDecodersAgreeWithUnmarshal(t *testing.T) {
	for _, body := range leaseAnswers {
		checkAnswer(t, body, parseLease)
	}
	for _, body := range reportAnswers {
		checkAnswer(t, body, parseReportResponse)
	}
	// What keyd writes takes the fast path.
	var l api.Lease
	if !parseLease([]byte(leaseAnswers[0]), &l) {
		t.Error("a plain lease was declined")
	}
	if l.Secret != "AIza-x_y" || l.ExpiresAt.Nanosecond() != 567890000 {
		t.Errorf("lease = %+v", l)
	}
	var r api.ReportResponse
	if !parseReportResponse([]byte(reportAnswers[1]), &r) || !r.Duplicate {
		t.Errorf("a plain report answer was declined, or decoded as %+v", r)
	}
}

func FuzzParseLease(f *testing.F) {
	for _, b := range leaseAnswers {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, body string) { checkAnswer(t, body, parseLease) })
}

func FuzzParseReportResponse(f *testing.F) {
	for _, b := range reportAnswers {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, body string) { checkAnswer(t, body, parseReportResponse) })
}

func TestLeaseAnswerStringsDoNotAliasTheBuffer(t *testing.T) {
	b := []byte(leaseAnswers[0])
	var l api.Lease
	if !parseLease(b, &l) {
		t.Fatal("declined")
	}
	clear(b) // as do does before pooling the buffer
	if l.LeaseID != "l1" || l.Secret != "AIza-x_y" || l.Model != "m" {
		t.Errorf("lease = %+v after the buffer was cleared", l)
	}
	if !strings.HasPrefix(l.ExpiresAt.String(), "2026-11-29 14:03:04.56789") {
		t.Errorf("expires_at = %v", l.ExpiresAt)
	}
}
