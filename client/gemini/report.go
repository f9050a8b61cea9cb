package gemini

import (
	"context"
	"errors"
	"net/http/httptrace"
	"strings"
	"sync/atomic"

	"google.golang.org/genai"

	"github.com/keyd/keyd/api"
	classify "github.com/keyd/keyd/internal/gemini"
)

// sendTrace records, through httptrace, whether a call's request was
// written to a connection.
type sendTrace struct {
	traced  bool // the hooks are installed and the transport fires them
	ctxDone bool // ctx was already done when the call began
	wrote   atomic.Bool
}

// trace returns ctx with hooks that record whether the request went out.
func (g *Generator) trace(ctx context.Context) (context.Context, *sendTrace) {
	st := &sendTrace{traced: g.traceable, ctxDone: ctx.Err() != nil}
	if !st.traced {
		return ctx, st
	}
	return httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		WroteHeaders: func() { st.wrote.Store(true) },
	}), st
}

// neverSent reports whether the request certainly did not reach Gemini.
func (st *sendTrace) neverSent() bool {
	if st.traced {
		return !st.wrote.Load()
	}
	return st.ctxDone
}

// failure builds the report of a failed call under l, and returns it with
// the HTTP status Gemini answered (0: none) and the error to hand the
// caller, cleaned of secrets.
func (g *Generator) failure(ctx context.Context, l *api.Lease, err error, st *sendTrace) (api.ReportRequest, int, error) {
	if ae, ok := errors.AsType[genai.APIError](err); ok {
		ae = cleanAPIError(ae, l.Secret)
		status := ae.Code
		if status < 100 || status > 599 {
			status = 0
		}
		return api.ReportRequest{Status: status, Error: errorBody(ae, l.Secret)}, status, ae
	}
	cerr := cleanError(err, l.Secret)
	if st != nil && st.neverSent() {
		return api.ReportRequest{Outcome: api.OutcomeUnused}, 0, cerr
	}
	return api.ReportRequest{Status: 0}, 0, cerr
}

// usageOf is keyd's usage of Gemini's usageMetadata; nil when there is no
// prompt count to reconcile the estimate with.
func usageOf(u *genai.GenerateContentResponseUsageMetadata) *api.Usage {
	if u == nil || u.PromptTokenCount <= 0 {
		return nil
	}
	return &api.Usage{
		PromptTokens: int64(u.PromptTokenCount),
		OutputTokens: int64(u.CandidatesTokenCount) + int64(u.ThoughtsTokenCount),
		TotalTokens:  int64(u.TotalTokenCount),
	}
}

// errorBody rebuilds Gemini's error body from the SDK's error:
// {"error":{"code","message","status","details"}}, cleaned of secret.
func errorBody(ae genai.APIError, secret string) map[string]any {
	inner := map[string]any{
		"code":    ae.Code,
		"message": cleanString(ae.Message, secret),
		"status":  ae.Status,
	}
	if len(ae.Details) > 0 {
		details := make([]any, len(ae.Details))
		for i, d := range ae.Details {
			details[i] = cleanValue(d, secret)
		}
		inner["details"] = details
	}
	return map[string]any{"error": inner}
}

// minSecretLen is the shortest secret cleanString looks for as it is:
// shorter ones are no real key, and replacing them would mangle the text
// (a secret "k" in "Tokens").
const minSecretLen = 8

// cleanString removes secret, and anything that looks like an API key,
// from s.
func cleanString(s, secret string) string {
	if len(secret) >= minSecretLen {
		s = strings.ReplaceAll(s, secret, classify.RedactedKey)
	}
	return classify.Redact(s)
}

// cleanValue is v (decoded JSON) with every string cleaned; it copies
// maps and slices rather than changing them.
func cleanValue(v any, secret string) any {
	switch x := v.(type) {
	case string:
		return cleanString(x, secret)
	case map[string]any:
		m := make(map[string]any, len(x))
		for k, e := range x {
			m[cleanString(k, secret)] = cleanValue(e, secret)
		}
		return m
	case []any:
		s := make([]any, len(x))
		for i, e := range x {
			s[i] = cleanValue(e, secret)
		}
		return s
	case []map[string]any:
		s := make([]any, len(x))
		for i, e := range x {
			s[i] = cleanValue(e, secret)
		}
		return s
	}
	return v
}

// cleanAPIError is ae with its message and details cleaned of secrets.
func cleanAPIError(ae genai.APIError, secret string) genai.APIError {
	out := genai.APIError{Code: ae.Code, Status: cleanString(ae.Status, secret), Message: cleanString(ae.Message, secret)}
	for _, d := range ae.Details {
		if m, ok := cleanValue(d, secret).(map[string]any); ok {
			out.Details = append(out.Details, m)
		}
	}
	return out
}

// cleanError is err when its text holds no secret. Otherwise it is an
// error with the cleaned text that unwraps only to context.Canceled or
// context.DeadlineExceeded, when err is one: the original, whose text
// holds the secret, is dropped.
func cleanError(err error, secret string) error {
	if err == nil {
		return nil
	}
	msg := cleanString(err.Error(), secret)
	if msg == err.Error() {
		return err
	}
	e := &cleanedError{msg: msg}
	for _, target := range []error{context.Canceled, context.DeadlineExceeded} {
		if errors.Is(err, target) {
			e.err = target
		}
	}
	return e
}

type cleanedError struct {
	msg string
	err error
}

func (e *cleanedError) Error() string { return e.msg }
func (e *cleanedError) Unwrap() error { return e.err }
