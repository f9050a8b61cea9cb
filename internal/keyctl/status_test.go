package keyctl

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
)

const statusJSON = `{
 "version": "1.2.3", "uptime_s": 10920,
 "config": {"path": "/etc/keyd/keys.json", "loaded_at": "2026-11-29T09:55:00Z",
   "last_error": "reload: /etc/keyd/keys.json:4:7: key flash_09: field \"tpm\": must be > 0",
   "warnings": ["key flash_01: unknown field \"rpn\" (did you mean \"rpm\"?)", "key pro_01: no secret: set GEMINI_KEY_pro_01"]},
 "keys": [
  {"key_id":"flash_01","project":"proj-a","models":["gemini-2.5-flash"],"priority":3,"state":"ready","secret_hint":"…abcd","in_flight":2},
  {"key_id":"flash_02","project":"proj-a","models":["gemini-2.5-flash","gemini-2.0-flash"],"state":"cooling",
   "reason":"429 per-minute quota","until":"2026-11-29T10:00:42Z","secret_hint":"AIzaSyFULLLOOKINGSECRET0123456789wxyz","in_flight":0},
  {"key_id":"flash_03","project":"proj-b","models":["gemini-2.5-flash"],"state":"exhausted",
   "reason":"429 per-day quota (GenerateRequestsPerDayPerProjectPerModel-FreeTier) until the day resets","until":"2026-11-29T17:03:00Z","secret_hint":"…9876"},
  {"key_id":"pro_01","project":"proj-c","models":["gemini-2.5-pro"],"state":"no_secret","reason":"key pro_01: no secret: set GEMINI_KEY_pro_01"}
 ],
 "buckets": [
  {"project":"proj-a","model":"gemini-2.5-flash","state":"cooling","reason":"429 per-minute","until":"2026-11-29T10:00:42Z",
   "rpm":{"used":9,"limit":10},"tpm":{"used":123456,"limit":250000},"rpd":{"used":40,"limit":0},"in_flight":2},
  {"project":"proj-b","model":"gemini-2.5-flash","state":"exhausted","until":"2026-11-29T17:03:00Z",
   "rpm":{"used":0,"limit":10},"tpm":{"used":0,"limit":250000},"rpd":{"used":250,"limit":250}}
 ]
}`

func TestStatus(t *testing.T) {
	f := newFake(t)
	f.on("GET", "/v1/status", 200, statusJSON)
	r := keyctl(t, nil, "", "--socket", f.sock, "status").want(t, 0)
	out := r.stdout

	// The top: config, when loaded, the last error and every warning.
	contains(t, "status", out,
		"keyd 1.2.3, up 3h02m, socket "+f.sock+"\n",
		"config: /etc/keyd/keys.json, loaded 2026-11-29 09:55:00 (5m00s ago)\n",
		"LAST ERROR",
		`key flash_09: field "tpm": must be > 0`,
		"WARNINGS (2):\n",
		`  ! key flash_01: unknown field "rpn" (did you mean "rpm"?)`+"\n",
		"  ! key pro_01: no secret: set GEMINI_KEY_pro_01\n",
		"KEYS: 4 (1 ready, 1 cooling, 1 exhausted, 1 no_secret)",
		"BUCKETS: 2",
	)
	if strings.Index(out, "WARNINGS") > strings.Index(out, "KEYS:") {
		t.Error("warnings come after the keys")
	}

	// The tables, row by row, with wrapped cells joined and columns
	// collapsed to single spaces.
	for _, l := range strings.Split(out, "\n") {
		if len([]rune(l)) > 100 {
			t.Errorf("line over 100 columns (%d): %q", len([]rune(l)), l)
		}
	}
	for _, want := range []string{
		"\nKEY       PROJECT  MODELS               SECRET  STATE      IN-FLIGHT  REASON/UNTIL\n",
		"\nflash_01  proj-a   gemini-2.5-flash     …abcd   ready      2\n",
		"\nflash_02  proj-a   gemini-2.5-flash +1  …wxyz   cooling    0          cooling 42s: 429 per-minute q…\n",
		"\nflash_03  proj-b   gemini-2.5-flash     …9876   exhausted  0          until 17:03 (7h03m): 429 per-…\n",
		"\npro_01    proj-c   gemini-2.5-pro       -       no_secret  0          no secret: set GEMINI_KEY_pro…\n",
		// The cut cells in full, below the table.
		"\n  flash_02: cooling 42s: 429 per-minute quota\n" +
			"  flash_03: until 17:03 (7h03m): 429 per-day quota\n" +
			"      (GenerateRequestsPerDayPerProjectPerModel-FreeTier) until the day resets\n" +
			"  pro_01: no secret: set GEMINI_KEY_pro_01\n\nBUCKETS",
		"\nPROJECT  MODEL             STATE      RPM   TPM        RPD      REASON/UNTIL\n",
		"\nproj-a   gemini-2.5-flash  cooling    9/10  123k/250k  40/-     cooling 42s: 429 per-minute\n",
		"\nproj-b   gemini-2.5-flash  exhausted  0/10  0/250k     250/250  until 17:03 (7h03m)\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("status:\n%s", out)
	}

	// No secret, even from a hint that holds one.
	lacks(t, "status", out, "AIza", "FULLLOOKING", "0123456789")
}

