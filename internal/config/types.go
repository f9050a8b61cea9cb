// Package config loads, validates and reports keyd's configuration:
// keys.json (the seed's format plus keyd's extensions) and the secrets of
// its keys (environment, .env file, systemd credentials).
//
// Loading never degrades silently: a file that cannot be used is an error
// naming file:line:column and the fix; anything suspicious but usable (an
// unknown field, a key without a secret) is a Warning or a Key.SecretError
// that keyd logs and shows in keyctl status and keyctl check.
package config

import (
	"slices"
	"time"
)

// Limits are the provider limits of one (project, model) bucket. A zero
// field means "no limit" for RPD and "no pacing" for BurstCapacity; RPM
// and TPM are always positive after validation.
type Limits struct {
	RPM           int64 `json:"rpm"`
	TPM           int64 `json:"tpm"`
	RPD           int64 `json:"rpd,omitempty"`
	BurstCapacity int64 `json:"burst_capacity,omitempty"`
}

// BucketID names a quota bucket: limits are per (Google Cloud project, model).
type BucketID struct {
	Project string
	Model   string
}

func (b BucketID) String() string { return b.Project + "/" + b.Model }

// Key is one configured API key. Secret is never printed; use SecretHint.
type Key struct {
	ID           string
	Project      string // the key's project; the key's ID when keys.json names none
	Priority     int    // higher is preferred
	WorkloadType string
	Enabled      bool   // false: configured but never leased
	MaxInFlight  int64  // 0: unlimited
	SecretEnv    string // variable name looked up, e.g. GEMINI_KEY_flash_01
	// Models maps each model the key serves to its bucket's limits.
	Models map[string]Limits
	// Secret is the API key, or empty when none was found.
	Secret string
	// SecretSource says where Secret came from: "environment",
	// ".env file PATH" or "credential PATH"; empty when none.
	SecretSource string
	// SecretError explains why Secret is empty, with the fix, e.g.
	// "key flash_02: no secret: set GEMINI_KEY_flash_02 in the environment or .env".
	SecretError string
}

// ModelNames returns the key's models, sorted.
func (k *Key) ModelNames() []string { return sortedKeys(k.Models) }

// SecretHint is "…" plus at most the last 4 characters of the secret (fewer
// for short secrets, so that at most half of it shows), or "" without one.
func (k *Key) SecretHint() string {
	s := k.Secret
	if s == "" {
		return ""
	}
	n := min(4, len(s)/2)
	return "…" + s[len(s)-n:]
}

// Access says which peers may do what over the socket. Root and keyd's own
// uid are always admin; admin implies lease.
type Access struct {
	Lease Principals
	Admin Principals
}

// Principals is a set of uids and gids (names resolved at load time).
type Principals struct {
	UIDs []uint32
	GIDs []uint32
}

// Config is a loaded, validated configuration. It is immutable once
// returned by Load: the daemon swaps whole Configs on reload.
type Config struct {
	Path    string // keys.json, absolute
	EnvFile string // the .env file consulted (may not exist), absolute
	// Keys in file order.
	Keys []*Key
	// Buckets holds the limits of every (project, model) bucket.
	Buckets map[BucketID]Limits
	// DayResetLocation is day_reset_timezone (default America/Los_Angeles).
	DayResetLocation *time.Location
	LeaseTTL         time.Duration // default 10m
	DefaultTokens    int64         // default 1000
	// WindowMargin is added to the 60 s RPM and TPM windows: a grant holds
	// its slot 60 s + WindowMargin, covering the time its request takes to
	// reach Gemini (default 1s).
	WindowMargin time.Duration
	Access       Access
	// Warnings are problems that did not stop loading, each naming the key
	// and field, e.g. `key flash_01: unknown field "rpn" (did you mean "rpm"?)`.
	Warnings []string
	// Raw is the exact bytes of keys.json, to detect no-op reloads.
	Raw []byte
}

// Models returns every configured model, sorted.
func (c *Config) Models() []string {
	set := map[string]bool{}
	for _, k := range c.Keys {
		for m := range k.Models {
			set[m] = true
		}
	}
	return sortedKeys(set)
}

// Key returns the key with the given ID, or nil.
func (c *Config) Key(id string) *Key {
	for _, k := range c.Keys {
		if k.ID == id {
			return k
		}
	}
	return nil
}

// Options say where Load looks for things. The zero value uses the process
// environment and the .env file beside keys.json.
type Options struct {
	// EnvFile is the .env file; "" means ".env" in keys.json's directory.
	// A missing file is fine; an unreadable one is an error.
	EnvFile string
	// Getenv looks up the process environment; nil means os.Getenv.
	Getenv func(string) string
	// CredentialsDir is systemd's $CREDENTIALS_DIRECTORY; "" means the
	// value of that variable through Getenv.
	CredentialsDir string
	// LookupUser and LookupGroup resolve names in the access section; nil
	// means os/user.
	LookupUser  func(name string) (uint32, error)
	LookupGroup func(name string) (uint32, error)
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
