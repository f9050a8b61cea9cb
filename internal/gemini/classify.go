// Package gemini knows the Gemini API's error bodies and what each means for
// a key and its quota bucket.
//
// Classify turns an HTTP status and a decoded error body into a Verdict: one
// of the api.Class* classifications plus the facts keyd acts on (retry
// delay, quota ids, whether a quota is zero, and each violated quota's
// dimension and value). It never panics, whatever the
// body's shape. ErrorBody and the detail types build bodies in Gemini's
// format, for the fake server and for tests.
package gemini

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/keyd/keyd/api"
)

// Verdict is what a Gemini answer means for keyd.
//
// Every string in a Verdict has been through Redact, so a Verdict may be
// logged and shown to users as it is.
type Verdict struct {
	// HTTPStatus is the HTTP status the verdict was made for (0: network error).
	HTTPStatus int
	// Class is one of the api.Class* constants; never empty.
	Class string
	// RetryDelay is RetryInfo.retryDelay when the body has one, else the
	// "Please retry in N.NNNs." of the message; 0 when neither is present.
	// It is never negative. For a per-day quota it is NOT the time to the
	// daily reset.
	RetryDelay time.Duration
	// QuotaIDs holds the quotaId of every QuotaFailure violation, in the
	// body's order, followed by the quota_limit of a legacy (2024) ErrorInfo
	// when the body has one. Nil when there are none.
	QuotaIDs []string
	// ZeroQuota reports that the body lists a quota whose value is 0
	// (quotaValue "0", quota_limit_value "0", or "limit: 0" in the message):
	// the model is not available to the project at its tier. Class is
	// ClassQuotaZero exactly when HTTPStatus is 429, ZeroQuota is true and
	// the message does not say the prepayment credits are depleted.
	ZeroQuota bool
	// Quotas holds every quota violation of the body: each QuotaFailure
	// violation, in the body's order, then the quota of a legacy (2024)
	// ErrorInfo (quota_limit / quota_limit_value). The violations of the
	// newer message lines ("limit: N") are not in it: they do not say
	// which window they count over. Nil when there are none.
	Quotas []Quota
	// Status is the google.rpc status name from the body, e.g.
	// "RESOURCE_EXHAUSTED"; empty when the body has none.
	Status string
	// Reason is the reason of the body's first ErrorInfo detail that has
	// one, e.g. "API_KEY_INVALID" or "CONSUMER_SUSPENDED"; empty if none.
	Reason string
	// Message is the error message (or the trimmed text of a non-JSON body),
	// valid UTF-8, at most MaxMessageBytes long, with anything that looks
	// like an API key replaced (see Redact).
	Message string
}

// Quota is one violated quota of an error body.
type Quota struct {
	// ID is the quotaId (or the legacy quota_limit), e.g.
	// "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"; empty when
	// the violation has none.
	ID string
	// Dimension is what the quota limits, in keys.json's terms: QuotaRPM,
	// QuotaTPM or QuotaRPD; empty for anything else (tokens per day,
	// images, spend) or when its quota id and metric do not say.
	Dimension string
	// Model is the quotaDimensions model, e.g. "gemini-2.5-flash"; empty
	// when the violation names none.
	Model string
	// Value is the quota's limit, the quotaValue, when HasValue.
	Value int64
	// HasValue reports that the violation has a quotaValue that is a whole
	// number from 0 to math.MaxInt64: a decimal string or JSON number such
	// as "250000", 250000, "5.0" or "2.5e5". A missing, empty, negative,
	// fractional, non-decimal ("0x10", "five", "Infinity") or out-of-range
	// value gives HasValue false and Value 0.
	HasValue bool
}

// Dimensions of a Quota, named as the limits of keys.json.
const (
	QuotaRPM = "rpm" // requests per minute
	QuotaTPM = "tpm" // input tokens per minute
	QuotaRPD = "rpd" // requests per day
)

// MaxMessageBytes bounds Verdict.Message. A longer message is cut at a
// character boundary and ends in "…".
const MaxMessageBytes = 300

// maxFieldBytes bounds Status, Reason and each quota id.
const maxFieldBytes = 120

