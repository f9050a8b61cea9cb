package sim

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/keyd/keyd/internal/fakegemini"
)

// TestSmoke runs the smoke suite, as CI does, and checks what must hold
// whatever the numbers (Outcome.Problems): the provider never admitted a
// request above a limit, keyd caused no 429, and keyd used at least 90% of
// the quota wherever demand reached the capacity. It asserts no times.
func TestSmoke(t *testing.T) {
	o, err := RunSuite(Suite(true))
	if err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + o.Text())
	for _, p := range o.Problems() {
		t.Error(p)
	}
	for i, s := range o.Scenarios {
		for j, r := range o.Results[i] {
			if r.Offered != len(o.Traces[i].Requests) {
				t.Errorf("%s/%s: %d requests offered, the trace has %d", s.Name, r.Policy, r.Offered, len(o.Traces[i].Requests))
			}
			if n := r.Served + r.GaveUp + r.Failed + r.Crashed; n != r.Offered {
				t.Errorf("%s/%s: served %d + gave up %d + failed %d + crashed %d = %d, want every one of the %d requests accounted for",
					s.Name, r.Policy, r.Served, r.GaveUp, r.Failed, r.Crashed, n, r.Offered)
			}
			if len(r.Bins) != int(s.Duration/BinWidth) {
				t.Errorf("%s/%s: %d bins, want %d", s.Name, r.Policy, len(r.Bins), s.Duration/BinWidth)
			}
			if j == 0 && s.Name == "invalid" && r.Invalid400 == 0 {
				t.Errorf("invalid/keyd: no request reached the deleted key: the scenario tests nothing")
			}
			if s.Name == "daily" && j > 0 && r.ByKind["rpd"] == 0 {
				t.Errorf("daily/%s: no RPD 429: the day's quota never ran out", r.Policy)
			}
		}
	}
	// The report renders, and its plots are well-formed XML.
	md := string(o.Markdown(true))
	for _, want := range []string{"| keyd |", "policies.svg", "make bench-sim"} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	for _, pl := range Plots {
		svg := o.SVG(pl.Scenario)
		d := xml.NewDecoder(bytes.NewReader(svg))
		for {
			_, err := d.Token()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("%s: %v", pl.File, err)
			}
		}
	}
}

// TestDeterministic: the same scenario gives the same results, run after
// run, and whatever else runs beside it.
func TestDeterministic(t *testing.T) {
	s := Suite(true)[3] // shared projects, 3x demand
	s.Duration = 5 * time.Minute
	var first []*Result
	for range 2 {
		tr := s.Generate()
		var rs []*Result
		for _, d := range Policies {
			r, err := Run(s, tr, d)
			if err != nil {
				t.Fatal(err)
			}
			rs = append(rs, r)
		}
		if first == nil {
			first = rs
			continue
		}
		for j := range rs {
			if !reflect.DeepEqual(rs[j], first[j]) {
				t.Errorf("%s: second run differs:\n%v\n%v", rs[j].Policy, first[j], rs[j])
			}
		}
	}
}

