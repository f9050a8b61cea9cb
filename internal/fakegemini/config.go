package fakegemini

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Config describes the fake's world: its keys, the projects they belong to,
// the models it serves and their limits.
type Config struct {
	// Keys are the API keys the fake knows. A request with any other key
	// gets 400 API_KEY_INVALID.
	Keys []Key `json:"keys"`
	// Models are the models served, in the order models.list lists them.
	// A request for any other model gets 404 NOT_FOUND.
	Models []Model `json:"models"`
	// Projects optionally set a project's tier and per-model limits. A
	// project named by a key but not listed here uses each model's defaults.
	Projects []Project `json:"projects,omitempty"`
	// QuotaFormat selects the shape of the 429 of an exceeded limit:
	// QuotaClassic (the default) or QuotaNewer.
	QuotaFormat QuotaFormat `json:"quota_format,omitempty"`
	// Latency delays every answer to a request that passed auth, named a
	// known model and had a valid body: after the request is admitted and
	// recorded, before the first byte (faults and 429s of limits included).
	// Errors of auth, model and body come at once. Zero: none.
	Latency time.Duration `json:"-"`
	// Clock is the time source for windows, days and records; nil means
	// time.Now. Server.Advance shifts it further. It should not run
	// backward: a window already pruned is not restored.
	Clock func() time.Time `json:"-"`
	// PageSize is models.list's default page size (the real API's is 50).
	// Zero means 50.
	PageSize int `json:"page_size,omitempty"`
	// Faults are fault rules installed at start; see FaultRule.
	Faults []FaultRule `json:"faults,omitempty"`
}

// Key is one API key and the project it belongs to.
type Key struct {
	// Key is the secret as sent in x-goog-api-key or ?key=.
	Key string `json:"key"`
	// Project is the Google Cloud project of the key; keys of one project
	// share its quota. Empty: the key is its own project, named after the
	// key.
	Project string `json:"project,omitempty"`
	// State is how the real API would treat the key; empty means KeyOK.
	State KeyState `json:"state,omitempty"`
}

// KeyState is what the API answers a key with.
type KeyState string

// Key states.
const (
	KeyOK        KeyState = "ok"        // served
	KeyInvalid   KeyState = "invalid"   // 400 API_KEY_INVALID "API key not valid. Please pass a valid API key."
	KeyNotFound  KeyState = "not_found" // 400 API_KEY_INVALID "API Key not found. Please pass a valid API key."
	KeyLeaked    KeyState = "leaked"    // 403 PERMISSION_DENIED "Your API key was reported as leaked. ..."
	KeySuspended KeyState = "suspended" // 403 PERMISSION_DENIED, ErrorInfo CONSUMER_SUSPENDED
)

// Tier is the billing tier of a project. It names the quota ids and
// metrics of a 429: a free-tier project's end in "-FreeTier" and use the
// free-tier metrics.
type Tier string

// Tiers.
const (
	Free Tier = "free"
	Paid Tier = "paid"
)

// QuotaFormat is the shape of a limit 429.
type QuotaFormat string

// Quota formats.
const (
	// QuotaClassic is the mid-2025 body: the short message, details in
	// the order QuotaFailure, Help, RetryInfo.
	QuotaClassic QuotaFormat = "classic"
	// QuotaNewer is the late-2025 body: the message lists every violation
	// ("* Quota exceeded for metric: M, limit: N, model: X") and ends in
	// "Please retry in N.NNNs."; details in the order Help, QuotaFailure,
	// RetryInfo.
	QuotaNewer QuotaFormat = "newer"
)

// Limits are the quotas of one (project, model) bucket. Zero means no limit
// for that dimension.
type Limits struct {
	// RPM is the most requests in any sliding 60 s window.
	RPM int `json:"rpm,omitempty"`
	// TPM is the most input (prompt) tokens in any sliding 60 s window.
	TPM int `json:"tpm,omitempty"`
	// RPD is the most requests per calendar day of America/Los_Angeles.
	RPD int `json:"rpd,omitempty"`
	// Unavailable means every limit is 0: the model is not available to
	// the project's tier, and every request gets a 429 whose quotas have
	// quotaValue "0" ("limit: 0").
	Unavailable bool `json:"unavailable,omitempty"`
}

