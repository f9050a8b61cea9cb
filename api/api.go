// Package api holds the wire types of keyd's socket API (HTTP/1.1 + JSON on
// a Unix socket), shared by the daemon, keyctl and the public client.
//
// Every route is versioned under /v1/. Types here carry no behaviour beyond
// JSON encoding; docs/api.md describes each route with curl examples.
package api

import (
	"fmt"
	"time"
)

// Routes, sorted. The daemon's route table is tested to match this list.
const (
	// RouteMetrics serves Prometheus text metrics (GET); not versioned,
	// where Prometheus looks by default. No secret appears in it.
	RouteMetrics = "/metrics"
	RouteHealth  = "/v1/health"
	RouteKeys    = "/v1/keys/"   // + {key_id}/disable|enable|reset
	RouteLeases  = "/v1/leases"  // POST: take a lease
	RouteLeaseID = "/v1/leases/" // + {lease_id}/report
	RouteReload  = "/v1/reload"
	RouteStatus  = "/v1/status"
	RouteUsage   = "/v1/usage"
)

// LeaseRequest is the body of POST /v1/leases.
type LeaseRequest struct {
	// Model is the Gemini model the caller will call, e.g. "gemini-2.5-flash".
	Model string `json:"model"`
	// Tokens is the caller's estimate of the request's input tokens. Zero
	// means the config's default_tokens.
	Tokens int64 `json:"tokens,omitempty"`
	// WorkloadType, when set, restricts the choice to keys of that workload_type.
	WorkloadType string `json:"workload_type,omitempty"`
	// WaitMS is how long the caller is willing to wait for capacity, in
	// milliseconds, at most MaxWait. Zero means answer at once.
	WaitMS int64 `json:"wait_ms,omitempty"`
	// Client names the caller in logs and usage; free text.
	Client string `json:"client,omitempty"`
}

// MaxWait bounds LeaseRequest.WaitMS.
const MaxWait = 10 * time.Minute

// Lease is a grant: the caller may send one request with Secret to Model
// before ExpiresAt, and should report its outcome.
type Lease struct {
	LeaseID   string    `json:"lease_id"`
	KeyID     string    `json:"key_id"`
	Project   string    `json:"project"`
	Model     string    `json:"model"`
	Secret    string    `json:"secret"`
	Tokens    int64     `json:"tokens"`
	ExpiresAt time.Time `json:"expires_at"`
}

// Usage is the token usage a Gemini response reported (usageMetadata).
type Usage struct {
	PromptTokens int64 `json:"prompt_tokens"`
	OutputTokens int64 `json:"output_tokens,omitempty"`
	TotalTokens  int64 `json:"total_tokens,omitempty"`
}

// OutcomeUnused is ReportRequest.Outcome for a lease whose call was never sent.
const OutcomeUnused = "unused"

// ReportRequest is the body of POST /v1/leases/{id}/report.
//
// Either Outcome is "unused", or Status holds the HTTP status Gemini
// answered (0 for a network error), with Error holding the raw Gemini error
// body (parsed JSON) on failure and Usage the response's usage on success.
type ReportRequest struct {
	Outcome string `json:"outcome,omitempty"`
	Status  int    `json:"status"`
	Error   any    `json:"error,omitempty"`
	Usage   *Usage `json:"usage,omitempty"`
}

// Classifications of a report, as returned in ReportResponse.Classification.
const (
	ClassSuccess      = "success"       // 2xx; TPM reconciled
	ClassUnused       = "unused"        // never sent; reservation refunded
	ClassRateMinute   = "rate_minute"   // 429 per-minute quota: bucket cooling
	ClassRateDay      = "rate_day"      // 429 per-day quota: bucket exhausted until the day resets
	ClassQuotaZero    = "quota_zero"    // 429 with quotaValue 0: bucket disabled
	ClassCapacity     = "capacity"      // 429 without details: short backoff
	ClassBilling      = "billing"       // 429 prepayment credits depleted: project disabled
	ClassKeyInvalid   = "key_invalid"   // 400 API_KEY_INVALID: key disabled
	ClassKeyDenied    = "key_denied"    // 403 PERMISSION_DENIED: key disabled
	ClassClientError  = "client_error"  // other 4xx: the request's fault; no penalty
	ClassServerError  = "server_error"  // 5xx: no penalty, counted
	ClassNetworkError = "network_error" // status 0: no penalty, counted
)

// ReportResponse is the answer to a report: what keyd concluded and did.
type ReportResponse struct {
	LeaseID        string `json:"lease_id"`
	KeyID          string `json:"key_id"`
	Classification string `json:"classification"`
	// Action says in words what keyd did, e.g. "bucket p1/gemini-2.5-flash cooling for 1m0s".
	Action string `json:"action,omitempty"`
	// Duplicate is true when this lease had already been reported; the
	// earlier classification stands and nothing was applied twice.
	Duplicate bool `json:"duplicate,omitempty"`
}

// Key states, as in KeyStatus.State.
const (
	StateReady     = "ready"
	StateCooling   = "cooling"
	StateExhausted = "exhausted"
	StateDisabled  = "disabled"
	StateNoSecret  = "no_secret"
)

// Status is the body of GET /v1/status. It never holds a secret.
type Status struct {
	Version string        `json:"version"`
	UptimeS int64         `json:"uptime_s"`
	Config  ConfigStatus  `json:"config"`
	Keys    []KeyStatus   `json:"keys"`
	Buckets []BucketState `json:"buckets"`
	// Waiting lists, by model, the lease requests waiting for capacity
	// (wait_ms), when any are; absent when none.
	Waiting []ModelWaiting `json:"waiting,omitempty"`
}

