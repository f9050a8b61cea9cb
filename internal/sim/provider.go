package sim

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/keyd/keyd/internal/fakegemini"
	"github.com/keyd/keyd/internal/gemini"
)

// Window is the provider's RPM and TPM window: a request admitted at t
// counts in every window (u-60s, u] with t in it.
const Window = 60 * time.Second

// Limits are the quotas of one (project, model) bucket at the provider.
// RPD 0 means no daily limit.
type Limits struct {
	RPM, TPM, RPD int64
}

// Response is the provider's answer to one call.
type Response struct {
	// Status is the HTTP status: 200, 429 (a limit), or 400 (invalid key).
	Status int
	// Kinds lists the limits a 429 named, in the body's order (day,
	// minute requests, input tokens).
	Kinds []fakegemini.QuotaKind
	// RetryInfo is the RetryInfo.retryDelay of a 429 (whole seconds, as
	// the real API sends; for a per-day limit 20-60 s, not the time to
	// the reset).
	RetryInfo time.Duration
	// Body is the error body of a non-2xx answer, the real literal shape.
	Body *gemini.ErrorBody
}

// BodyJSON is the error body as the client received it on the wire.
func (r *Response) BodyJSON() json.RawMessage {
	if r.Body == nil {
		return nil
	}
	b, err := json.Marshal(r.Body)
	if err != nil {
		panic(err) // the body types always encode
	}
	return b
}

// Admission is one request the provider admitted (counted against its
// bucket).
type Admission struct {
	At      time.Time
	Project string
	Tokens  int64
}

// provKey is a key as the provider knows it.
type provKey struct {
	project   string
	invalidAt time.Time // zero: valid for ever
}

// provBucket is the state of one (project, model) at the provider.
type provBucket struct {
	limits Limits
	window []Admission // admitted in the last Window, by time
	tokens int64       // sum of window's Tokens
	day    string      // Pacific day of dayCnt
	dayCnt int64
}

// Provider is the simulated Gemini API, following the limits model of
// internal/fakegemini (see its package doc) without HTTP: per (project,
// model), at most RPM requests and TPM input tokens in any sliding 60 s
// window and RPD requests per America/Los_Angeles calendar day. A refused
// request gets the real 429 RESOURCE_EXHAUSTED body (classic format,
// QuotaFailure + Help + RetryInfo) and counts against nothing; an invalid
// key gets the real 400 API_KEY_INVALID body. TestProviderMatchesFakegemini
// replays traces through both and requires the same answers and bodies.
//
// A Provider is not safe for concurrent use.
type Provider struct {
	model   string
	tier    fakegemini.Tier
	keys    map[string]provKey
	buckets map[string]*provBucket // by project
	// Admitted is every admitted request, in admission order.
	Admitted []Admission
}

// NewProvider returns a provider serving model with the given per-project
// limits and keys (key ID → project). Every bucket starts empty.
func NewProvider(model string, tier fakegemini.Tier, limits map[string]Limits, keys map[string]string) *Provider {
	p := &Provider{model: model, tier: tier, keys: map[string]provKey{}, buckets: map[string]*provBucket{}}
	for proj, l := range limits {
		p.buckets[proj] = &provBucket{limits: l}
	}
	for k, proj := range keys {
		p.keys[k] = provKey{project: proj}
	}
	return p
}

// Invalidate makes key answer 400 API_KEY_INVALID from at on (it was
// deleted or rotated in the console).
func (p *Provider) Invalidate(key string, at time.Time) {
	k := p.keys[key]
	k.invalidAt = at
	p.keys[key] = k
}

// Call answers a generateContent of tokens input tokens sent with key at now.
func (p *Provider) Call(now time.Time, key string, tokens int64) Response {
	k, ok := p.keys[key]
	if !ok || (!k.invalidAt.IsZero() && !now.Before(k.invalidAt)) {
		return Response{Status: 400, Body: keyInvalidBody}
	}
	b := p.buckets[k.project]
	cut := 0
	for cut < len(b.window) && !b.window[cut].At.After(now.Add(-Window)) {
		b.tokens -= b.window[cut].Tokens
		cut++
	}
	if cut > 0 {
		clear(b.window[:cut])
		b.window = b.window[cut:]
	}
	if day := fakegemini.Day(now); day != b.day {
		b.day, b.dayCnt = day, 0
	}
	l := b.limits
	var kinds []fakegemini.QuotaKind
	var retry time.Duration
	if l.RPD > 0 && b.dayCnt+1 > l.RPD {
		kinds = append(kinds, fakegemini.QuotaRPD)
		retry = max(retry, dayRetry(now))
	}
	if n := int64(len(b.window)); l.RPM > 0 && n+1 > l.RPM {
		kinds = append(kinds, fakegemini.QuotaRPM)
		retry = max(retry, b.window[n-l.RPM].At.Add(Window).Sub(now))
	}
	if l.TPM > 0 && b.tokens+tokens > l.TPM {
		kinds = append(kinds, fakegemini.QuotaTPM)
		d := Window // a prompt larger than TPM never fits
		if tokens <= l.TPM {
			sum := b.tokens
			for _, e := range b.window {
				sum -= e.Tokens
				if sum+tokens <= l.TPM {
					d = e.At.Add(Window).Sub(now)
					break
				}
			}
		}
		retry = max(retry, d)
	}
	if len(kinds) > 0 {
		return Response{Status: 429, Kinds: kinds, RetryInfo: retry.Truncate(time.Second),
			Body: quotaBody(p.model, p.tier, b.limits, kinds, retry)}
	}
	a := Admission{At: now, Project: k.project, Tokens: tokens}
	b.window = append(b.window, a)
	b.tokens += tokens
	b.dayCnt++
	p.Admitted = append(p.Admitted, a)
	return Response{Status: 200}
}