// maxScanBytes bounds how much of a message is searched for quota lines
// and retry delays; Gemini's messages are far shorter.
const maxScanBytes = 64 << 10

// Classify says what an answer from Gemini means for keyd.
//
// status is the HTTP status (0 for a network error, when no answer came).
// body is the decoded JSON error body: either {"error":{...}} or the inner
// {...}. Also accepted: nil; a JSON array whose first object is such a body
// (streamGenerateContent without alt=sse); a string (used as the message,
// or decoded when it holds a JSON object); []byte or json.RawMessage
// (decoded); any other value that encodes to such JSON, e.g. an ErrorBody.
//
// The classification rules, by status:
//   - 0: ClassNetworkError.
//   - 2xx: ClassSuccess.
//   - 402: ClassBilling.
//   - 403: ClassKeyDenied.
//   - 429: ClassBilling when the message mentions prepayment credits; else,
//     over all quota violations (QuotaFailure details, "Quota exceeded for
//     metric: ..., limit: N" message lines, legacy ErrorInfo quota_limit /
//     quota_limit_value and RATE_LIMIT_EXCEEDED), the most severe:
//     ClassQuotaZero for a zero quota, ClassRateDay for a per-day quota,
//     ClassRateMinute for anything else (per-minute requests or input
//     tokens, or a quota whose window is not known); ClassCapacity when the
//     body lists no quota violation at all.
//   - other 4xx: ClassKeyInvalid when an ErrorInfo reason is API_KEY_INVALID
//     or API_KEY_EXPIRED or the message says "API key not valid", "API key
//     not found" or "API key expired"; else ClassClientError (400 bad
//     request, FAILED_PRECONDITION, 404, 499, ...).
//   - 5xx and any other status: ClassServerError.
func Classify(status int, body any) Verdict {
	p := parseBody(body, 0)
	return p.verdict(status)
}

// ClassifyBytes decodes body as JSON and classifies it like Classify. A body
// that is not exactly one JSON value (an HTML page from a proxy, an empty
// body) is taken as the message: Message is its trimmed text, and the rules
// read it as they read a JSON body's message. A leading SSE "data:" prefix
// is ignored.
func ClassifyBytes(status int, body []byte) Verdict {
	trimmed := bytes.TrimSpace(body)
	if rest, ok := bytes.CutPrefix(trimmed, []byte("data:")); ok {
		trimmed = bytes.TrimSpace(rest)
	}
	if v, ok := decodeJSON(trimmed); ok {
		return Classify(status, v)
	}
	p := &parsed{message: string(trimmed)}
	p.readMessage()
	return p.verdict(status)
}

// decodeJSON decodes b as exactly one JSON value, numbers as json.Number.
func decodeJSON(b []byte) (any, bool) {
	if len(b) == 0 {
		return nil, false
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		return nil, false
	}
	if _, err := d.Token(); err == nil {
		return nil, false // trailing data: not one JSON value
	}
	return v, true
}

// Quota windows, in increasing severity.
const (
	kindNone = iota
	kindUnknown
	kindMinute
	kindDay
)

// parsed is what parseBody found in an error body.
type parsed struct {
	message  string
	status   string
	reason   string
	retry    time.Duration
	hasRetry bool
	quotaIDs []string
	quotas   []quota
	// violation is true when the body lists at least one quota violation;
	// worst is the most severe window among them; zero that one is 0.
	violation bool
	worst     int
	zero      bool
}

// quota is a violated quota as read, before sanitizing.
type quota struct {
	id, dim, model string
	value          int64
	hasValue       bool
}

// found reports whether p holds anything read from an error body.
func (p *parsed) found() bool {
	return p.message != "" || p.status != "" || p.reason != "" || p.violation || p.hasRetry
}

func (p *parsed) note(kind int, zero bool) {
	p.violation = true
	p.worst = max(p.worst, kind)
	p.zero = p.zero || zero
}

// maxDepth bounds the unwrapping of nested bodies (arrays, strings holding
// JSON, messages holding a whole error body).
const maxDepth = 4

