package daemon

import (
	"strconv"

	"github.com/keyd/keyd/api"
)

// The lease path decodes and encodes its small, fixed-shape bodies by hand
// when it can, instead of through encoding/json's reflection, which was
// about a tenth of keyd's CPU time per lease+report pair.
//
// Decoding: parseLeaseRequest and parseReportRequest accept only the
// plainest form of a body (exact field names, each at most once, strings of
// printable ASCII without escapes, integers without fraction or exponent
// that fit their field, no "error" or null). Whatever they accept,
// encoding/json with DisallowUnknownFields decodes to the same value
// without error; everything else they decline, and decode falls back to
// encoding/json, which then gives its own answer or error. The fuzz targets
// FuzzDecodeLeaseRequest and FuzzDecodeReportRequest check both.
//
// Encoding: appendLease and appendReportResponse write exactly the bytes
// json.Encoder.Encode writes (TestAppendMatchesEncoder), and decline values
// holding a string that encoding/json would escape.

// scanner walks a JSON text. Its methods return false on anything outside
// the plain form above.
type scanner struct {
	b []byte
	i int
}

func (s *scanner) ws() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

// byte consumes c, after optional whitespace.
func (s *scanner) byte(c byte) bool {
	s.ws()
	if s.i < len(s.b) && s.b[s.i] == c {
		s.i++
		return true
	}
	return false
}

// peek returns the next byte after whitespace, 0 at the end.
func (s *scanner) peek() byte {
	s.ws()
	if s.i < len(s.b) {
		return s.b[s.i]
	}
	return 0
}

// rawString returns the bytes of a string of printable ASCII without
// escapes, quotes excluded.
func (s *scanner) rawString() ([]byte, bool) {
	if !s.byte('"') {
		return nil, false
	}
	start := s.i
	for ; s.i < len(s.b); s.i++ {
		switch c := s.b[s.i]; {
		case c == '"':
			v := s.b[start:s.i]
			s.i++
			return v, true
		case c < 0x20 || c > 0x7e || c == '\\':
			return nil, false
		}
	}
	return nil, false
}

func (s *scanner) str() (string, bool) {
	v, ok := s.rawString()
	return string(v), ok
}

// int reads an integer of bits bits: -?(0|[1-9][0-9]*), then a delimiter.
func (s *scanner) int(bits int) (int64, bool) {
	s.ws()
	start := s.i
	if s.i < len(s.b) && s.b[s.i] == '-' {
		s.i++
	}
	digits := s.i
	for s.i < len(s.b) && s.b[s.i] >= '0' && s.b[s.i] <= '9' {
		s.i++
	}
	n := s.i - digits
	if n == 0 || n > 1 && s.b[digits] == '0' {
		return 0, false
	}
	if s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r', ',', '}':
		default: // a fraction, an exponent or garbage
			return 0, false
		}
	}
	v, err := strconv.ParseInt(string(s.b[start:s.i]), 10, bits)
	return v, err == nil
}

// object reads {"name": value, ...}, calling field for each member to
// read its value. field returns the member's bit, distinct for each
// name, and false for an unknown name or a bad value; a name seen twice
// is declined.
func (s *scanner) object(field func(name []byte) (uint, bool)) bool {
	if !s.byte('{') {
		return false
	}
	if s.byte('}') {
		return true
	}
	var seen uint
	for {
		name, ok := s.rawString()
		if !ok || !s.byte(':') {
			return false
		}
		bit, ok := field(name)
		if !ok || seen&bit != 0 {
			return false
		}
		seen |= bit
		switch s.peek() {
		case ',':
			s.i++
		case '}':
			s.i++
			return true
		default:
			return false
		}
	}
}

// end reports whether only whitespace is left.
func (s *scanner) end() bool {
	s.ws()
	return s.i == len(s.b)
}