// dayRetry is fakegemini's RetryInfo of a per-day quota: 20 s plus the
// seconds since the Pacific midnight modulo 40 s.
func dayRetry(now time.Time) time.Duration {
	l := now.In(fakegemini.Pacific)
	start := time.Date(l.Year(), l.Month(), l.Day(), 0, 0, 0, 0, fakegemini.Pacific)
	return 20*time.Second + now.Sub(start)%(40*time.Second)
}

// keyInvalidBody is the real 400 of an invalid key.
var keyInvalidBody = &gemini.ErrorBody{Error: gemini.ErrorDetail{
	Code: 400, Status: "INVALID_ARGUMENT", Message: "API key not valid. Please pass a valid API key.",
	Details: []any{
		gemini.ErrorInfo{Reason: "API_KEY_INVALID", Domain: "googleapis.com",
			Metadata: map[string]string{"service": "generativelanguage.googleapis.com"}},
		gemini.LocalizedMessage{Locale: "en-US", Message: "API key not valid. Please pass a valid API key."},
	},
}}

const rateLimitURL = "https://ai.google.dev/gemini-api/docs/rate-limits"

// quotaBody is the classic (mid-2025) 429 of exceeded limits, as
// fakegemini sends it: one violation per exceeded limit, a Help link and a
// RetryInfo in whole seconds.
func quotaBody(model string, tier fakegemini.Tier, l Limits, kinds []fakegemini.QuotaKind, retry time.Duration) *gemini.ErrorBody {
	qf := gemini.QuotaFailure{}
	for _, k := range kinds {
		var limit int64
		switch k {
		case fakegemini.QuotaRPM:
			limit = l.RPM
		case fakegemini.QuotaTPM:
			limit = l.TPM
		case fakegemini.QuotaRPD:
			limit = l.RPD
		}
		qf.Violations = append(qf.Violations, gemini.QuotaViolation{
			QuotaMetric:     fakegemini.QuotaMetric(k, tier),
			QuotaID:         fakegemini.QuotaID(k, tier),
			QuotaDimensions: map[string]string{"location": "global", "model": model},
			QuotaValue:      strconv.FormatInt(limit, 10),
		})
	}
	help := gemini.Help{Links: []gemini.HelpLink{{Description: "Learn more about Gemini API quotas", URL: rateLimitURL}}}
	ri := gemini.RetryInfo{RetryDelay: gemini.FormatDuration(retry.Truncate(time.Second))}
	return &gemini.ErrorBody{Error: gemini.ErrorDetail{
		Code: 429, Status: "RESOURCE_EXHAUSTED",
		Message: "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: " + rateLimitURL + ".",
		Details: []any{qf, help, ri},
	}}
}

// Check recomputes, from the admission record alone and independently of
// Call's bookkeeping, whether any sliding 60 s window or Pacific day of any
// bucket holds more than its limits; it returns one line per bucket and
// limit exceeded, nil when none is.
func (p *Provider) Check() []string {
	byProject := map[string][]Admission{}
	for _, a := range p.Admitted {
		byProject[a.Project] = append(byProject[a.Project], a)
	}
	projects := make([]string, 0, len(byProject))
	for proj := range byProject {
		projects = append(projects, proj)
	}
	slices.Sort(projects)
	var out []string
	for _, proj := range projects {
		as, l := byProject[proj], p.buckets[proj].limits
		// The fullest window ends at some admission: check (t_i-60s, t_i].
		lo, sum := 0, int64(0)
		rpmHit, tpmHit := false, false
		for hi, a := range as {
			sum += a.Tokens
			for !as[lo].At.After(a.At.Add(-Window)) {
				sum -= as[lo].Tokens
				lo++
			}
			if n := int64(hi - lo + 1); n > l.RPM && !rpmHit {
				rpmHit = true
				out = append(out, fmt.Sprintf("%s: %d requests in the 60s window ending %s, over rpm %d", proj, n, a.At.Format(time.RFC3339Nano), l.RPM))
			}
			if sum > l.TPM && !tpmHit {
				tpmHit = true
				out = append(out, fmt.Sprintf("%s: %d input tokens in the 60s window ending %s, over tpm %d", proj, sum, a.At.Format(time.RFC3339Nano), l.TPM))
			}
		}
		if l.RPD > 0 {
			perDay := map[string]int64{}
			for _, a := range as {
				perDay[fakegemini.Day(a.At)]++
			}
			for d, n := range perDay {
				if n > l.RPD {
					out = append(out, fmt.Sprintf("%s: %d requests on %s (America/Los_Angeles), over rpd %d", proj, n, d, l.RPD))
				}
			}
		}
	}
	slices.Sort(out)
	return out
}
