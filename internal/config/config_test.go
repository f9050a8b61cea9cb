package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// env is a fake process environment.
type env map[string]string

func (e env) get(name string) string { return e[name] }

func fakeUser(name string) (uint32, error) {
	if id, ok := map[string]uint32{"alice": 1001, "bob": 1002}[name]; ok {
		return id, nil
	}
	return 0, errors.New("no such user")
}

func fakeGroup(name string) (uint32, error) {
	if name == "keyd" {
		return 990, nil
	}
	return 0, errors.New("no such group")
}

// writeFiles creates each file (name → contents) in dir.
func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// load writes keysJSON as keys.json in dir, with the other files, and loads
// it with environment e. Messages in the returned error name the file
// "keys.json" and the directory "DIR".
func load(t *testing.T, dir, keysJSON string, files map[string]string, e env) (*Config, error) {
	t.Helper()
	writeFiles(t, dir, map[string]string{"keys.json": keysJSON})
	writeFiles(t, dir, files)
	c, err := Load(filepath.Join(dir, "keys.json"), Options{Getenv: e.get, LookupUser: fakeUser, LookupGroup: fakeGroup})
	if err != nil {
		err = errors.New(strings.ReplaceAll(strings.ReplaceAll(err.Error(), dir+"/keys.json", "keys.json"), dir, "DIR"))
	}
	return c, err
}

func TestSeedFile(t *testing.T) {
	dir := t.TempDir()
	seed, err := os.ReadFile("testdata/seed-keys.json")
	if err != nil {
		t.Fatal(err)
	}
	writeFiles(t, dir, map[string]string{".env": "GEMINI_KEY_flash_02=AIza-from-dotenv\n"})
	e := env{}
	for _, id := range []string{"flash_01", "flash_03", "pro_01", "pro_02", "pro_03", "pro_04", "pro_05"} {
		e["GEMINI_KEY_"+id] = "AIza-" + id
	}
	c, err := load(t, dir, string(seed), nil, e)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Warnings) != 0 {
		t.Errorf("warnings: %q", c.Warnings)
	}
	var ids []string
	for _, k := range c.Keys {
		ids = append(ids, k.ID)
		flash := strings.HasPrefix(k.ID, "flash")
		model, want, prio, work := "gemini-1.5-pro", Limits{RPM: 60, TPM: 4000000, BurstCapacity: 10}, 5, "heavy"
		if flash {
			model, want, prio, work = "gemini-2.0-flash", Limits{RPM: 15, TPM: 1000000, BurstCapacity: 5}, 3, "light"
		}
		if got := k.Models[model]; len(k.Models) != 1 || got != want {
			t.Errorf("key %s: models %v, want %s: %v", k.ID, k.Models, model, want)
		}
		if k.Project != k.ID || k.Priority != prio || k.WorkloadType != work || !k.Enabled || k.MaxInFlight != 0 || k.SecretEnv != "GEMINI_KEY_"+k.ID {
			t.Errorf("key %s: %+v", k.ID, *k)
		}
		if c.Buckets[BucketID{k.ID, model}] != want {
			t.Errorf("bucket %s/%s: %v", k.ID, model, c.Buckets[BucketID{k.ID, model}])
		}
		wantSecret, wantSource := "AIza-"+k.ID, "environment"
		if k.ID == "flash_02" {
			wantSecret, wantSource = "AIza-from-dotenv", ".env file "+filepath.Join(dir, ".env")
		}
		if k.Secret != wantSecret || k.SecretSource != wantSource || k.SecretError != "" {
			t.Errorf("key %s: secret %q from %q (%q)", k.ID, k.Secret, k.SecretSource, k.SecretError)
		}
	}
	if want := []string{"flash_01", "flash_02", "flash_03", "pro_01", "pro_02", "pro_03", "pro_04", "pro_05"}; !slices.Equal(ids, want) {
		t.Errorf("keys %v, want %v", ids, want)
	}
	if len(c.Buckets) != 8 {
		t.Errorf("%d buckets, want 8", len(c.Buckets))
	}
	if c.Path != filepath.Join(dir, "keys.json") || c.EnvFile != filepath.Join(dir, ".env") || string(c.Raw) != string(seed) {
		t.Errorf("path %q, env file %q, raw %d bytes", c.Path, c.EnvFile, len(c.Raw))
	}
	if c.DayResetLocation.String() != "America/Los_Angeles" || c.LeaseTTL != 10*time.Minute || c.DefaultTokens != 1000 {
		t.Errorf("defaults: %v %v %v", c.DayResetLocation, c.LeaseTTL, c.DefaultTokens)
	}
	s := c.Summary()
	if s.KeysTotal != 8 || s.KeysLoaded != 8 || s.SecretsFound != 8 || len(s.MissingSecrets) != 0 || len(s.Warnings) != 0 ||
		!slices.Equal(s.ModelsPerKey["pro_03"], []string{"gemini-1.5-pro"}) {
		t.Errorf("summary: %+v", s)
	}
}