// Model is one model the fake serves.
type Model struct {
	// Name without the "models/" prefix, e.g. "gemini-2.5-flash".
	Name string `json:"name"`
	// DisplayName for models.list; empty: derived from Name.
	DisplayName string `json:"display_name,omitempty"`
	// Limits are the defaults of every project's bucket for this model.
	Limits
	// Tier of the buckets of this model in projects that set none; empty
	// means Paid.
	Tier Tier `json:"tier,omitempty"`
	// InputTokenLimit and OutputTokenLimit for models.list; zero means
	// 1048576 and 65536. A prompt over InputTokenLimit gets 400.
	InputTokenLimit  int `json:"input_token_limit,omitempty"`
	OutputTokenLimit int `json:"output_token_limit,omitempty"`
	// OutputTokens is the length of every answer in tokens, unless
	// maxOutputTokens is smaller (see the token-count rule in tokens.go);
	// zero means 20.
	OutputTokens int `json:"output_tokens,omitempty"`
	// ThoughtsTokens is the thoughtsTokenCount of every answer, unless
	// the request's thinkingBudget is 0 (none) or smaller (capped). Zero:
	// the model does not think.
	ThoughtsTokens int `json:"thoughts_tokens,omitempty"`
	// StreamChunks is how many chunks a stream has (at most one per output
	// token); zero means 3.
	StreamChunks int `json:"stream_chunks,omitempty"`
}

// Project sets the tier and limits of one Google Cloud project.
type Project struct {
	Name string `json:"name"`
	// Tier of all the project's buckets; empty: each model's Tier.
	Tier Tier `json:"tier,omitempty"`
	// Number is the project number named by a suspended key's 403
	// ("projects/NUMBER"); zero: derived from Name.
	Number int64 `json:"number,omitempty"`
	// Models replaces, per model name, the model's default Limits for
	// this project (all four fields together).
	Models map[string]Limits `json:"models,omitempty"`
}

// Defaults of Model fields.
const (
	DefaultOutputTokens     = 20
	DefaultStreamChunks     = 3
	DefaultInputTokenLimit  = 1048576
	DefaultOutputTokenLimit = 65536
	DefaultPageSize         = 50
)

// Validate reports every problem of c at once, joined; nil if none.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }

	models := map[string]bool{}
	for i, m := range c.Models {
		switch {
		case m.Name == "":
			bad("models[%d]: name is empty", i)
		case strings.HasPrefix(m.Name, "models/"):
			bad("models[%d]: name %q: leave out the \"models/\" prefix", i, m.Name)
		case strings.ContainsAny(m.Name, ":/?# "):
			bad("models[%d]: name %q holds one of \":/?# \"", i, m.Name)
		case models[m.Name]:
			bad("models[%d]: model %q listed twice", i, m.Name)
		}
		models[m.Name] = true
		if err := m.Limits.validate(); err != nil {
			bad("models[%d] (%s): %v", i, m.Name, err)
		}
		if err := m.Tier.validate(); err != nil {
			bad("models[%d] (%s): %v", i, m.Name, err)
		}
		if m.InputTokenLimit < 0 || m.OutputTokenLimit < 0 || m.OutputTokens < 0 || m.ThoughtsTokens < 0 || m.StreamChunks < 0 {
			bad("models[%d] (%s): token limits and counts must not be negative", i, m.Name)
		}
	}
	projects := map[string]bool{}
	for i, p := range c.Projects {
		if p.Name == "" {
			bad("projects[%d]: name is empty", i)
		} else if projects[p.Name] {
			bad("projects[%d]: project %q listed twice", i, p.Name)
		}
		projects[p.Name] = true
		if err := p.Tier.validate(); err != nil {
			bad("projects[%d] (%s): %v", i, p.Name, err)
		}
		for name, l := range p.Models {
			if !models[name] {
				bad("projects[%d] (%s): limits for unknown model %q", i, p.Name, name)
			}
			if err := l.validate(); err != nil {
				bad("projects[%d] (%s) model %s: %v", i, p.Name, name, err)
			}
		}
	}
	keys := map[string]bool{}
	for i, k := range c.Keys {
		switch {
		case k.Key == "":
			bad("keys[%d]: key is empty", i)
		case keys[k.Key]:
			bad("keys[%d]: key listed twice", i)
		}
		keys[k.Key] = true
		switch k.State {
		case "", KeyOK, KeyInvalid, KeyNotFound, KeyLeaked, KeySuspended:
		default:
			bad("keys[%d]: unknown state %q (want ok, invalid, not_found, leaked or suspended)", i, k.State)
		}
	}
	switch c.QuotaFormat {
	case "", QuotaClassic, QuotaNewer:
	default:
		bad("quota_format %q: want %q or %q", c.QuotaFormat, QuotaClassic, QuotaNewer)
	}
	if c.Latency < 0 {
		bad("latency must not be negative")
	}
	if c.PageSize < 0 {
		bad("page_size must not be negative")
	}
	for i, r := range c.Faults {
		if err := r.validate(models); err != nil {
			bad("faults[%d]: %v", i, err)
		}
	}
	return errors.Join(errs...)
}

