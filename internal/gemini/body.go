package gemini

import (
	"encoding/json"
	"strconv"
	"strings"
	"time"
)

// The @type URLs of the google.rpc error details Gemini sends.
const (
	TypeQuotaFailure     = "type.googleapis.com/google.rpc.QuotaFailure"
	TypeRetryInfo        = "type.googleapis.com/google.rpc.RetryInfo"
	TypeErrorInfo        = "type.googleapis.com/google.rpc.ErrorInfo"
	TypeHelp             = "type.googleapis.com/google.rpc.Help"
	TypeLocalizedMessage = "type.googleapis.com/google.rpc.LocalizedMessage"
)

// ErrorBody is Gemini's error body, {"error":{...}}. Encoded, it has the
// shape of the bodies in Gemini's documentation; decoded, each detail is a
// map[string]any.
type ErrorBody struct {
	Error ErrorDetail `json:"error"`
}

// ErrorDetail is the inner object of an ErrorBody.
type ErrorDetail struct {
	// Code is the HTTP status, e.g. 429.
	Code int `json:"code"`
	// Message is the human message.
	Message string `json:"message"`
	// Status is the google.rpc.Code name, e.g. "RESOURCE_EXHAUSTED".
	Status string `json:"status"`
	// Details holds the google.rpc details: QuotaFailure, RetryInfo,
	// ErrorInfo, Help, LocalizedMessage (each encodes its own "@type"), or
	// any other JSON-encodable value. Omitted when empty.
	Details []any `json:"details,omitempty"`
}

// QuotaFailure is the google.rpc.QuotaFailure detail of a 429.
type QuotaFailure struct {
	Violations []QuotaViolation `json:"violations"`
}

// QuotaViolation is one exceeded quota. Empty fields are omitted.
type QuotaViolation struct {
	// QuotaMetric, e.g. "generativelanguage.googleapis.com/generate_content_free_tier_requests".
	QuotaMetric string `json:"quotaMetric,omitempty"`
	// QuotaID, e.g. "GenerateRequestsPerDayPerProjectPerModel-FreeTier".
	QuotaID string `json:"quotaId,omitempty"`
	// QuotaDimensions, e.g. {"location":"global","model":"gemini-2.5-flash"}.
	QuotaDimensions map[string]string `json:"quotaDimensions,omitempty"`
	// QuotaValue is the limit as a decimal string, e.g. "250"; "0" means
	// the model is not available to the project's tier.
	QuotaValue string `json:"quotaValue,omitempty"`
}

// RetryInfo is the google.rpc.RetryInfo detail; RetryDelay is a protobuf
// Duration string such as "26s" (see FormatDuration).
type RetryInfo struct {
	RetryDelay string `json:"retryDelay"`
}

// ErrorInfo is the google.rpc.ErrorInfo detail, e.g. reason
// "API_KEY_INVALID", domain "googleapis.com".
type ErrorInfo struct {
	Reason   string            `json:"reason"`
	Domain   string            `json:"domain"`
	Metadata map[string]string `json:"metadata,omitempty"`
}

// Help is the google.rpc.Help detail.
type Help struct {
	Links []HelpLink `json:"links"`
}

// HelpLink is one link of a Help detail.
type HelpLink struct {
	Description string `json:"description"`
	URL         string `json:"url"`
}

// LocalizedMessage is the google.rpc.LocalizedMessage detail.
type LocalizedMessage struct {
	Locale  string `json:"locale"`
	Message string `json:"message"`
}

// The detail types encode with their "@type" first. Each MarshalJSON
// embeds the value under a local type without methods, so that its fields
// are inlined and MarshalJSON is not called again.

// MarshalJSON encodes q with "@type" TypeQuotaFailure.
func (q QuotaFailure) MarshalJSON() ([]byte, error) {
	type plain QuotaFailure
	return json.Marshal(struct {
		Type string `json:"@type"`
		plain
	}{TypeQuotaFailure, plain(q)})
}

// MarshalJSON encodes r with "@type" TypeRetryInfo.
func (r RetryInfo) MarshalJSON() ([]byte, error) {
	type plain RetryInfo
	return json.Marshal(struct {
		Type string `json:"@type"`
		plain
	}{TypeRetryInfo, plain(r)})
}

// MarshalJSON encodes e with "@type" TypeErrorInfo.
func (e ErrorInfo) MarshalJSON() ([]byte, error) {
	type plain ErrorInfo
	return json.Marshal(struct {
		Type string `json:"@type"`
		plain
	}{TypeErrorInfo, plain(e)})
}

// MarshalJSON encodes h with "@type" TypeHelp.
func (h Help) MarshalJSON() ([]byte, error) {
	type plain Help
	return json.Marshal(struct {
		Type string `json:"@type"`
		plain
	}{TypeHelp, plain(h)})
}

// MarshalJSON encodes l with "@type" TypeLocalizedMessage.
func (l LocalizedMessage) MarshalJSON() ([]byte, error) {
	type plain LocalizedMessage
	return json.Marshal(struct {
		Type string `json:"@type"`
		plain
	}{TypeLocalizedMessage, plain(l)})
}

// FormatDuration formats d as a protobuf Duration in JSON, the form of
// RetryInfo.retryDelay: seconds with up to 9 fractional digits and no
// trailing zeros, then "s", e.g. "26s", "38.863719904s", "0.5s". A negative
// d gives "0s".
func FormatDuration(d time.Duration) string {
	if d <= 0 {
		return "0s"
	}
	sec := int64(d / time.Second)
	ns := int64(d % time.Second)
	s := strconv.FormatInt(sec, 10)
	if ns != 0 {
		frac := strings.TrimRight(strconv.FormatInt(ns+1e9, 10)[1:], "0")
		s += "." + frac
	}
	return s + "s"
}