func TestLoadNotFound(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys.json")
	_, err := Load(path, Options{})
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("err = %v, want ErrNotFound", err)
	}
	if want := "config file " + path + " does not exist: create it (see the example keys.json) or pass --config"; err.Error() != want {
		t.Errorf("err = %q\nwant  %q", err, want)
	}
}

// k is a valid key object with id a.
const k = `{"key_id": "a", "model_name": "m", "rpm": 10, "tpm": 100}`

func TestErrors(t *testing.T) {
	for _, tc := range []struct {
		name, json string
		want       []string
	}{
		{"wrong type", `{
  "keys": [
    {
      "rpm": "15",
      "key_id": "flash_01",
      "model_name": "gemini-2.0-flash",
      "tpm": 1000000
    }
  ]
}`, []string{`keys.json:4:14: key flash_01: field "rpm": want a whole number, got string "15"`}},
		{"trailing comma", "{\"keys\": [\n  " + k + ",\n]}", []string{
			`keys.json:3:1: invalid JSON: invalid character ']' looking for beginning of value: remove the comma before it`}},
		{"missing colon", `{"keys" []}`, []string{`keys.json:1:9: invalid JSON: invalid character '[' after object key`}},
		{"truncated", "{\"keys\": [\n  " + k, []string{
			`keys.json:2:60: invalid JSON: the file ends early: finish the last value and close every { and [`}},
		{"empty file", " \n", []string{`keys.json:1:1: the file is empty: write {"keys": [...]}`}},
		{"trailing data", `{"keys": [` + k + "]}\n{\"keys\": []}\n", []string{
			`keys.json:2:1: unexpected data after the top-level object: remove it`}},
		{"not an object", `["keys"]`, []string{`keys.json:1:1: want an object like {"keys": [...]}, got a list`}},
		{"no keys", `{"lease_ttl": "1m"}`, []string{`keys.json:1:1: missing "keys": add "keys": [...] with one object per API key`}},
		{"empty keys", `{"keys": []}`, []string{`keys.json:1:10: field "keys": the list is empty: add an object per API key`}},
		{"keys not a list", `{"keys": {}}`, []string{`keys.json:1:10: field "keys": want a list, got an object`}},
		{"key not an object", `{"keys": [` + k + `, 7]}`, []string{`keys.json:1:70: key #2: want an object, got number 7`}},
		{"missing key_id", "{\"keys\": [\n  {\"model_name\": \"m\", \"rpm\": 10, \"tpm\": 100}\n]}", []string{
			`keys.json:2:3: key #1: missing "key_id": add a unique "key_id"`}},
		{"bad key_id", `{"keys": [{"key_id": "../x", "model_name": "m", "rpm": 10, "tpm": 100}]}`, []string{
			`keys.json:1:22: key #1: field "key_id": "../x" is not a valid id: use letters, digits, '_', '-' and '.' (not first)`}},
		{"key_id not a string", `{"keys": [{"key_id": 1, "model_name": "m", "rpm": 10, "tpm": 100}]}`, []string{
			`keys.json:1:22: key #1: field "key_id": want a string, got number 1`}},
		{"duplicate key_id", "{\"keys\": [\n  " + k + ",\n  " + k + "\n]}", []string{
			`keys.json:3:14: key a: duplicate key_id (first at keys.json:2:14): rename one`}},
		{"duplicate field", `{"keys": [{"key_id": "a", "model_name": "m", "rpm": 10, "rpm": 10, "tpm": 100}]}`, []string{
			`keys.json:1:64: key a: field "rpm" is set twice (first at keys.json:1:53): remove one`}},
		{"no model", `{"keys": [{"key_id": "a", "rpm": 10}]}`, []string{
			`keys.json:1:11: key a: no model: add "model_name" with "rpm" and "tpm", or "models"`}},
		{"empty model_name", `{"keys": [{"key_id": "a", "model_name": "", "rpm": 10, "tpm": 100}]}`, []string{
			`keys.json:1:41: key a: field "model_name": must not be empty`}},
		{"model_name and models", `{"keys": [{"key_id": "a", "model_name": "m", "rpm": 1, "models": {"m": {"rpm": 10, "tpm": 100}}}]}`, []string{
			`keys.json:1:41: key a: field "model_name" beside "models": use one: "model_name" with "rpm" and "tpm", or "models"`,
			`keys.json:1:53: key a: field "rpm" beside "models": move it into each model of "models"`}},
		{"models not an object", `{"keys": [{"key_id": "a", "models": ["m"]}]}`, []string{
			`keys.json:1:37: key a: field "models": want an object like {"MODEL": {"rpm": N, "tpm": N}}, got a list`}},
		{"models empty", `{"keys": [{"key_id": "a", "models": {}}]}`, []string{
			`keys.json:1:37: key a: field "models": is empty: add at least one model`}},
		{"model not an object", `{"keys": [{"key_id": "a", "models": {"m": 5}}]}`, []string{
			`keys.json:1:43: key a: model m: want an object like {"rpm": N, "tpm": N}, got number 5`}},
		{"model missing tpm", `{"keys": [{"key_id": "a", "models": {"m": {"rpm": 10}}}]}`, []string{
			`keys.json:1:43: key a: model m: missing "tpm": add the model's tokens-per-minute limit`}},
		{"rpm missing", `{"keys": [{"key_id": "a", "model_name": "m", "tpm": 100}]}`, []string{
			`keys.json:1:11: key a: missing "rpm": add the model's requests-per-minute limit`}},
		{"rpm and tpm not positive", `{"keys": [{"key_id": "a", "model_name": "m", "rpm": 0, "tpm": -1}]}`, []string{
			`keys.json:1:53: key a: field "rpm": must be > 0, got 0`,
			`keys.json:1:63: key a: field "tpm": must be > 0, got -1`}},
		{"rpm fraction", `{"keys": [{"key_id": "a", "model_name": "m", "rpm": 15.5, "tpm": 100}]}`, []string{
			`keys.json:1:53: key a: field "rpm": want a whole number, got number 15.5`}},
		{"tpm too large", `{"keys": [{"key_id": "a", "model_name": "m", "rpm": 1, "tpm": 99999999999999999999}]}`, []string{
			`keys.json:1:63: key a: field "tpm": 99999999999999999999 is out of range`}},
		{"negatives", "{\"keys\": [\n" +
			`{"key_id": "a", "model_name": "m", "rpm": 10, "tpm": 100, "rpd": -1},` + "\n" +
			`{"key_id": "b", "model_name": "m", "rpm": 10, "tpm": 100, "burst_capacity": -2},` + "\n" +
			`{"key_id": "c", "model_name": "m", "rpm": 10, "tpm": 100, "max_in_flight": -3}` + "\n]}", []string{
			`keys.json:2:66: key a: field "rpd": must be >= 0, got -1`,
			`keys.json:3:77: key b: field "burst_capacity": must be >= 0, got -2`,
			`keys.json:4:76: key c: field "max_in_flight": must be >= 0, got -3`}},
		{"burst above rpm", `{"keys": [{"key_id": "a", "model_name": "m", "rpm": 10, "tpm": 100, "burst_capacity": 11}]}`, []string{
			`keys.json:1:87: key a: burst_capacity 11 exceeds rpm 10: lower it to 10 or less`}},
		{"enabled not a bool", `{"keys": [{"key_id": "a", "model_name": "m", "rpm": 10, "tpm": 100, "enabled": "yes"}]}`, []string{
			`keys.json:1:80: key a: field "enabled": want true or false, got string "yes"`}},
		{"empty project", `{"keys": [{"key_id": "a", "project": "", "model_name": "m", "rpm": 10, "tpm": 100}]}`, []string{
			`keys.json:1:38: key a: field "project": must not be empty: name the Google Cloud project or remove the field`}},
		{"secret_env not a name", `{"keys": [{"key_id": "a", "secret_env": "MY KEY", "model_name": "m", "rpm": 10, "tpm": 100}]}`, []string{
			`keys.json:1:41: key a: field "secret_env": not a variable name: use letters, digits and '_', like "GEMINI_KEY_a"`}},
		{"secret_env holds a key", `{"keys": [{"key_id": "a", "secret_env": "AIzaSyTopSecret", "model_name": "m", "rpm": 10, "tpm": 100}]}`, []string{
			`keys.json:1:41: key a: field "secret_env": holds an API key, not a variable name: move the key to the environment or .env and name its variable here`}},
		{"shared bucket", `{
  "keys": [
    {
      "key_id": "pro_01",
      "project": "p1",
      "model_name": "gemini-2.5-pro",
      "rpm": 60,
      "tpm": 4000000,
      "rpd": 1000
    },
    {
      "key_id": "pro_02",
      "project": "p1",
      "models": {
        "gemini-2.5-flash": {"rpm": 10, "tpm": 250000},
        "gemini-2.5-pro": {"rpm": 30, "tpm": 4000000}
      }
    }
  ]
}`, []string{
			`keys.json:16:27: keys pro_01 and pro_02 share bucket p1/gemini-2.5-pro but declare different rpd (1000 vs 0): make them equal`,
			`keys.json:16:35: keys pro_01 and pro_02 share bucket p1/gemini-2.5-pro but declare different rpm (60 vs 30): make them equal`}},
		{"timezone", `{"day_reset_timezone": "America/Nowhere", "keys": [` + k + `]}`, []string{
			`keys.json:1:24: field "day_reset_timezone": unknown time zone "America/Nowhere": use an IANA name like "America/Los_Angeles"`}},
		{"empty timezone", `{"day_reset_timezone": "", "keys": [` + k + `]}`, []string{
			`keys.json:1:24: field "day_reset_timezone": unknown time zone "": use an IANA name like "America/Los_Angeles"`}},
		{"lease_ttl not a duration", `{"lease_ttl": "10", "keys": [` + k + `]}`, []string{
			`keys.json:1:15: field "lease_ttl": "10" is not a duration: write it like "10m" or "90s"`}},
		{"lease_ttl negative", `{"lease_ttl": "-1m", "keys": [` + k + `]}`, []string{
			`keys.json:1:15: field "lease_ttl": must be > 0, got "-1m"`}},
		{"window_margin too large", `{"window_margin": "1m", "keys": [` + k + `]}`, []string{
			`keys.json:1:19: field "window_margin": must be between 0s and 30s, got "1m"`}},
		{"default_tokens zero", `{"default_tokens": 0, "keys": [` + k + `]}`, []string{
			`keys.json:1:20: field "default_tokens": must be > 0, got 0`}},
		{"access", `{"keys": [` + k + `], "access": {"lease": {"uids": ["alice", "mallory", -1], "groups": "keyd"}, "admin": 7}}`, []string{
			`keys.json:1:110: access.lease: field "uids": unknown user "mallory" (no such user): use an existing user name or a numeric id`,
			`keys.json:1:121: access.lease: field "uids": want a user name or an id from 0 to 4294967295, got number -1`,
			`keys.json:1:136: access.lease: field "groups": want a list of group names and numeric ids, got string "keyd"`,
			`keys.json:1:154: access: field "admin": want an object like {"uids": [...], "groups": [...]}, got number 7`}},
		{"all at once", `{
  "lease_ttl": "soon",
  "keys": [
    {"key_id": "a", "model_name": "m", "rpm": "10", "tpm": 100},
    {"model_name": "m", "rpm": 10, "tpm": 100},
    {"key_id": "c", "model_name": "m", "rpm": 10, "tpm": 0}
  ],
  "day_reset_timezone": "Mars/Olympus"
}`, []string{
			`keys.json:2:16: field "lease_ttl": "soon" is not a duration: write it like "10m" or "90s"`,
			`keys.json:4:47: key a: field "rpm": want a whole number, got string "10"`,
			`keys.json:5:5: key #2: missing "key_id": add a unique "key_id"`,
			`keys.json:6:58: key c: field "tpm": must be > 0, got 0`,
			`keys.json:8:25: field "day_reset_timezone": unknown time zone "Mars/Olympus": use an IANA name like "America/Los_Angeles"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := load(t, t.TempDir(), tc.json, nil, env{})
			if err == nil {
				t.Fatalf("loaded %d keys, want error", len(c.Keys))
			}
			if got, want := err.Error(), strings.Join(tc.want, "\n"); got != want {
				t.Errorf("error:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

func TestWarnings(t *testing.T) {
	for _, tc := range []struct {
		name, json string
		want       []string
	}{
		{"none for seed fields", `{"keys": [{"key_id": "a", "model_name": "m", "rpm": 10, "tpm": 100, "burst_capacity": 5, "priority": 3, "workload_type": "light"}]}`, nil},
		{"key fields", `{"keys": [{"key_id": "flash_01", "rpn": 15, "model_name": "m", "rpm": 10, "tpm": 100, "Priority": 1, "prority": 2, "notes": "x"}]}`, []string{
			`key flash_01: unknown field "rpn" (did you mean "rpm"?)`,
			`key flash_01: unknown field "Priority" (did you mean "priority"?)`,
			`key flash_01: unknown field "prority" (did you mean "priority"?)`,
			`key flash_01: unknown field "notes"`}},
		{"everywhere, in file order", `{
  "acess": {},
  "keys": [
    {"key_id": "k1", "models": {"gemini-2.5-flash": {"rpm": 10, "tpm": 250000, "rpdd": 250}}, "x": 1}
  ],
  "access": {"leese": {}, "lease": {"uid": [1]}},
  "lease_tll": "5m"
}`, []string{
			`unknown top-level field "acess" (did you mean "access"?)`,
			`key k1: model gemini-2.5-flash: unknown field "rpdd" (did you mean "rpd"?)`,
			`key k1: unknown field "x"`,
			`access: unknown field "leese" (did you mean "lease"?)`,
			`access.lease: unknown field "uid" (did you mean "uids"?)`,
			`unknown top-level field "lease_tll" (did you mean "lease_ttl"?)`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := load(t, t.TempDir(), tc.json, nil, env{"GEMINI_KEY_a": "s", "GEMINI_KEY_flash_01": "s", "GEMINI_KEY_k1": "s"})
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(c.Warnings, tc.want) {
				t.Errorf("warnings:\n%s\nwant:\n%s", strings.Join(c.Warnings, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}

func TestExtensions(t *testing.T) {
	c, err := load(t, t.TempDir(), `{
  "day_reset_timezone": "Europe/Berlin",
  "lease_ttl": "90s",
  "default_tokens": 5000,
  "access": {"lease": {"uids": ["alice", 1003], "groups": ["keyd", 20]}, "admin": {"uids": ["bob"]}},
  "keys": [
    {"key_id": "k1", "project": "p1", "enabled": false, "max_in_flight": 2, "secret_env": "MY_KEY",
     "models": {"gemini-2.5-flash": {"rpm": 10, "tpm": 250000, "rpd": 250, "burst_capacity": 5},
                "gemini-2.5-pro": {"rpm": 5, "tpm": 250000, "rpd": 100}}},
    {"key_id": "k2", "project": "p1", "model_name": "gemini-2.5-flash", "rpm": 10, "tpm": 250000, "rpd": 250, "burst_capacity": 5}
  ]
}`, nil, env{"MY_KEY": "s1", "GEMINI_KEY_k2": "s2"})
	if err != nil {
		t.Fatal(err)
	}
	flash := Limits{RPM: 10, TPM: 250000, RPD: 250, BurstCapacity: 5}
	pro := Limits{RPM: 5, TPM: 250000, RPD: 100}
	k1, k2 := c.Key("k1"), c.Key("k2")
	if k1.Enabled || k1.MaxInFlight != 2 || k1.SecretEnv != "MY_KEY" || k1.Secret != "s1" || k1.Project != "p1" ||
		!slices.Equal(k1.ModelNames(), []string{"gemini-2.5-flash", "gemini-2.5-pro"}) || k1.Models["gemini-2.5-pro"] != pro {
		t.Errorf("k1: %+v", *k1)
	}
	if !k2.Enabled || k2.Project != "p1" || k2.Models["gemini-2.5-flash"] != flash {
		t.Errorf("k2: %+v", *k2)
	}
	wantBuckets := map[BucketID]Limits{{"p1", "gemini-2.5-flash"}: flash, {"p1", "gemini-2.5-pro"}: pro}
	if len(c.Buckets) != 2 || c.Buckets[BucketID{"p1", "gemini-2.5-flash"}] != flash || c.Buckets[BucketID{"p1", "gemini-2.5-pro"}] != pro {
		t.Errorf("buckets %v, want %v", c.Buckets, wantBuckets)
	}
	if c.DayResetLocation.String() != "Europe/Berlin" || c.LeaseTTL != 90*time.Second || c.DefaultTokens != 5000 {
		t.Errorf("top level: %v %v %v", c.DayResetLocation, c.LeaseTTL, c.DefaultTokens)
	}
	want := Access{Lease: Principals{UIDs: []uint32{1001, 1003}, GIDs: []uint32{990, 20}}, Admin: Principals{UIDs: []uint32{1002}}}
	if fmt.Sprint(c.Access) != fmt.Sprint(want) {
		t.Errorf("access %+v, want %+v", c.Access, want)
	}
	if !slices.Equal(c.Models(), []string{"gemini-2.5-flash", "gemini-2.5-pro"}) {
		t.Errorf("models %v", c.Models())
	}
}

func TestSecrets(t *testing.T) {
	const oneKey = `{"keys": [{"key_id": "a", "model_name": "m", "rpm": 10, "tpm": 100}]}`
	for _, tc := range []struct {
		name                    string
		env                     env
		dotenv, cred            string // "" writes no file
		credDir                 bool   // set CREDENTIALS_DIRECTORY
		secret, source, message string
	}{
		{"environment first", env{"GEMINI_KEY_a": "from-env"}, "GEMINI_KEY_a=from-dotenv\n", "from-cred", true,
			"from-env", "environment", ""},
		{".env second", nil, "GEMINI_KEY_a=from-dotenv\n", "from-cred", true,
			"from-dotenv", ".env file DIR/.env", ""},
		{"credential third", nil, "OTHER=x\n", "from-cred\n", true,
			"from-cred", "credential DIR/creds/a", ""},
		{"blank values fall through", env{"GEMINI_KEY_a": "  "}, "GEMINI_KEY_a=\n", "from-cred\n", true,
			"from-cred", "credential DIR/creds/a", ""},
		{"surrounding space trimmed", env{"GEMINI_KEY_a": " from-env\n"}, "", "", false,
			"from-env", "environment", ""},
		{"none, no .env", nil, "", "", false,
			"", "", "key a: no secret: set GEMINI_KEY_a in the environment or .env (DIR/.env)"},
		{"none, with credentials", nil, "", "", true,
			"", "", "key a: no secret: set GEMINI_KEY_a in the environment or .env (DIR/.env), or write it to credential DIR/creds/a"},
		{"all blank", env{"GEMINI_KEY_a": " "}, "GEMINI_KEY_a=''\n", "\n", true, "", "",
			"key a: no secret: GEMINI_KEY_a in the environment is empty: GEMINI_KEY_a in .env file DIR/.env is empty: credential DIR/creds/a is empty: " +
				"set GEMINI_KEY_a in the environment or .env (DIR/.env), or write it to credential DIR/creds/a"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			files := map[string]string{}
			if tc.dotenv != "" {
				files[".env"] = tc.dotenv
			}
			e := env{}
			for k, v := range tc.env {
				e[k] = v
			}
			if tc.credDir {
				e["CREDENTIALS_DIRECTORY"] = filepath.Join(dir, "creds")
				if err := os.Mkdir(filepath.Join(dir, "creds"), 0o700); err != nil {
					t.Fatal(err)
				}
				if tc.cred != "" {
					files["creds/a"] = tc.cred
				}
			}
			c, err := load(t, dir, oneKey, files, e)
			if err != nil {
				t.Fatal(err)
			}
			k := c.Keys[0]
			undir := func(s string) string { return strings.ReplaceAll(s, dir, "DIR") }
			if k.Secret != tc.secret || undir(k.SecretSource) != tc.source || undir(k.SecretError) != tc.message {
				t.Errorf("got secret %q from %q, error %q\nwant secret %q from %q, error %q",
					k.Secret, undir(k.SecretSource), undir(k.SecretError), tc.secret, tc.source, tc.message)
			}
		})
	}
}

func TestSecretFileErrors(t *testing.T) {
	const oneKey = `{"keys": [{"key_id": "a", "model_name": "m", "rpm": 10, "tpm": 100}]}`
	// unreadable makes path unreadable: mode 000, or, for root, who reads
	// anything, a directory in its place.
	unreadable := func(t *testing.T, path string) {
		t.Helper()
		if err := os.WriteFile(path, []byte("GEMINI_KEY_a=x\n"), 0o000); err != nil {
			t.Fatal(err)
		}
		if _, err := os.ReadFile(path); err == nil {
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
			if err := os.Mkdir(path, 0o700); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Run("unreadable .env", func(t *testing.T) {
		dir := t.TempDir()
		unreadable(t, filepath.Join(dir, ".env"))
		_, err := load(t, dir, oneKey, nil, env{"GEMINI_KEY_a": "x"})
		if err == nil || !strings.HasPrefix(err.Error(), "cannot read .env file DIR/.env: ") || !strings.HasSuffix(err.Error(), ": make it readable by keyd or remove it") {
			t.Errorf("err = %v", err)
		}
	})
	t.Run(".env does not parse", func(t *testing.T) {
		_, err := load(t, t.TempDir(), oneKey, map[string]string{".env": "# keys\nA=1\nGEMINI_KEY_a='AIzaUnterminated\nB=2\n"}, env{})
		if want := ".env file DIR/.env: line 3 does not parse: write NAME=value, quoting a value that spans lines"; err == nil || err.Error() != want {
			t.Errorf("err = %v\nwant  %s", err, want)
		}
	})
	t.Run(".env elsewhere", func(t *testing.T) {
		dir := t.TempDir()
		writeFiles(t, dir, map[string]string{"keys.json": oneKey, "secrets.env": "GEMINI_KEY_a=x\n"})
		c, err := Load(filepath.Join(dir, "keys.json"), Options{EnvFile: filepath.Join(dir, "secrets.env"), Getenv: env{}.get})
		if err != nil || c.EnvFile != filepath.Join(dir, "secrets.env") || c.Keys[0].SecretSource != ".env file "+c.EnvFile {
			t.Errorf("err %v, config %+v", err, c)
		}
	})
	t.Run("unreadable credential", func(t *testing.T) {
		dir := t.TempDir()
		if err := os.Mkdir(filepath.Join(dir, "creds"), 0o700); err != nil {
			t.Fatal(err)
		}
		unreadable(t, filepath.Join(dir, "creds", "a"))
		_, err := load(t, dir, oneKey, nil, env{"CREDENTIALS_DIRECTORY": filepath.Join(dir, "creds")})
		if err == nil || !strings.HasPrefix(err.Error(), "key a: cannot read credential DIR/creds/a: ") {
			t.Errorf("err = %v", err)
		}
	})
}

// TestNoSecretInMessages loads broken and suspicious files whose keys all
// have secrets and checks that no message quotes one.
func TestNoSecretInMessages(t *testing.T) {
	secrets := []string{"AIzaSyEnvSecret0001", "AIzaSyDotenvSecret02", "AIzaSyCredSecret0003"}
	files := map[string]string{".env": "GEMINI_KEY_b=" + secrets[1] + "\n", "creds/c": secrets[2]}
	e := env{"GEMINI_KEY_a": secrets[0], "GEMINI_KEY_d": secrets[0]}
	for _, keys := range []string{
		// Valid, with warnings and a key without a secret.
		`{"keys": [{"key_id": "a", "model_name": "m", "rpm": 10, "tpm": 100, "secret": "x"},
		  {"key_id": "b", "model_name": "m", "rpm": 10, "tpm": 100}, {"key_id": "c", "model_name": "m", "rpm": 10, "tpm": 100},
		  {"key_id": "d", "model_name": "m", "rpm": 10, "tpm": 100}, {"key_id": "e", "model_name": "m", "rpm": 10, "tpm": 100}]}`,
		// Broken, with the secret's name and the secret misplaced.
		`{"keys": [{"key_id": "a", "model_name": "m", "rpm": 10, "tpm": 100, "secret_env": "AIzaSyEnvSecret0001"},
		  {"key_id": "b", "model_name": "m", "rpm": "x", "tpm": 100}, {"key_id": "c", "model_name": "m", "rpm": 10, "tpm": 100}]}`,
	} {
		dir := t.TempDir()
		if err := os.Mkdir(filepath.Join(dir, "creds"), 0o700); err != nil {
			t.Fatal(err)
		}
		e["CREDENTIALS_DIRECTORY"] = filepath.Join(dir, "creds")
		c, err := load(t, dir, keys, files, e)
		var msgs []string
		if err != nil {
			msgs = append(msgs, err.Error())
		} else {
			s := c.Summary()
			msgs = append(msgs, s.Warnings...)
			msgs = append(msgs, fmt.Sprint(s))
			if len(c.Warnings) == 0 || len(s.MissingSecrets) != 1 {
				t.Errorf("want warnings and a missing secret: %+v", s)
			}
		}
		// A .env file that does not parse, on the secret's line.
		writeFiles(t, dir, map[string]string{".env": "GEMINI_KEY_b=\"" + secrets[1] + "\n"})
		if _, err := load(t, dir, keys, nil, e); err != nil {
			msgs = append(msgs, err.Error())
		}
		for _, m := range msgs {
			for _, s := range secrets {
				if strings.Contains(m, s) || strings.Contains(m, s[4:]) {
					t.Errorf("message shows secret %s:\n%s", s, m)
				}
			}
		}
	}
}

func TestSummary(t *testing.T) {
	c, err := load(t, t.TempDir(), `{"keys": [
  {"key_id": "a", "model_name": "m", "rpm": 10, "tpm": 100},
  {"key_id": "b", "model_name": "m", "rpm": 10, "tpm": 100, "enabled": false},
  {"key_id": "c", "models": {"n": {"rpm": 1, "tpm": 1}, "m": {"rpm": 10, "tpm": 100}}},
  {"key_id": "d", "model_name": "m", "rpm": 10, "tpm": 100, "project": "a", "enabled": true}
]}`, nil, env{"GEMINI_KEY_a": "s", "GEMINI_KEY_b": "t", "GEMINI_KEY_d": "t"})
	if err != nil {
		t.Fatal(err)
	}
	s := c.Summary()
	wantWarnings := []string{
		`keys b and d have the same secret but different projects: set the same "project" on both`,
		"key c: no secret: set GEMINI_KEY_c in the environment or .env (" + c.EnvFile + ")",
	}
	if s.KeysTotal != 4 || s.KeysLoaded != 2 || s.SecretsFound != 3 || !slices.Equal(s.MissingSecrets, []string{"c"}) ||
		!slices.Equal(s.ModelsPerKey["c"], []string{"m", "n"}) || !slices.Equal(s.Warnings, wantWarnings) {
		t.Errorf("summary %+v", s)
	}
}

func TestNearest(t *testing.T) {
	models := []string{"gemini-2.0-flash", "gemini-2.5-pro"}
	for _, tc := range []struct {
		name string
		in   []string
		want string
	}{
		{"rpn", limitFields, "rpm"},
		{"TPM", limitFields, "tpm"},
		{"tp", limitFields, "tpm"},
		{"x", limitFields, ""},
		{"workload", keyFields, ""},
		{"gemini-2.5-flash", models, "gemini-2.0-flash"},
		{"gemini-1.5-pro", models, "gemini-2.5-pro"},
		{"gpt-4", models, ""},
		{"flash01", []string{"flash_01", "pro_01"}, "flash_01"},
		{"a", nil, ""},
	} {
		if got := Nearest(tc.name, tc.in); got != tc.want {
			t.Errorf("Nearest(%q) = %q, want %q", tc.name, got, tc.want)
		}
	}
}