func (l Limits) validate() error {
	if l.RPM < 0 || l.TPM < 0 || l.RPD < 0 {
		return errors.New("limits must not be negative (0 means no limit)")
	}
	return nil
}

func (t Tier) validate() error {
	switch t {
	case "", Free, Paid:
		return nil
	}
	return fmt.Errorf("unknown tier %q (want %q or %q)", t, Free, Paid)
}

// fileConfig is the JSON form of Config read by ParseConfig.
type fileConfig struct {
	Keys        []Key       `json:"keys"`
	Models      []Model     `json:"models"`
	Projects    []Project   `json:"projects"`
	QuotaFormat QuotaFormat `json:"quota_format"`
	Latency     Duration    `json:"latency"`
	PageSize    int         `json:"page_size"`
	Faults      []FaultRule `json:"faults"`
	Clock       *struct {
		// Start is the time the clock reads when the server starts
		// (RFC 3339); empty: the real time.
		Start string `json:"start"`
		// Frozen stops the clock at Start; only Server.Advance and
		// POST /_fake/clock move it.
		Frozen bool `json:"frozen"`
	} `json:"clock"`
}

// ParseConfig reads the JSON configuration of cmd/fakegemini:
//
//	{
//	  "keys":     [{"key": "k1", "project": "p1", "state": "ok"}],
//	  "models":   [{"name": "gemini-2.5-flash", "rpm": 10, "tpm": 250000, "rpd": 250, "tier": "free"}],
//	  "projects": [{"name": "p1", "tier": "free", "models": {"gemini-2.5-flash": {"rpm": 5, "rpd": 20}}}],
//	  "quota_format": "classic",
//	  "latency": "0s",
//	  "page_size": 50,
//	  "clock": {"start": "2026-03-08T00:00:00-08:00", "frozen": false},
//	  "faults": [{"kind": "overloaded", "count": 2}, {"kind": "capacity", "every": 5, "model": "gemini-2.5-flash"}]
//	}
//
// Field names are those of the JSON tags of Config and its parts; durations
// are Go duration strings ("250ms"). Unknown fields are errors. The clock
// section sets Config.Clock: it reads start plus the real time elapsed since
// ParseConfig (or start, frozen); without it Config.Clock is nil
// (time.Now). The result has been validated.
func ParseConfig(data []byte) (Config, error) {
	var f fileConfig
	d := json.NewDecoder(bytes.NewReader(data))
	d.DisallowUnknownFields()
	if err := d.Decode(&f); err != nil {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	if _, err := d.Token(); err == nil {
		return Config{}, errors.New("config: data after the JSON object")
	}
	c := Config{
		Keys: f.Keys, Models: f.Models, Projects: f.Projects,
		QuotaFormat: f.QuotaFormat, Latency: time.Duration(f.Latency),
		PageSize: f.PageSize, Faults: f.Faults,
	}
	if f.Clock != nil {
		start := time.Now()
		if f.Clock.Start != "" {
			t, err := time.Parse(time.RFC3339Nano, f.Clock.Start)
			if err != nil {
				return Config{}, fmt.Errorf("config: clock.start: %w", err)
			}
			start = t
		}
		if f.Clock.Frozen {
			c.Clock = func() time.Time { return start }
		} else {
			origin := time.Now()
			c.Clock = func() time.Time { return start.Add(time.Since(origin)) }
		}
	}
	if err := c.Validate(); err != nil {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	return c, nil
}

// Duration is a time.Duration that reads and writes JSON as a Go duration
// string ("1.5s"); it also reads a number of seconds.
type Duration time.Duration

// MarshalJSON writes d as a duration string.
func (d Duration) MarshalJSON() ([]byte, error) {
	return json.Marshal(time.Duration(d).String())
}

// UnmarshalJSON reads "1.5s" or 1.5 (seconds).
func (d *Duration) UnmarshalJSON(b []byte) error {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	switch x := v.(type) {
	case string:
		p, err := time.ParseDuration(x)
		if err != nil {
			return err
		}
		*d = Duration(p)
	case float64:
		*d = Duration(x * float64(time.Second))
	default:
		return fmt.Errorf("duration: want a string like \"1.5s\" or a number of seconds, got %s", b)
	}
	return nil
}