func TestStatusJSON(t *testing.T) {
	f := newFake(t)
	f.on("GET", "/v1/status", 200, statusJSON)
	r := keyctl(t, nil, "", "status", "--json", "--socket", f.sock).want(t, 0)
	contains(t, "status --json", r.stdout, `"key_id": "flash_02"`, `"warnings": [`)
}

func TestStatusQuiet(t *testing.T) {
	f := newFake(t)
	f.on("GET", "/v1/status", 200, `{"version":"1","config":{"path":"/k.json","loaded_at":"2026-11-29T09:00:00Z","warnings":[]},"keys":[],"buckets":[]}`)
	r := keyctl(t, nil, "", "--socket", f.sock, "status").want(t, 0)
	contains(t, "status", r.stdout, "warnings: none\n", "KEYS: 0\n", "BUCKETS: 0\n")
	lacks(t, "status", r.stdout, "LAST ERROR")
}

// bucketWarningJSON is a status whose bucket carries a warning: Gemini
// reported a lower rpm than keys.json's.
const bucketWarningJSON = `{"version":"1","uptime_s":60,
 "config":{"path":"/k.json","loaded_at":"2026-11-29T09:55:00Z","warnings":["key k9: unknown field \"rpn\" (did you mean \"rpm\"?)"]},
 "keys":[{"key_id":"k1","project":"p1","models":["gemini-2.5-flash"],"state":"cooling","reason":"gemini-2.5-flash: 429 per-minute quota","until":"2026-11-29T10:00:42Z","secret_hint":"…0001","in_flight":0}],
 "buckets":[
  {"project":"p0","model":"gemini-2.5-flash","state":"ready","rpm":{"used":0,"limit":10},"tpm":{"used":0,"limit":1000000},"rpd":{"used":0,"limit":0},"in_flight":0},
  {"project":"p1","model":"gemini-2.5-flash","state":"cooling","reason":"429 per-minute quota","until":"2026-11-29T10:00:42Z",
   "rpm":{"used":1,"limit":5},"tpm":{"used":10,"limit":1000000},"rpd":{"used":1,"limit":0},"in_flight":0,
   "warnings":["project p1 model gemini-2.5-flash: Gemini reports rpm 5 (quota GenerateRequestsPerMinutePerProjectPerModel-FreeTier), keys.json says 10: set \"rpm\": 5 for its keys (k1, k2); keyd enforces 5 until then",
    "project p1 model gemini-2.5-flash: Gemini reports rpd 20 (quota GenerateRequestsPerDayPerProjectPerModel-FreeTier), keys.json says none: set \"rpd\": 20 for its keys (k1, k2); keyd enforces 20 until then"]}]}`

// TestStatusBucketWarnings: a bucket's warnings show on top with the
// config's, after them, wrapped to the line width, before the keys.
func TestStatusBucketWarnings(t *testing.T) {
	f := newFake(t)
	f.on("GET", "/v1/status", 200, bucketWarningJSON)
	out := keyctl(t, nil, "", "--socket", f.sock, "status").want(t, 0).stdout
	contains(t, "status", out,
		"WARNINGS (3):\n"+
			`  ! key k9: unknown field "rpn" (did you mean "rpm"?)`+"\n"+
			"  ! project p1 model gemini-2.5-flash: Gemini reports rpm 5 (quota\n"+
			`    GenerateRequestsPerMinutePerProjectPerModel-FreeTier), keys.json says 10: set "rpm": 5 for its`+"\n"+
			"    keys (k1, k2); keyd enforces 5 until then\n"+
			"  ! project p1 model gemini-2.5-flash: Gemini reports rpd 20 (quota\n"+
			`    GenerateRequestsPerDayPerProjectPerModel-FreeTier), keys.json says none: set "rpd": 20 for its`+"\n"+
			"    keys (k1, k2); keyd enforces 20 until then\n\nKEYS: 1",
		// The bucket shows the limit it enforces.
		"\np1       gemini-2.5-flash  cooling  1/5   10/1M  1/-  cooling 42s: 429 per-minute quota\n",
	)
	for _, l := range strings.Split(out, "\n") {
		if len([]rune(l)) > 100 {
			t.Errorf("line over 100 columns (%d): %q", len([]rune(l)), l)
		}
	}
	if t.Failed() {
		t.Logf("status:\n%s", out)
	}

	// keyctl watch's top counts them too.
	var st api.Status
	if err := json.Unmarshal([]byte(bucketWarningJSON), &st); err != nil {
		t.Fatal(err)
	}
	var top strings.Builder
	(&env{now: func() time.Time { return now }, loc: time.UTC}).statusTop(&top, &st)
	contains(t, "watch top", top.String(), "; 3 warnings\n")

	// And keyctl watch lists a bucket warning when it appears.
	before := st
	before.Buckets = slices.Clone(st.Buckets)
	before.Buckets[1].Warnings = st.Buckets[1].Warnings[:1]
	changes := diffStatus(&before, &st)
	if len(changes) != 1 || changes[0].what != "warning: "+st.Buckets[1].Warnings[1] || !slices.Equal(changes[0].bkts, []string{"p1/gemini-2.5-flash"}) {
		t.Errorf("changes %+v", changes)
	}
	if changes := diffStatus(&st, &st); len(changes) != 0 {
		t.Errorf("changes without a change: %+v", changes)
	}
}