// ModelWaiting is the queue of lease requests waiting for one model.
type ModelWaiting struct {
	Model    string `json:"model"`
	Requests int    `json:"requests"`
	// OldestMS is how long the first request in line has waited.
	OldestMS int64 `json:"oldest_ms"`
}

// ConfigStatus describes the configuration in effect.
type ConfigStatus struct {
	Path     string    `json:"path"`
	LoadedAt time.Time `json:"loaded_at"`
	// LastError is the error of the last failed load or reload, empty once
	// a later load succeeded.
	LastError string   `json:"last_error,omitempty"`
	Warnings  []string `json:"warnings"`
}

// KeyStatus is one configured key.
type KeyStatus struct {
	KeyID        string     `json:"key_id"`
	Project      string     `json:"project"`
	Models       []string   `json:"models"`
	Priority     int        `json:"priority"`
	WorkloadType string     `json:"workload_type,omitempty"`
	State        string     `json:"state"`
	Reason       string     `json:"reason,omitempty"`
	Until        *time.Time `json:"until,omitempty"`
	// SecretHint is "…" followed by at most the last 4 characters of the
	// secret, or empty when the key has none.
	SecretHint string `json:"secret_hint,omitempty"`
	InFlight   int    `json:"in_flight"`
}

// Counter is a usage figure against its limit. Limit 0 means unlimited.
type Counter struct {
	Used  int64 `json:"used"`
	Limit int64 `json:"limit"`
}

// BucketState is one (project, model) quota bucket.
type BucketState struct {
	Project string     `json:"project"`
	Model   string     `json:"model"`
	State   string     `json:"state"`
	Reason  string     `json:"reason,omitempty"`
	Until   *time.Time `json:"until,omitempty"`
	// RPM, TPM and RPD count against the limits the bucket enforces:
	// keys.json's, or a lower one Gemini reported (see Warnings).
	RPM      Counter `json:"rpm"`
	TPM      Counter `json:"tpm"`
	RPD      Counter `json:"rpd"`
	InFlight int     `json:"in_flight"`
	// Warnings say what is wrong with the bucket's configuration and the
	// fix: one per limit that a 429 from Gemini reported lower than
	// keys.json's, naming the lowest quota when several did, which the
	// bucket enforces until a reload changes that limit or an admin
	// resets one of its keys. Absent when there are none.
	Warnings []string `json:"warnings,omitempty"`
}

// ReloadResponse is the answer to POST /v1/reload.
type ReloadResponse struct {
	Path     string   `json:"path"`
	Changed  bool     `json:"changed"`
	Keys     int      `json:"keys"`
	Warnings []string `json:"warnings"`
}

// KeyActionResponse is the answer to POST /v1/keys/{key_id}/{action}.
type KeyActionResponse struct {
	KeyID string `json:"key_id"`
	State string `json:"state"`
}

// Health is the body of GET /v1/health.
type Health struct {
	OK        bool   `json:"ok"`
	Version   string `json:"version"`
	KeysReady int    `json:"keys_ready"`
	KeysTotal int    `json:"keys_total"`
}

// UsageRow is one hour of one bucket's history, from GET /v1/usage.
type UsageRow struct {
	Hour         time.Time `json:"hour"`
	Project      string    `json:"project"`
	Model        string    `json:"model"`
	KeyID        string    `json:"key_id,omitempty"`
	Requests     int64     `json:"requests"`
	PromptTokens int64     `json:"prompt_tokens"`
	OutputTokens int64     `json:"output_tokens"`
	RateMinute   int64     `json:"rate_minute_429s"`
	RateDay      int64     `json:"rate_day_429s"`
	Other429     int64     `json:"other_429s"`
	Errors       int64     `json:"errors"`
	Unused       int64     `json:"unused"`
}

// UsageResponse is the body of GET /v1/usage?since=RFC3339&key=K.
type UsageResponse struct {
	Rows []UsageRow `json:"rows"`
}

// Error codes, stable for scripts.
const (
	CodeBadRequest       = "bad_request"
	CodeForbidden        = "forbidden"
	CodeInternal         = "internal"
	CodeMethodNotAllowed = "method_not_allowed"
	CodeNoCapacity       = "no_capacity"
	CodeNoKeys           = "no_keys"
	CodeNotFound         = "not_found"
	CodeReloadFailed     = "reload_failed"
	CodeShuttingDown     = "shutting_down"
	CodeTokensExceedTPM  = "tokens_exceed_tpm"
	CodeTooLarge         = "too_large"
	CodeUnknownModel     = "unknown_model"
)

// ErrorBody is the JSON body of every non-2xx answer:
// {"error":{"code":"...","message":"..."}}.
type ErrorBody struct {
	Error *Error `json:"error"`
}

// Error is keyd's one API error type: a stable machine-readable Code, a
// human Message, and for no_capacity the time after which a retry can
// succeed (absent when nothing ever will without a change).
type Error struct {
	// HTTPStatus is the status the error travelled with; not in the JSON body.
	HTTPStatus   int    `json:"-"`
	Code         string `json:"code"`
	Message      string `json:"message"`
	RetryAfterMS *int64 `json:"retry_after_ms,omitempty"`
}

func (e *Error) Error() string { return e.Message }

// RetryAfter returns the retry delay and whether there is one.
func (e *Error) RetryAfter() (time.Duration, bool) {
	if e == nil || e.RetryAfterMS == nil {
		return 0, false
	}
	return time.Duration(*e.RetryAfterMS) * time.Millisecond, true
}

// Errorf builds an *Error.
func Errorf(status int, code, format string, args ...any) *Error {
	return &Error{HTTPStatus: status, Code: code, Message: fmt.Sprintf(format, args...)}
}
