package keyctl

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const (
	secretA = "AIzaSyAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAaaaa"
	secretB = "AIzaSyBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBbbbb"
	secretC = "AIzaSyCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCcccc"
)

const goodKeys = `{
  "keys": [
    {"key_id": "flash_01", "project": "proj-a", "model_name": "gemini-2.5-flash", "rpm": 10, "tpm": 250000, "rpd": 250, "priority": 3, "workload_type": "light"},
    {"key_id": "flash_02", "project": "proj-a", "model_name": "gemini-2.5-flash", "rpm": 10, "tpm": 250000, "rpd": 250},
    {"key_id": "pro_01", "models": {"gemini-2.5-pro": {"rpm": 5, "tpm": 125000, "burst_capacity": 2},
                                    "gemini-2.5-flash": {"rpm": 10, "tpm": 250000}}}
  ]
}`

// writeConfig writes files into a new directory and returns its path.
func writeConfig(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// noSecrets fails if any test secret shows in r's output.
func noSecrets(t *testing.T, r result) {
	t.Helper()
	for _, s := range []string{secretA, secretB, secretC, "AIzaSy"} {
		lacks(t, "stdout", r.stdout, s)
		lacks(t, "stderr", r.stderr, s)
	}
}

func TestCheckAllGood(t *testing.T) {
	dir := writeConfig(t, map[string]string{
		"keys.json": goodKeys,
		".env":      "GEMINI_KEY_pro_01=" + secretC + "\n",
	})
	vars := map[string]string{"GEMINI_KEY_flash_01": secretA, "GEMINI_KEY_flash_02": secretB}
	r := keyctl(t, vars, "", "check", filepath.Join(dir, "keys.json")).want(t, 0)
	noSecrets(t, r)
	out := r.stdout
	contains(t, "check", out,
		"config: "+filepath.Join(dir, "keys.json")+"\n",
		"env file: "+filepath.Join(dir, ".env")+"\n",
		"keys loaded: 3/3\n",
		"secrets found: 3/3\n",
		"warnings: none\n",
		"ok: keyd would lease all 3 keys\n",
		"models: gemini-2.5-flash, gemini-2.5-pro\n",
	)
	flat := strings.Join(strings.Fields(out), " ")
	for _, want := range []string{
		"KEY PROJECT ENABLED PRIORITY WORKLOAD SECRET FROM MODELS",
		"flash_01 proj-a yes 3 light …aaaa environment gemini-2.5-flash",
		"pro_01 pro_01 yes 0 - …cccc .env gemini-2.5-flash,gemini-2.5-pro",
		"PROJECT MODEL RPM TPM RPD BURST KEYS",
		"proj-a gemini-2.5-flash 10 250000 250 - flash_01,flash_02",
		"pro_01 gemini-2.5-flash 10 250000 - - pro_01",
		"pro_01 gemini-2.5-pro 5 125000 - 2 pro_01",
	} {
		if !strings.Contains(flat, want) {
			t.Errorf("check lacks %q:\n%s", want, out)
		}
	}
	keyctl(t, vars, "", "check", "--strict", filepath.Join(dir, "keys.json")).want(t, 0)
}

func TestCheckMissingSecretsAndWarnings(t *testing.T) {
	dir := writeConfig(t, map[string]string{"keys.json": strings.Replace(goodKeys, `"rpd": 250}`, `"rpd": 250, "rpn": 3}`, 1)})
	path := filepath.Join(dir, "keys.json")
	vars := map[string]string{"GEMINI_KEY_flash_01": secretA}
	r := keyctl(t, vars, "", "check", path).want(t, 0)
	noSecrets(t, r)
	contains(t, "check", r.stdout,
		"keys loaded: 1/3",
		"secrets found: 1/3 (missing: flash_02, pro_01)\n",
		"GEMINI_KEY_flash_02",
		"GEMINI_KEY_pro_01",
		"missing $GEMINI_KEY_flash_02",
		"WARNINGS (1):\n",
		`"rpn"`,
		"valid: keyd would lease 1 of 3 keys (2 missing secrets, 1 warning)\n",
	)
	if r.stderr != "" {
		t.Errorf("stderr = %q", r.stderr)
	}

	r = keyctl(t, vars, "", "check", "--strict", path).want(t, exitError)
	if r.stderr != "keyctl: --strict: 1 warning and 2 missing secrets\n" {
		t.Errorf("--strict stderr = %q", r.stderr)
	}
	contains(t, "--strict stdout", r.stdout, "secrets found: 1/3") // the diagnosis still prints

	// --json: the same diagnosis, for scripts.
	r = keyctl(t, vars, "", "check", path, "--json").want(t, 0)
	noSecrets(t, r)
	var res checkResult
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatal(err)
	}
	if res.KeysTotal != 3 || res.KeysLoaded != 1 || res.SecretsFound != 1 || len(res.MissingSecrets) != 2 ||
		len(res.Warnings) != 1 || len(res.Keys) != 3 || len(res.Buckets) != 3 {
		t.Errorf("--json = %+v", res)
	}
	if k := res.Keys[0]; k.SecretHint != "…aaaa" || k.SecretSource != "environment" {
		t.Errorf("key = %+v", k)
	}
}

