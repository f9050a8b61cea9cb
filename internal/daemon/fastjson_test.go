package daemon

import (
	"bytes"
	"encoding/json"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/fastjson"
)

// Bodies that probe where the fast decoders stop and encoding/json takes
// over. They seed the fuzz targets too.
var leaseBodies = []string{
	`{"model":"m"}`,
	`{"model":"m","tokens":5,"wait_ms":100,"workload_type":"w","client":"c"}`,
	" \t\r\n{ \"model\" : \"m\" , \"tokens\" : 0 } \n",
	`{}`, `{ }`, `{"model":""}`, `{"model":"m",}`, `{"model":"m"`, `{"model":"m"}}`, `{"model" "m"}`,
	`{"model":"m","model":"n"}`, `{"Model":"m"}`, `{"MODEL":"m"}`, `{"modeL":"m","model":"n"}`,
	`{"model":"m\u00e9"}`, `{"model":"m\"x"}`, `{"model":"m\\x"}`, "{\"model\":\"m\x7f\"}", "{\"model\":\"m\xff\"}",
	"{\"model\":\"é\"}", "{\"model\":\"m\tx\"}",
	`{"model":"m","tokens":-0}`, `{"model":"m","tokens":01}`, `{"model":"m","tokens":1e3}`, `{"model":"m","tokens":1.0}`,
	`{"model":"m","tokens":1E3}`, `{"model":"m","tokens":-}`, `{"model":"m","tokens":+1}`, `{"model":"m","tokens":"5"}`,
	`{"model":"m","tokens":9223372036854775807}`, `{"model":"m","tokens":9223372036854775808}`,
	`{"model":"m","tokens":-9223372036854775808}`, `{"model":"m","tokens":-1}`, `{"model":"m","tokens":null}`,
	`{"model":null}`, `{"model":"m","wait_ms":600000}`, `{"model":"m","wait_ms":600001}`, `{"model":"m","extra":1}`,
	`{"model":"m"}x`, `{"model":"m"} {}`, `[]`, ``, ` `, `null`, `"m"`, "\ufeff{\"model\":\"m\"}",
	`{"model":"m","client":"` + strings.Repeat("c", 3000) + `"}`,
	`{"model":"m","client":"` + strings.Repeat("c", 3000) + `"}x`,
	`{"model":"m"}` + strings.Repeat(" ", 3000),
}

var reportBodies = []string{
	`{"status":200,"usage":{"prompt_tokens":5}}`,
	`{"status":200,"usage":{"prompt_tokens":900,"output_tokens":100,"total_tokens":1000}}`,
	`{"outcome":"unused"}`, `{"outcome":"sent"}`, `{"status":0}`, `{}`, `{"status":700}`, `{"status":99}`,
	`{"status":429,"error":{"error":{"code":429,"details":[]}}}`, `{"status":"x"}`, `{"status":200.0}`,
	`{"status":200,"usage":null}`, `{"status":200,"usage":{}}`, `{"status":200,"usage":{"prompt_tokens":-1}}`,
	`{"status":200,"usage":{"prompt_tokens":1,"prompt_tokens":2}}`, `{"status":200,"usage":{"Prompt_Tokens":1}}`,
	`{"status":200,"usage":{"prompt_tokens":1},"usage":{"output_tokens":2}}`, `{"status":200,"usage":{"x":1}}`,
	`{"status":200,"usage":[]}`, `{"status":200,"usage":{"prompt_tokens":1}`, `{"status":200,"status":201}`,
	`{"status":9223372036854775808}`, `{"status":-0}`, `{"status": 200 , "usage" : { "prompt_tokens" : 7 } }`,
	`{"outcome":"unused","status":200}`, `{"status":200}junk`,
}

func slowLease(body string) (*api.LeaseRequest, *api.Error) {
	var v api.LeaseRequest
	if err := decode(strings.NewReader(body), &v); err != nil {
		return nil, err
	}
	return validLeaseRequest(&v)
}

func slowReport(body string) (*api.ReportRequest, *api.Error) {
	var v api.ReportRequest
	if err := decode(strings.NewReader(body), &v); err != nil {
		return nil, err
	}
	return validReportRequest(&v)
}

// checkLeaseBody checks that the fast path changes nothing for body.
func checkLeaseBody(t *testing.T, body string) {
	t.Helper()
	var fast api.LeaseRequest
	if parseLeaseRequest([]byte(body), &fast) {
		var v api.LeaseRequest
		dec := json.NewDecoder(strings.NewReader(body))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&v); err != nil || !reflect.DeepEqual(v, fast) {
			t.Fatalf("%q: the fast decoder accepted %+v; encoding/json: %+v, %v", body, fast, v, err)
		}
	}
	got, gotErr := decodeLeaseRequest(httptest.NewRequest("POST", "/v1/leases", strings.NewReader(body)))
	want, wantErr := slowLease(body)
	if !reflect.DeepEqual(got, want) || !reflect.DeepEqual(gotErr, wantErr) {
		t.Fatalf("%q: got %+v, %v; encoding/json alone: %+v, %v", body, got, gotErr, want, wantErr)
	}
}

