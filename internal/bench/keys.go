package bench

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Key is one generated key: its keys.json entry and its secret.
type Key struct {
	ID       string
	Project  string
	Model    string
	Priority int
	RPM, TPM int64
	RPD      int64
	Secret   string
}

// Unreachable limits: no run of these benchmarks can reach them, so every
// lease is granted and both systems do the same work per lease.
const (
	bigRPM = 1_000_000_000
	bigTPM = 1_000_000_000_000
)

// GenKeys returns n keys of model spread round-robin over projects
// projects (at most n: a project needs a key), with limits no run
// reaches and made-up secrets.
func GenKeys(n, projects int, model string) []Key {
	projects = max(1, min(projects, n))
	keys := make([]Key, n)
	for i := range keys {
		id := fmt.Sprintf("k%05d", i)
		keys[i] = Key{ID: id, Project: fmt.Sprintf("p%03d", i%projects), Model: model,
			RPM: bigRPM, TPM: bigTPM, Secret: "AIzaBENCH-" + id + "-made-up-secret-0123456789"}
	}
	return keys
}

// CompareKeys are the keys of the Redis comparison: those of keyd's own
// BenchmarkLeaseReport, 4 keys in 2 projects.
func CompareKeys(model string) []Key { return GenKeys(4, 2, model) }

// WriteKeys writes keys.json and .env for keys into dir and returns their
// paths.
func WriteKeys(dir string, keys []Key) (config, env string, err error) {
	type entry struct {
		KeyID     string `json:"key_id"`
		Project   string `json:"project"`
		ModelName string `json:"model_name"`
		RPM       int64  `json:"rpm"`
		TPM       int64  `json:"tpm"`
		RPD       int64  `json:"rpd,omitempty"`
		Priority  int    `json:"priority,omitempty"`
	}
	doc := struct {
		DefaultTokens int64   `json:"default_tokens"`
		Keys          []entry `json:"keys"`
	}{DefaultTokens: 1000}
	var envb strings.Builder
	for _, k := range keys {
		doc.Keys = append(doc.Keys, entry{KeyID: k.ID, Project: k.Project, ModelName: k.Model,
			RPM: k.RPM, TPM: k.TPM, RPD: k.RPD, Priority: k.Priority})
		fmt.Fprintf(&envb, "GEMINI_KEY_%s=%s\n", k.ID, k.Secret)
	}
	b, err := json.MarshalIndent(doc, "", " ")
	if err != nil {
		return "", "", err
	}
	config, env = filepath.Join(dir, "keys.json"), filepath.Join(dir, ".env")
	if err := os.WriteFile(config, b, 0o600); err != nil {
		return "", "", err
	}
	if err := os.WriteFile(env, []byte(envb.String()), 0o600); err != nil {
		return "", "", err
	}
	return config, env, nil
}