// TestWatchWarningCleared: keyctl watch reports a bucket warning that went
// away as a change line, as it reports one that appeared; a warning whose
// text changed (a new value) is one cleared and one new.
func TestWatchWarningCleared(t *testing.T) {
	var st api.Status
	if err := json.Unmarshal([]byte(bucketWarningJSON), &st); err != nil {
		t.Fatal(err)
	}
	rpm, rpd := st.Buckets[1].Warnings[0], st.Buckets[1].Warnings[1]
	after := st
	after.Buckets = slices.Clone(st.Buckets)
	after.Buckets[1].Warnings = []string{rpd}
	changes := diffStatus(&st, &after)
	if len(changes) != 1 || changes[0].what != "warning cleared: "+rpm || !slices.Equal(changes[0].bkts, []string{"p1/gemini-2.5-flash"}) {
		t.Errorf("one warning cleared: changes %+v", changes)
	}

	// Every warning gone at once: a keyctl reset of the bucket's key.
	after.Buckets[1].Warnings = nil
	var got []string
	for _, c := range diffStatus(&st, &after) {
		got = append(got, c.what)
	}
	if want := []string{"warning cleared: " + rpm, "warning cleared: " + rpd}; !slices.Equal(got, want) {
		t.Errorf("every warning cleared: changes %q\nwant %q", got, want)
	}

	// A new value: the old warning cleared, the new one shown.
	four := strings.NewReplacer("rpm 5", "rpm 4", `"rpm": 5`, `"rpm": 4`, "enforces 5", "enforces 4").Replace(rpm)
	after.Buckets[1].Warnings = []string{four, rpd}
	got = got[:0]
	for _, c := range diffStatus(&st, &after) {
		got = append(got, c.what)
	}
	if want := []string{"warning cleared: " + rpm, "warning: " + four}; !slices.Equal(got, want) {
		t.Errorf("a new value: changes %q\nwant %q", got, want)
	}

	// A bucket gone from keys.json takes its warnings with it.
	after.Buckets = st.Buckets[:1]
	got = got[:0]
	for _, c := range diffStatus(&st, &after) {
		got = append(got, c.what)
	}
	if want := []string{"warning cleared: " + rpm, "warning cleared: " + rpd}; !slices.Equal(got, want) {
		t.Errorf("the bucket removed: changes %q\nwant %q", got, want)
	}
}

// TestStatusWaiting: the requests waiting for capacity are one line under
// the warnings, and in keyctl watch's top; absent, nothing is said.
func TestStatusWaiting(t *testing.T) {
	var st api.Status
	if err := json.Unmarshal([]byte(bucketWarningJSON), &st); err != nil {
		t.Fatal(err)
	}
	e := &env{now: func() time.Time { return now }, loc: time.UTC}
	var top, without strings.Builder
	e.statusTop(&without, &st)
	st.Waiting = []api.ModelWaiting{{Model: "gemini-2.5-flash", Requests: 37, OldestMS: 12_300}, {Model: "gemini-2.5-pro", Requests: 1, OldestMS: 400}}
	e.statusTop(&top, &st)
	contains(t, "watch top", top.String(), "\nwaiting: gemini-2.5-flash 37 (oldest 13s); gemini-2.5-pro 1 (oldest 1s)\n")
	if strings.Contains(without.String(), "waiting") {
		t.Errorf("no waiters, yet: %q", without.String())
	}
	body, err := json.Marshal(&st)
	if err != nil {
		t.Fatal(err)
	}
	f := newFake(t)
	f.on("GET", "/v1/status", 200, string(body))
	out := keyctl(t, nil, "", "--socket", f.sock, "status").want(t, 0).stdout
	contains(t, "status", out, "keys (k1, k2); keyd enforces 20 until then\nwaiting for capacity: gemini-2.5-flash 37 (oldest 13s); gemini-2.5-pro 1 (oldest 1s)\n\nKEYS: 1")
}