func checkReportBody(t *testing.T, body string) {
	t.Helper()
	var fast api.ReportRequest
	if parseReportRequest([]byte(body), &fast) {
		var v api.ReportRequest
		dec := json.NewDecoder(strings.NewReader(body))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&v); err != nil || !reflect.DeepEqual(v, fast) {
			t.Fatalf("%q: the fast decoder accepted %+v; encoding/json: %+v, %v", body, fast, v, err)
		}
	}
	got, gotErr := decodeReportRequest(httptest.NewRequest("POST", "/v1/leases/x/report", strings.NewReader(body)))
	want, wantErr := slowReport(body)
	if !reflect.DeepEqual(got, want) || !reflect.DeepEqual(gotErr, wantErr) {
		t.Fatalf("%q: got %+v, %v; encoding/json alone: %+v, %v", body, got, gotErr, want, wantErr)
	}
}

func TestFastDecodersAgreeWithEncodingJSON(t *testing.T) {
	for _, body := range leaseBodies {
		checkLeaseBody(t, body)
	}
	for _, body := range reportBodies {
		checkReportBody(t, body)
	}
	// The common bodies take the fast path.
	var l api.LeaseRequest
	if !parseLeaseRequest([]byte(`{"model":"gemini-2.5-flash","tokens":1000,"client":"bench"}`), &l) {
		t.Error("a plain lease request was declined")
	}
	var r api.ReportRequest
	if !parseReportRequest([]byte(`{"status":200,"usage":{"prompt_tokens":900,"output_tokens":100}}`), &r) {
		t.Error("a plain report was declined")
	}
}

func TestAppendMatchesEncoder(t *testing.T) {
	// An added field must be added to appendLease and appendReportResponse.
	if n := reflect.TypeFor[api.Lease]().NumField(); n != 7 {
		t.Fatalf("api.Lease has %d fields: update appendLease and this test", n)
	}
	if n := reflect.TypeFor[api.ReportResponse]().NumField(); n != 5 {
		t.Fatalf("api.ReportResponse has %d fields: update appendReportResponse and this test", n)
	}
	encode := func(v any) []byte {
		var b bytes.Buffer
		if err := json.NewEncoder(&b).Encode(v); err != nil {
			return nil
		}
		return b.Bytes()
	}
	at := time.Date(2026, 11, 29, 14, 3, 4, 567890000, time.UTC)
	leases := []api.Lease{
		{LeaseID: "l0123", KeyID: "k1", Project: "p", Model: "gemini-2.5-flash", Secret: "AIza-x_y", Tokens: 1000, ExpiresAt: at},
		{ExpiresAt: at.In(time.FixedZone("X", -7*3600-1800))},
		{Tokens: -5, ExpiresAt: at.Truncate(time.Second)},
		{},
		{KeyID: "a<b", ExpiresAt: at}, {KeyID: "a&b"}, {Secret: `q"`}, {Model: "é"}, {Project: "\x7f"}, {LeaseID: "\n"},
		{ExpiresAt: time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)},
		{ExpiresAt: time.Date(2026, 1, 1, 0, 0, 0, 0, time.FixedZone("Y", 24*3600))},
	}
	for _, l := range leases {
		got, ok := appendLease(nil, &l)
		want := encode(&l)
		if ok && !bytes.Equal(got, want) {
			t.Errorf("%+v:\n got %s\nwant %s", l, got, want)
		}
		if !ok && fastjson.Plain(l.LeaseID+l.KeyID+l.Project+l.Model+l.Secret) && want != nil {
			t.Errorf("%+v declined; encoding/json writes %s", l, want)
		}
	}
	reports := []api.ReportResponse{
		{LeaseID: "l1", KeyID: "k1", Classification: "success"},
		{LeaseID: "l1", KeyID: "k1", Classification: "rate_minute", Action: "bucket p/m cooling for 1m0s", Duplicate: true},
		{Duplicate: true}, {},
		{Action: "a <b>"}, {Classification: "\u2028"},
	}
	for _, r := range reports {
		got, ok := appendReportResponse(nil, &r)
		want := encode(&r)
		if ok && !bytes.Equal(got, want) {
			t.Errorf("%+v:\n got %s\nwant %s", r, got, want)
		}
		if !ok && fastjson.Plain(r.LeaseID+r.KeyID+r.Classification+r.Action) {
			t.Errorf("%+v declined", r)
		}
	}
	if _, ok := appendLease(nil, &leases[0]); !ok {
		t.Error("a plain lease was declined")
	}
}