func TestCheckEnvFileFlag(t *testing.T) {
	dir := writeConfig(t, map[string]string{
		"keys.json":   goodKeys,
		"secrets.env": "GEMINI_KEY_flash_01=" + secretA + "\nGEMINI_KEY_flash_02=" + secretB + "\nGEMINI_KEY_pro_01=" + secretC + "\n",
	})
	envFile := filepath.Join(dir, "secrets.env")
	r := keyctl(t, nil, "", "check", "--env-file", envFile, filepath.Join(dir, "keys.json")).want(t, 0)
	noSecrets(t, r)
	contains(t, "check", r.stdout, "env file: "+envFile+"\n", "secrets found: 3/3\n")
}

func TestCheckDefaultPath(t *testing.T) {
	dir := writeConfig(t, map[string]string{"keys.json": goodKeys})
	r := keyctl(t, map[string]string{"KEYD_CONFIG": filepath.Join(dir, "keys.json")}, "", "check").want(t, 0)
	contains(t, "check", r.stdout, "config: "+filepath.Join(dir, "keys.json"), "secrets found: 0/3", "NOT USABLE")

	t.Chdir(dir)
	r = keyctl(t, nil, "", "check").want(t, 0)
	contains(t, "check", r.stdout, "config: "+filepath.Join(dir, "keys.json"))
}

func TestCheckInvalid(t *testing.T) {
	dir := writeConfig(t, map[string]string{
		"bad.json":    `{"keys": [{"key_id": "a", "model_name": "m", "rpm": 0, "tpm": 5}, {"key_id": "a", "model_name": "m", "rpm": 1, "tpm": 1}]}`,
		"syntax.json": `{"keys": [`,
		"leak.json":   `{"keys": [{"key_id": "a", "model_name": "m", "rpm": 1, "tpm": 1, "secret_env": "` + secretA + `"}]}`,
	})
	r := keyctl(t, nil, "", "check", filepath.Join(dir, "bad.json")).want(t, exitError)
	contains(t, "stderr", r.stderr, "keyctl: "+filepath.Join(dir, "bad.json")+" is not valid (2 problems):\n  ", "duplicate key_id")
	if r.stdout != "" {
		t.Errorf("stdout = %q", r.stdout)
	}

	r = keyctl(t, nil, "", "check", filepath.Join(dir, "syntax.json")).want(t, exitError)
	contains(t, "stderr", r.stderr, "keyctl: "+filepath.Join(dir, "syntax.json")+" is not valid: ")

	r = keyctl(t, nil, "", "check", filepath.Join(dir, "leak.json")).want(t, exitError)
	noSecrets(t, r)

	r = keyctl(t, nil, "", "check", filepath.Join(dir, "missing.json")).want(t, exitError)
	if want := "keyctl: config file " + filepath.Join(dir, "missing.json") + " does not exist: name it (keyctl check PATH) or set KEYD_CONFIG\n"; r.stderr != want {
		t.Errorf("stderr = %q\nwant %q", r.stderr, want)
	}

	r = keyctl(t, nil, "", "check", "--json", filepath.Join(dir, "bad.json")).want(t, exitError)
	var res checkResult
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || !strings.Contains(res.Error, "duplicate key_id") {
		t.Errorf("--json = %q (%v)", r.stdout, err)
	}
}