// parseBody finds the inner error object of body and reads it.
func parseBody(body any, depth int) *parsed {
	p := &parsed{}
	if depth > maxDepth {
		return p
	}
	switch b := body.(type) {
	case nil:
		return p
	case map[string]any:
		if e, ok := b["error"]; ok {
			switch ev := e.(type) {
			case map[string]any:
				return parseInner(ev, depth)
			case nil:
			default:
				return parseBody(ev, depth+1)
			}
		}
		return parseInner(b, depth)
	case []any:
		for _, el := range b {
			if m, ok := el.(map[string]any); ok {
				return parseBody(m, depth+1)
			}
		}
		return p
	case string:
		if t := strings.TrimSpace(b); strings.HasPrefix(t, "{") || strings.HasPrefix(t, "[") {
			if v, ok := decodeJSON([]byte(t)); ok {
				if q := parseBody(v, depth+1); q.found() {
					return q
				}
			}
		}
		p.message = b
		p.readMessage()
		return p
	case []byte:
		return parseBody(string(b), depth+1)
	case json.RawMessage:
		return parseBody(string(b), depth+1)
	case json.Number, float64, bool:
		return p
	default:
		enc, err := json.Marshal(b)
		if err != nil {
			return p
		}
		v, ok := decodeJSON(enc)
		if !ok {
			return p
		}
		return parseBody(v, depth+1)
	}
}

// parseInner reads the inner error object {"code":..,"message":..,...}.
func parseInner(m map[string]any, depth int) *parsed {
	p := &parsed{}
	p.message, _ = m["message"].(string)
	p.status, _ = m["status"].(string)

	// Some clients wrap Gemini's whole body, as a JSON string, in the message
	// of their own error (gemini-cli, continue). Prefer the wrapped body.
	if t := strings.TrimSpace(p.message); depth < maxDepth && strings.HasPrefix(t, "{") && strings.Contains(t, `"error"`) {
		if v, ok := decodeJSON([]byte(t)); ok {
			if q := parseBody(v, depth+1); q.found() {
				return q
			}
		}
	}

	for _, d := range asList(m["details"]) {
		dm, ok := d.(map[string]any)
		if !ok {
			continue
		}
		typ, _ := dm["@type"].(string)
		_, hasViolations := dm["violations"]
		_, hasDelay := dm["retryDelay"]
		_, hasReason := dm["reason"]
		switch {
		case strings.HasSuffix(typ, "google.rpc.QuotaFailure") || typ == "" && hasViolations:
			p.readQuotaFailure(dm)
		case strings.HasSuffix(typ, "google.rpc.RetryInfo") || typ == "" && hasDelay:
			if d, ok := parseProtoDuration(dm["retryDelay"]); ok && !p.hasRetry {
				p.retry, p.hasRetry = d, true
			}
		case strings.HasSuffix(typ, "google.rpc.ErrorInfo") || typ == "" && hasReason:
			p.readErrorInfo(dm)
		}
	}
	p.readMessage()
	return p
}

func (p *parsed) readQuotaFailure(d map[string]any) {
	for _, v := range asList(d["violations"]) {
		vm, ok := v.(map[string]any)
		if !ok {
			continue
		}
		id := scalar(vm["quotaId"])
		if id != "" {
			p.quotaIDs = append(p.quotaIDs, id)
		}
		metric := scalar(vm["quotaMetric"])
		kind := windowOf(id, metric, scalar(vm["description"]), scalar(vm["subject"]))
		p.note(kind, isZero(vm["quotaValue"]))
		dims, _ := vm["quotaDimensions"].(map[string]any)
		value, hasValue := quotaValue(vm["quotaValue"])
		p.quotas = append(p.quotas, quota{id: id, dim: dimensionOf(id, metric), model: scalar(dims["model"]),
			value: value, hasValue: hasValue})
	}
}

