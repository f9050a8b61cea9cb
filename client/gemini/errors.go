package gemini

import (
	"fmt"
	"strings"
	"time"

	"github.com/keyd/keyd/api"
)

// Error is the error of a call that failed: the last attempt's Gemini
// error, a network error, ctx's end, or keyd refusing a lease for a
// reason other than capacity. It holds no secret.
//
// Err is why the call stopped; Last, when set, is the error of the last
// request sent to Gemini before that (a genai.APIError value or a network
// error), when it is not Err itself. errors.Is and errors.As see both.
type Error struct {
	Op       string // OpGenerate or OpStream
	Model    string
	Attempts int    // requests sent to Gemini
	KeyID    string // key of the last request sent; "" if none was
	Status   int    // HTTP status of the last request's answer; 0: none
	Err      error
	Last     error
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "gemini: %s %s", e.Op, e.Model)
	if e.Attempts > 0 {
		fmt.Fprintf(&b, " (%d %s, last with key %s)", e.Attempts, plural(e.Attempts, "attempt"), e.KeyID)
	}
	fmt.Fprintf(&b, ": %v", e.Err)
	if e.Last != nil {
		fmt.Fprintf(&b, " (after: %v)", e.Last)
	}
	return b.String()
}

// Unwrap returns Err and Last.
func (e *Error) Unwrap() []error { return nonNil(e.Err, e.Last) }

// NoCapacityError is the error of a call that keyd refused a lease for
// lack of capacity, with no retry_after or one beyond ctx's deadline.
// client.IsNoCapacity(err) is true of it and returns RetryAfter.
type NoCapacityError struct {
	Op       string
	Model    string
	Attempts int // requests sent to Gemini before keyd ran out
	// RetryAfter is keyd's retry_after: when a lease may succeed again;
	// 0 when nothing will free up without a change.
	RetryAfter time.Duration
	// Err is keyd's refusal (code api.CodeNoCapacity).
	Err *api.Error
	// Last is the error of the last request sent to Gemini, if any.
	Last error
}

func (e *NoCapacityError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "gemini: %s %s: no capacity", e.Op, e.Model)
	if e.Err != nil {
		fmt.Fprintf(&b, ": %s", e.Err.Message)
	}
	if e.RetryAfter > 0 {
		fmt.Fprintf(&b, " (retry in %s)", e.RetryAfter.Round(time.Millisecond))
	}
	if e.Attempts > 0 {
		fmt.Fprintf(&b, " (after %d %s", e.Attempts, plural(e.Attempts, "attempt"))
		if e.Last != nil {
			fmt.Fprintf(&b, ", the last: %v", e.Last)
		}
		b.WriteString(")")
	}
	return b.String()
}

// Unwrap returns keyd's *api.Error and Last.
func (e *NoCapacityError) Unwrap() []error {
	if e.Err == nil {
		return nonNil(e.Last)
	}
	return nonNil(e.Err, e.Last)
}

func nonNil(errs ...error) []error {
	out := errs[:0:0]
	for _, err := range errs {
		if err != nil {
			out = append(out, err)
		}
	}
	return out
}

func plural(n int, s string) string {
	if n == 1 {
		return s
	}
	return s + "s"
}
