package keyctl

import (
	"strings"
	"testing"
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