// readErrorInfo reads an ErrorInfo detail: its reason, and the quota of the
// legacy (2024) 429 shape, metadata quota_limit / quota_limit_value.
func (p *parsed) readErrorInfo(d map[string]any) {
	reason := scalar(d["reason"])
	if p.reason == "" {
		p.reason = reason
	}
	md, _ := d["metadata"].(map[string]any)
	limit := scalar(md["quota_limit"])
	value, hasValue := md["quota_limit_value"]
	if limit == "" && !hasValue && reason != "RATE_LIMIT_EXCEEDED" {
		return
	}
	if limit != "" && !slices.Contains(p.quotaIDs, limit) {
		p.quotaIDs = append(p.quotaIDs, limit)
	}
	metric := scalar(md["quota_metric"])
	kind := windowOf(limit, metric)
	dim := dimensionOf(limit, metric)
	if kind == kindUnknown {
		// The legacy message names the window: "... requests per minute".
		kind = windowOf(p.message)
		dim = dimensionOf(limit, metric, p.message)
	}
	p.note(kind, hasValue && isZero(value))
	if limit != "" || hasValue {
		v, ok := quotaValue(value)
		p.quotas = append(p.quotas, quota{id: limit, dim: dim, value: v, hasValue: ok})
	}
}

// quotaLine matches the newer (late 2025) message format's lines
// "* Quota exceeded for metric: M, limit: N, model: X" and the legacy
// "Quota exceeded for quota metric '...' and limit '...' of service ...".
var quotaLine = regexp.MustCompile(`(?i)quota exceeded for [^\n]*`)

// retryIn matches "Please retry in 38.863719904s." in a message.
var retryIn = regexp.MustCompile(`(?i)retry in\s*([0-9]{1,12}(?:\.[0-9]{0,12})?)\s*(ms|s|m|h)\b`)

// readMessage reads the quota lines and retry delay written in the message.
// Only the first maxScanBytes of the message are read.
func (p *parsed) readMessage() {
	msg := p.message
	if len(msg) > maxScanBytes {
		msg = msg[:maxScanBytes]
	}
	for _, line := range quotaLine.FindAllString(msg, 64) {
		p.note(windowOf(line), hasZeroLimit(line))
	}
	if hasZeroLimit(msg) {
		p.zero = true
	}
	if !p.hasRetry {
		if m := retryIn.FindStringSubmatch(msg); m != nil {
			if d, err := time.ParseDuration(m[1] + strings.ToLower(m[2])); err == nil && d >= 0 {
				p.retry, p.hasRetry = d, true
			}
		}
	}
}

// windowOf says which window the quota named by texts (quota ids, metric
// names, descriptions) counts over.
func windowOf(texts ...string) int {
	s := strings.ToLower(strings.Join(texts, " "))
	switch {
	case strings.Contains(s, "perday"), strings.Contains(s, "per day"),
		strings.Contains(s, "per_day"), strings.Contains(s, "daily"):
		return kindDay
	case strings.Contains(s, "perminute"), strings.Contains(s, "per minute"),
		strings.Contains(s, "per_minute"):
		return kindMinute
	}
	return kindUnknown
}

// dimensionOf says which limit of keys.json the quota named by texts
// (quota id, metric name) is: requests per minute or per day, or input
// tokens per minute; "" for anything else or when the texts do not say.
func dimensionOf(texts ...string) string {
	s := strings.ToLower(strings.Join(texts, " "))
	if len(s) > maxScanBytes {
		s = s[:maxScanBytes]
	}
	win := windowOf(s)
	switch {
	case strings.Contains(s, "token"):
		// keys.json's tpm counts input tokens; a token quota that does
		// not say it counts input tokens is not it.
		if win == kindMinute && strings.Contains(s, "input") {
			return QuotaTPM
		}
	case strings.Contains(s, "request"):
		switch win {
		case kindMinute:
			return QuotaRPM
		case kindDay:
			return QuotaRPD
		}
	}
	return ""
}

// decimal matches a non-negative decimal number: digits, an optional
// fraction and an optional exponent.
var decimal = regexp.MustCompile(`^[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?$`)

// quotaValue reads a quotaValue (a decimal string, as proto3 JSON writes
// an int64, or a JSON number) as a whole number from 0 to math.MaxInt64.
func quotaValue(v any) (int64, bool) {
	s := strings.TrimSpace(scalar(v))
	if len(s) > 64 || !decimal.MatchString(s) {
		return 0, false
	}
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		return n, true
	}
	f, err := strconv.ParseFloat(s, 64)
	// 2^63 is the first float64 above math.MaxInt64.
	if err != nil || f != math.Trunc(f) || f >= 1<<63 {
		return 0, false
	}
	return int64(f), true
}