// parseLeaseRequest decodes a plain lease request body (see above).
func parseLeaseRequest(b []byte, req *api.LeaseRequest) bool {
	s := scanner{b: b}
	ok := s.object(func(name []byte) (bit uint, ok bool) {
		switch string(name) {
		case "model":
			req.Model, ok = s.str()
			return 1, ok
		case "tokens":
			req.Tokens, ok = s.int(64)
			return 2, ok
		case "workload_type":
			req.WorkloadType, ok = s.str()
			return 4, ok
		case "wait_ms":
			req.WaitMS, ok = s.int(64)
			return 8, ok
		case "client":
			req.Client, ok = s.str()
			return 16, ok
		}
		return 0, false
	})
	return ok && s.end()
}

// parseReportRequest decodes a plain report body (see above); a body with
// "error" is left to encoding/json.
func parseReportRequest(b []byte, rep *api.ReportRequest) bool {
	s := scanner{b: b}
	ok := s.object(func(name []byte) (bit uint, ok bool) {
		switch string(name) {
		case "outcome":
			rep.Outcome, ok = s.str()
			return 1, ok
		case "status":
			var v int64
			v, ok = s.int(strconv.IntSize)
			rep.Status = int(v)
			return 2, ok
		case "usage":
			u := &api.Usage{}
			rep.Usage = u
			return 4, s.object(func(name []byte) (bit uint, ok bool) {
				switch string(name) {
				case "prompt_tokens":
					u.PromptTokens, ok = s.int(64)
					return 1, ok
				case "output_tokens":
					u.OutputTokens, ok = s.int(64)
					return 2, ok
				case "total_tokens":
					u.TotalTokens, ok = s.int(64)
					return 4, ok
				}
				return 0, false
			})
		}
		return 0, false
	})
	return ok && s.end()
}

// plain reports whether encoding/json writes s as is between quotes:
// printable ASCII other than the quote, the backslash and the HTML
// characters it escapes.
func plain(s string) bool {
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c < 0x20 || c > 0x7e, c == '"', c == '\\', c == '<', c == '>', c == '&':
			return false
		}
	}
	return true
}

func appendField(b []byte, first bool, name, v string) []byte {
	if !first {
		b = append(b, ',')
	}
	b = append(b, '"')
	b = append(b, name...)
	b = append(b, `":"`...)
	b = append(b, v...)
	return append(b, '"')
}

// appendLease appends l as json.Encoder.Encode writes it, newline
// included, or reports false when a string needs escaping or the time
// cannot be encoded.
func appendLease(b []byte, l *api.Lease) ([]byte, bool) {
	if !plain(l.LeaseID) || !plain(l.KeyID) || !plain(l.Project) || !plain(l.Model) || !plain(l.Secret) {
		return b, false
	}
	b0 := b
	b = append(b, '{')
	b = appendField(b, true, "lease_id", l.LeaseID)
	b = appendField(b, false, "key_id", l.KeyID)
	b = appendField(b, false, "project", l.Project)
	b = appendField(b, false, "model", l.Model)
	b = appendField(b, false, "secret", l.Secret)
	b = append(b, `,"tokens":`...)
	b = strconv.AppendInt(b, l.Tokens, 10)
	b = append(b, `,"expires_at":"`...)
	b, err := l.ExpiresAt.AppendText(b) // what Time.MarshalJSON writes, and where it fails
	if err != nil {
		return b0, false
	}
	return append(b, "\"}\n"...), true
}

// appendReportResponse appends r as json.Encoder.Encode writes it, or
// reports false when a string needs escaping.
func appendReportResponse(b []byte, r *api.ReportResponse) ([]byte, bool) {
	if !plain(r.LeaseID) || !plain(r.KeyID) || !plain(r.Classification) || !plain(r.Action) {
		return b, false
	}
	b = append(b, '{')
	b = appendField(b, true, "lease_id", r.LeaseID)
	b = appendField(b, false, "key_id", r.KeyID)
	b = appendField(b, false, "classification", r.Classification)
	if r.Action != "" {
		b = appendField(b, false, "action", r.Action)
	}
	if r.Duplicate {
		b = append(b, `,"duplicate":true`...)
	}
	return append(b, "}\n"...), true
}
