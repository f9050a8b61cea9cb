package store

import (
	"strconv"
	"time"
	"unicode/utf8"
)

// The writer encodes the types written on every grant and report (Lease,
// Day, usage counters) by hand, appending to one buffer per transaction,
// instead of calling json.Marshal: that saves about five allocations per
// lease on the hot path. The output is JSON that encoding/json decodes to
// the same value as it decodes json.Marshal's output (FuzzAppendLease and
// TestAppendCoversEveryField check this); it differs only in not escaping
// <, > and &. A field added to Lease or Day must be added here too.

// appendLease appends l's JSON, with the field names and omissions of its
// struct tags.
func appendLease(b []byte, l *Lease) ([]byte, error) {
	var err error
	b = append(b, `{"id":`...)
	b = appendString(b, l.ID)
	b = append(b, `,"key":`...)
	b = appendString(b, l.KeyID)
	b = append(b, `,"project":`...)
	b = appendString(b, l.Project)
	b = append(b, `,"model":`...)
	b = appendString(b, l.Model)
	if l.Client != "" {
		b = append(b, `,"client":`...)
		b = appendString(b, l.Client)
	}
	b = append(b, `,"tokens":`...)
	b = strconv.AppendInt(b, l.Tokens, 10)
	b = append(b, `,"granted":`...)
	if b, err = appendTime(b, l.GrantedAt); err != nil {
		return b, err
	}
	b = append(b, `,"expires":`...)
	if b, err = appendTime(b, l.ExpiresAt); err != nil {
		return b, err
	}
	b = append(b, `,"day":`...)
	b = appendString(b, l.Day)
	if l.Reported {
		b = append(b, `,"reported":true`...)
	}
	if !l.ReportedAt.IsZero() {
		b = append(b, `,"reported_at":`...)
		if b, err = appendTime(b, l.ReportedAt); err != nil {
			return b, err
		}
	}
	if l.Classification != "" {
		b = append(b, `,"class":`...)
		b = appendString(b, l.Classification)
	}
	if l.Action != "" {
		b = append(b, `,"action":`...)
		b = appendString(b, l.Action)
	}
	if l.PromptTokens != 0 {
		b = append(b, `,"prompt_tokens":`...)
		b = strconv.AppendInt(b, l.PromptTokens, 10)
	}
	if l.OutputTokens != 0 {
		b = append(b, `,"output_tokens":`...)
		b = strconv.AppendInt(b, l.OutputTokens, 10)
	}
	return append(b, '}'), nil
}

// appendDay appends d's JSON.
func appendDay(b []byte, d *Day) []byte {
	b = append(b, `{"project":`...)
	b = appendString(b, d.Project)
	b = append(b, `,"model":`...)
	b = appendString(b, d.Model)
	b = append(b, `,"day":`...)
	b = appendString(b, d.Day)
	b = append(b, `,"count":`...)
	b = strconv.AppendInt(b, d.Count, 10)
	return append(b, '}')
}

// appendCounters appends c's JSON, omitting zero counters.
func appendCounters(b []byte, c *counters) []byte {
	b = append(b, '{')
	n0 := len(b)
	b = appendCounter(b, n0, "requests", c.Requests)
	b = appendCounter(b, n0, "prompt_tokens", c.PromptTokens)
	b = appendCounter(b, n0, "output_tokens", c.OutputTokens)
	b = appendCounter(b, n0, "rate_minute", c.RateMinute)
	b = appendCounter(b, n0, "rate_day", c.RateDay)
	b = appendCounter(b, n0, "other_429", c.Other429)
	b = appendCounter(b, n0, "errors", c.Errors)
	b = appendCounter(b, n0, "unused", c.Unused)
	return append(b, '}')
}

// appendCounter appends `"name":v` unless v is zero, preceded by a comma
// unless b has nothing after the object's start n0.
func appendCounter(b []byte, n0 int, name string, v int64) []byte {
	if v == 0 {
		return b
	}
	if len(b) > n0 {
		b = append(b, ',')
	}
	b = append(b, '"')
	b = append(b, name...)
	b = append(b, '"', ':')
	return strconv.AppendInt(b, v, 10)
}

// appendTime appends t as a JSON string the way time.Time.MarshalJSON
// does, failing where it fails (see validTime).
func appendTime(b []byte, t time.Time) ([]byte, error) {
	b = append(b, '"')
	b, err := t.AppendText(b)
	return append(b, '"'), err
}

const hexDigits = "0123456789abcdef"

// appendString appends s as a JSON string. Like encoding/json, it replaces
// invalid UTF-8 with U+FFFD and escapes U+2028 and U+2029.
func appendString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		if c := s[i]; c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// validTime reports whether t can be encoded as JSON: RFC 3339 allows only
// years 0 to 9999 and zone offsets under 24 hours.
func validTime(t time.Time) bool {
	_, off := t.Zone()
	y := t.Year()
	return y >= 0 && y <= 9999 && off > -24*3600 && off < 24*3600
}