// hasZeroLimit reports whether s says "limit: N" with N equal to 0.
func hasZeroLimit(s string) bool {
	lower := strings.ToLower(s)
	for {
		i := strings.Index(lower, "limit:")
		if i < 0 {
			return false
		}
		lower = lower[i+len("limit:"):]
		rest := strings.TrimLeft(lower, " \t")
		n := 0
		for n < len(rest) && n < 32 && (rest[n] >= '0' && rest[n] <= '9' || rest[n] == '.') {
			n++
		}
		if n > 0 {
			num := strings.TrimSuffix(rest[:n], ".") // "limit: 0." ends a sentence
			if f, err := strconv.ParseFloat(num, 64); err == nil && f == 0 {
				return true
			}
		}
	}
}

// parseProtoDuration reads a google.protobuf.Duration: the JSON string form
// "26s" / "38.863719904s" (a bare number means seconds), or the object form
// {"seconds":26,"nanos":0}. It refuses negative and overflowing values.
func parseProtoDuration(v any) (time.Duration, bool) {
	switch d := v.(type) {
	case string:
		s := strings.TrimSpace(d)
		if s == "" {
			return 0, false
		}
		if c := s[len(s)-1]; c >= '0' && c <= '9' || c == '.' {
			s += "s"
		}
		dur, err := time.ParseDuration(s)
		if err != nil || dur < 0 {
			return 0, false
		}
		return dur, true
	case map[string]any:
		sec, ok1 := number(d["seconds"])
		nanos, ok2 := number(d["nanos"])
		if !ok1 && !ok2 {
			return 0, false
		}
		total := sec*1e9 + nanos
		if math.IsNaN(total) || total < 0 || total >= math.MaxInt64 {
			return 0, false
		}
		return time.Duration(total), true
	default:
		if f, ok := number(v); ok {
			return parseProtoDuration(strconv.FormatFloat(f, 'f', -1, 64))
		}
	}
	return 0, false
}

// verdict applies the classification rules (see Classify).
func (p *parsed) verdict(status int) Verdict {
	v := Verdict{
		HTTPStatus: status,
		Status:     sanitize(p.status, maxFieldBytes),
		Reason:     sanitize(p.reason, maxFieldBytes),
		Message:    sanitize(strings.TrimSpace(p.message), MaxMessageBytes),
		ZeroQuota:  p.zero,
	}
	if p.hasRetry && p.retry > 0 {
		v.RetryDelay = p.retry
	}
	for _, id := range p.quotaIDs {
		v.QuotaIDs = append(v.QuotaIDs, sanitize(id, maxFieldBytes))
	}
	for _, q := range p.quotas {
		v.Quotas = append(v.Quotas, Quota{ID: sanitize(q.id, maxFieldBytes), Dimension: q.dim,
			Model: sanitize(q.model, maxFieldBytes), Value: q.value, HasValue: q.hasValue})
	}
	lowerMsg := p.message
	if len(lowerMsg) > maxScanBytes {
		lowerMsg = lowerMsg[:maxScanBytes]
	}
	lowerMsg = strings.ToLower(lowerMsg)
	switch {
	case status == 0:
		v.Class = api.ClassNetworkError
	case status >= 200 && status < 300:
		v.Class = api.ClassSuccess
	case status == http.StatusTooManyRequests:
		switch {
		case strings.Contains(lowerMsg, "prepayment credits"):
			v.Class = api.ClassBilling
		case p.zero:
			v.Class = api.ClassQuotaZero
		case !p.violation:
			v.Class = api.ClassCapacity
		case p.worst == kindDay:
			v.Class = api.ClassRateDay
		default:
			v.Class = api.ClassRateMinute
		}
	case status == http.StatusPaymentRequired:
		v.Class = api.ClassBilling
	case status == http.StatusForbidden:
		v.Class = api.ClassKeyDenied
	case status >= 400 && status < 500:
		if keyInvalid(p.reason, lowerMsg) {
			v.Class = api.ClassKeyInvalid
		} else {
			v.Class = api.ClassClientError
		}
	default:
		v.Class = api.ClassServerError
	}
	return v
}