// TestProviderMatchesFakegemini replays one random trace of calls through
// Provider and through the real fakegemini server (over its HTTP
// handler, on the same virtual clock) and requires the same answer to
// every call: status, limits named, retry delay and the error body itself.
func TestProviderMatchesFakegemini(t *testing.T) {
	const model = "gemini-2.5-flash"
	lim := map[string]Limits{
		"p1": {RPM: 5, TPM: 2000, RPD: 40},
		"p2": {RPM: 3, TPM: 900, RPD: 25},
	}
	keys := map[string]string{"k1": "p1", "k2": "p1", "k3": "p2", "dead": "p2"}
	now := pacific("2026-03-10 23:50:00") // crosses the Pacific midnight
	start := now
	fake := fakegemini.New(fakegemini.Config{
		Keys: []fakegemini.Key{{Key: "k1", Project: "p1"}, {Key: "k2", Project: "p1"}, {Key: "k3", Project: "p2"},
			{Key: "dead", Project: "p2", State: fakegemini.KeyInvalid}},
		Models:   []fakegemini.Model{{Name: model, Limits: fakegemini.Limits{RPM: 5, TPM: 2000, RPD: 40}}},
		Projects: []fakegemini.Project{{Name: "p2", Models: map[string]fakegemini.Limits{model: {RPM: 3, TPM: 900, RPD: 25}}}},
		Clock:    func() time.Time { return now },
	})
	prov := NewProvider(model, fakegemini.Paid, lim, keys)
	prov.Invalidate("dead", start)
	r := rand.New(rand.NewPCG(1, 2))
	names := []string{"k1", "k2", "k3", "k3", "dead"}
	statuses := map[int]int{}
	for i := range 1500 {
		now = now.Add(time.Duration(r.IntN(3000)) * time.Millisecond)
		key := names[r.IntN(len(names))]
		tokens := int64(1 + r.IntN(600))
		got := prov.Call(now, key, tokens)
		statuses[got.Status]++

		body := fmt.Sprintf(`{"contents":[{"parts":[{"text":%q}]}]}`, strings.Repeat("a", int(4*tokens)))
		req := httptest.NewRequest(http.MethodPost, "/v1beta/models/"+model+":generateContent", strings.NewReader(body))
		req.Header.Set("x-goog-api-key", key)
		w := httptest.NewRecorder()
		fake.ServeHTTP(w, req)
		if w.Code != got.Status {
			t.Fatalf("call %d at %s (%s, %d tokens): fakegemini %d, sim %d", i, now.Format(time.RFC3339Nano), key, tokens, w.Code, got.Status)
		}
		if got.Status == 200 {
			continue
		}
		var want, have any
		if err := json.Unmarshal(w.Body.Bytes(), &want); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(got.BodyJSON(), &have); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(want, have) {
			t.Fatalf("call %d at %s: bodies differ:\nfakegemini %s\nsim        %s", i, now.Format(time.RFC3339Nano), w.Body.Bytes(), got.BodyJSON())
		}
		if got.Status == 429 {
			rec := fake.Requests()[i]
			if !reflect.DeepEqual(rec.Quota, got.Kinds) || rec.RetryDelay.Truncate(time.Second) != got.RetryInfo {
				t.Fatalf("call %d: fakegemini named %v retry %v, sim %v retry %v", i, rec.Quota, rec.RetryDelay, got.Kinds, got.RetryInfo)
			}
		}
	}
	if statuses[200] < 100 || statuses[429] < 100 || statuses[400] < 100 {
		t.Errorf("answers %v: the trace does not exercise every case", statuses)
	}
	if v := fake.Violations(); len(v) > 0 {
		t.Errorf("fakegemini found violations: %v", v)
	}
	if v := prov.Check(); len(v) > 0 {
		t.Errorf("Provider.Check found violations: %v", v)
	}
	if !now.After(pacific("2026-03-11 00:00:00")) {
		t.Errorf("the trace ended at %s, before the Pacific midnight it should cross", now)
	}
}

// TestProviderCheckFindsOverruns: the independent recheck does catch a
// record above the limits.
func TestProviderCheckFindsOverruns(t *testing.T) {
	p := NewProvider(Model, fakegemini.Paid, map[string]Limits{"p": {RPM: 2, TPM: 100, RPD: 3}}, map[string]string{"k": "p"})
	t0 := pacific("2026-03-10 12:00:00")
	for i := range 4 {
		p.Admitted = append(p.Admitted, Admission{At: t0.Add(time.Duration(i) * 10 * time.Second), Project: "p", Tokens: 40})
	}
	got := strings.Join(p.Check(), "\n")
	for _, want := range []string{"over rpm 2", "over tpm 100", "over rpd 3"} {
		if !strings.Contains(got, want) {
			t.Errorf("Check() = %q, want it to report %q", got, want)
		}
	}
}

func TestJain(t *testing.T) {
	for _, c := range []struct {
		xs   []float64
		want float64
	}{
		{[]float64{1, 1, 1, 1}, 1},
		{[]float64{1, 0, 0, 0}, 0.25},
		{[]float64{0.5, 1}, 0.9},
	} {
		if got := jain(c.xs); got < c.want-1e-9 || got > c.want+1e-9 {
			t.Errorf("jain(%v) = %v, want %v", c.xs, got, c.want)
		}
	}
}

// TestNoteOnALimitSetTooHigh: the note on a configuration above the real
// limits says when keyd lowers a bucket's limit as keyd does it: for a
// quota of the bucket's model or of none (project-wide), not only the
// former.
func TestNoteOnALimitSetTooHigh(t *testing.T) {
	o := &Outcome{
		Scenarios: []*Scenario{{Name: "cut", Configured: map[string]Limits{"p": {}}}},
		Results:   [][]*Result{{{Policy: "keyd", QuotaUsed: 0.3, Provider429: 40}, {Policy: "baseline", QuotaUsed: 0.9}}},
	}
	var note string
	for _, n := range o.notes() {
		if strings.HasPrefix(n, "**A limit set too high costs keyd most of the quota.**") {
			note = n
		}
	}
	if note == "" {
		t.Fatalf("no note on the limit set too high in %q", o.notes())
	}
	if strings.Contains(note, "only when the 429 carries one for the bucket's model") ||
		!strings.Contains(note, "a quota of the bucket's model or of no model (a project-wide one)") {
		t.Fatalf("the note says:\n%s", note)
	}
}
