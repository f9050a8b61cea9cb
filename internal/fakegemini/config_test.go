package fakegemini

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParseConfig(t *testing.T) {
	data := `{
	  "keys":     [{"key": "k1", "project": "p1", "state": "ok"}, {"key": "k2", "state": "leaked"}],
	  "models":   [{"name": "gemini-2.5-flash", "rpm": 10, "tpm": 250000, "rpd": 250, "tier": "free", "output_tokens": 7},
	               {"name": "gemini-2.5-pro", "unavailable": true, "thoughts_tokens": 100}],
	  "projects": [{"name": "p1", "tier": "paid", "number": 578829824020, "models": {"gemini-2.5-flash": {"rpm": 5, "rpd": 20}}}],
	  "quota_format": "newer",
	  "latency": "250ms",
	  "page_size": 1,
	  "clock": {"start": "2026-03-08T00:00:00-08:00", "frozen": true},
	  "faults": [{"kind": "overloaded", "count": 2}, {"kind": "capacity", "every": 5, "model": "gemini-2.5-flash", "latency": 0.5}]
	}`
	c, err := ParseConfig([]byte(data))
	if err != nil {
		t.Fatal(err)
	}
	if c.Clock == nil || !c.Clock().Equal(time.Date(2026, 3, 8, 8, 0, 0, 0, time.UTC)) {
		t.Errorf("clock")
	}
	c.Clock = nil
	want := Config{
		Keys: []Key{{Key: "k1", Project: "p1", State: KeyOK}, {Key: "k2", State: KeyLeaked}},
		Models: []Model{
			{Name: flash, Limits: Limits{RPM: 10, TPM: 250000, RPD: 250}, Tier: Free, OutputTokens: 7},
			{Name: pro, Limits: Limits{Unavailable: true}, ThoughtsTokens: 100},
		},
		Projects:    []Project{{Name: "p1", Tier: Paid, Number: 578829824020, Models: map[string]Limits{flash: {RPM: 5, RPD: 20}}}},
		QuotaFormat: QuotaNewer,
		Latency:     250 * time.Millisecond,
		PageSize:    1,
		Faults: []FaultRule{
			{Fault: Fault{Kind: FaultOverloaded}, Count: 2},
			{Fault: Fault{Kind: FaultCapacity, Latency: 500 * time.Millisecond}, Every: 5, Model: flash},
		},
	}
	if !reflect.DeepEqual(c, want) {
		t.Errorf("ParseConfig =\n%+v\nwant\n%+v", c, want)
	}

	// A running clock starts at start.
	c, err = ParseConfig([]byte(`{"keys":[],"models":[],"clock":{"start":"2030-01-01T00:00:00Z"}}`))
	if err != nil {
		t.Fatal(err)
	}
	if d := c.Clock().Sub(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)); d < 0 || d > time.Minute {
		t.Errorf("running clock off by %v", d)
	}

	// The fault rules survive a JSON round trip.
	b, err := json.Marshal(want.Faults)
	if err != nil {
		t.Fatal(err)
	}
	var back []FaultRule
	if err := json.Unmarshal(b, &back); err != nil || !reflect.DeepEqual(back, want.Faults) {
		t.Errorf("round trip %s: %v %+v", b, err, back)
	}
}

func TestParseConfigErrors(t *testing.T) {
	for _, c := range []struct{ data, want string }{
		{`{"keys":[],"modles":[]}`, `unknown field "modles"`},
		{`{"keys":[{"key":"k","projekt":"p"}]}`, `unknown field "projekt"`},
		{`{"faults":[{"kind":"capacity","evry":2}]}`, `unknown field "evry"`},
		{`{"keys":[]} {}`, "data after the JSON object"},
		{`{"latency":"soon"}`, `invalid duration "soon"`},
		{`{"clock":{"start":"tomorrow"}}`, "clock.start"},
		{`{"models":[{"name":"m","tier":"gold"}]}`, `unknown tier "gold"`},
		{`{"models":[{"name":"models/m"}]}`, `leave out the "models/" prefix`},
		{`{"models":[{"name":"m"},{"name":"m"}]}`, `model "m" listed twice`},
		{`{"models":[{"name":"m","rpm":-1}]}`, "must not be negative"},
		{`{"keys":[{"key":""}]}`, "key is empty"},
		{`{"keys":[{"key":"a"},{"key":"a"}]}`, "key listed twice"},
		{`{"keys":[{"key":"a","state":"expired"}]}`, `unknown state "expired"`},
		{`{"projects":[{"name":"p","models":{"x":{}}}]}`, `unknown model "x"`},
		{`{"quota_format":"2024"}`, `quota_format "2024"`},
		{`{"faults":[{"kind":"boom"}]}`, `unknown fault kind "boom"`},
		{`{"faults":[{"kind":"capacity","count":1,"every":2}]}`, "not both"},
		{`{"faults":[{"kind":"custom","status":42}]}`, "not an HTTP status"},
		{`{"faults":[{"kind":"capacity","model":"x"}]}`, `unknown model "x"`},
		{`{"faults":[{"kind":"capacity","method":"embedContent"}]}`, `unknown method "embedContent"`},
	} {
		_, err := ParseConfig([]byte(c.data))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want %q", c.data, err, c.want)
		}
	}
	// Validate reports every problem at once.
	err := (&Config{Keys: []Key{{}}, Models: []Model{{Name: ""}}, Latency: -1}).Validate()
	if err == nil || strings.Count(err.Error(), "\n") != 2 {
		t.Errorf("Validate = %v", err)
	}
	defer func() {
		if recover() == nil {
			t.Error("New accepted an invalid config")
		}
	}()
	New(Config{Keys: []Key{{}}})
}