func keyInvalid(reason, lowerMsg string) bool {
	switch reason {
	case "API_KEY_INVALID", "API_KEY_EXPIRED":
		return true
	}
	return strings.Contains(lowerMsg, "api key not valid") ||
		strings.Contains(lowerMsg, "api key not found") ||
		strings.Contains(lowerMsg, "api key expired")
}

// Summary is a one-line, lower-case reason for logs and status, e.g.
// "429 per-day quota GenerateRequestsPerDayPerProjectPerModel-FreeTier" or
// "400 API_KEY_INVALID: API key not valid. Please pass a valid API key.".
// Identifiers and Gemini's message keep their case; line breaks and other
// control characters become single spaces. Like every Verdict field it
// uses, it holds no API key.
func (v Verdict) Summary() string {
	return oneLine(v.summary())
}

func (v Verdict) summary() string {
	msg := v.Message
	withMsg := func(head string) string {
		if msg == "" {
			return head
		}
		return head + ": " + msg
	}
	retry := ""
	if v.RetryDelay > 0 {
		retry = "; retry in " + v.RetryDelay.String()
	}
	code := strconv.Itoa(v.HTTPStatus)
	switch v.Class {
	case api.ClassSuccess:
		return code + " ok"
	case api.ClassNetworkError:
		return withMsg("network error")
	case api.ClassUnused:
		return "unused"
	case api.ClassQuotaZero:
		return strings.TrimSpace(code+" zero quota "+v.ids(kindNone)) + ": not available to this project"
	case api.ClassRateDay:
		return strings.TrimSpace(code + " per-day quota " + v.ids(kindDay))
	case api.ClassRateMinute:
		return strings.TrimSpace(code+" per-minute quota "+v.ids(kindMinute)) + retry
	case api.ClassCapacity:
		return withMsg(code+" capacity") + retry
	case api.ClassBilling:
		return withMsg(code + " billing")
	}
	label := v.Reason
	if label == "" {
		label = v.Status
	}
	if label == "" {
		label = strings.ToLower(http.StatusText(v.HTTPStatus))
	}
	if label == "" {
		label = "error"
	}
	return withMsg(code + " " + label)
}

// oneLine turns every run of white space and control characters in s into
// one space, and trims s.
func oneLine(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || r >= 0x80 && r < 0xa0 {
			return ' '
		}
		return r
	}, s)
	return strings.Join(strings.Fields(s), " ")
}

// ids lists the verdict's quota ids of the given window (all of them when
// none matches, or for kindNone), at most 4, comma-separated.
func (v Verdict) ids(kind int) string {
	var sel []string
	if kind != kindNone {
		for _, id := range v.QuotaIDs {
			if windowOf(id) == kind {
				sel = append(sel, id)
			}
		}
	}
	if len(sel) == 0 {
		sel = v.QuotaIDs
	}
	const most = 4
	if len(sel) > most {
		return strings.Join(sel[:most], ", ") + fmt.Sprintf(" and %d more", len(sel)-most)
	}
	return strings.Join(sel, ", ")
}

// asList returns v as a list: v itself, a one-element list for a lone
// object, nil otherwise.
func asList(v any) []any {
	switch l := v.(type) {
	case []any:
		return l
	case map[string]any:
		return []any{l}
	}
	return nil
}

// scalar returns a string or number value as a string, "" otherwise.
func scalar(v any) string {
	switch s := v.(type) {
	case string:
		return s
	case json.Number:
		return s.String()
	case float64:
		return strconv.FormatFloat(s, 'f', -1, 64)
	case int:
		return strconv.Itoa(s)
	case int64:
		return strconv.FormatInt(s, 10)
	}
	return ""
}

// number returns a number, or a string holding one, as a float64.
func number(v any) (float64, bool) {
	s := strings.TrimSpace(scalar(v))
	if s == "" {
		return 0, false
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
		return 0, false
	}
	return f, true
}

// isZero reports whether a quota value ("0", 0, "0.0") is zero.
func isZero(v any) bool {
	f, ok := number(v)
	return ok && f == 0
}
