// Package fastjson holds the pieces shared by the hand-written JSON codecs
// of the lease path: keyd's (internal/daemon/fastjson.go) and the public
// client's (client/fastjson.go). Each side decodes and encodes its few
// small, fixed-shape bodies with them instead of through encoding/json's
// reflection, and falls back to encoding/json for anything but the
// plainest form, so that the outcome is always encoding/json's.
//
// The plain form: exact field names, each at most once; strings of
// printable ASCII without escapes; integers without fraction or exponent
// that fit their field; true and false. A Scanner's methods return false
// on anything else.
package fastjson

import "strconv"

// Scanner walks a JSON text.
type Scanner struct {
	b   []byte
	src string // string(b), or "" when Str copies
	i   int
}

// NewScanner returns a Scanner at the start of b.
func NewScanner(b []byte) Scanner { return Scanner{b: b} }

// NewSharedScanner returns a Scanner at the start of b whose strings share
// one copy of b, made now, instead of each being a copy of its own.
func NewSharedScanner(b []byte) Scanner { return Scanner{b: b, src: string(b)} }

func (s *Scanner) ws() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

// Byte consumes c, after optional whitespace.
func (s *Scanner) Byte(c byte) bool {
	s.ws()
	if s.i < len(s.b) && s.b[s.i] == c {
		s.i++
		return true
	}
	return false
}

// Peek returns the next byte after whitespace, 0 at the end.
func (s *Scanner) Peek() byte {
	s.ws()
	if s.i < len(s.b) {
		return s.b[s.i]
	}
	return 0
}

// RawString returns the bytes of a string of printable ASCII without
// escapes, quotes excluded.
func (s *Scanner) RawString() ([]byte, bool) {
	v, ok := s.Quoted()
	if !ok {
		return nil, false
	}
	return v[1 : len(v)-1], true
}

// Quoted returns the literal of a string of printable ASCII without
// escapes, quotes included.
func (s *Scanner) Quoted() ([]byte, bool) {
	if !s.Byte('"') {
		return nil, false
	}
	start := s.i - 1
	for ; s.i < len(s.b); s.i++ {
		switch c := s.b[s.i]; {
		case c == '"':
			s.i++
			return s.b[start:s.i], true
		case c < 0x20 || c > 0x7e || c == '\\':
			return nil, false
		}
	}
	return nil, false
}

// Str reads a plain string.
func (s *Scanner) Str() (string, bool) {
	v, ok := s.RawString()
	if ok && s.src != "" {
		return s.src[s.i-1-len(v) : s.i-1], true
	}
	return string(v), ok
}

// delimited reports whether the value just read ends where a member or
// the text may end: at the end, whitespace, a comma or a closing brace.
func (s *Scanner) delimited() bool {
	if s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r', ',', '}':
		default: // a fraction, an exponent or garbage
			return false
		}
	}
	return true
}

// Int reads an integer of bits bits: -?(0|[1-9][0-9]*), then a delimiter.
func (s *Scanner) Int(bits int) (int64, bool) {
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
	if n == 0 || n > 1 && s.b[digits] == '0' || !s.delimited() {
		return 0, false
	}
	v, err := strconv.ParseInt(string(s.b[start:s.i]), 10, bits)
	return v, err == nil
}

// Bool reads true or false, then a delimiter.
func (s *Scanner) Bool() (v, ok bool) {
	s.ws()
	rest := s.b[s.i:]
	switch {
	case len(rest) >= 4 && string(rest[:4]) == "true":
		s.i, v = s.i+4, true
	case len(rest) >= 5 && string(rest[:5]) == "false":
		s.i += 5
	default:
		return false, false
	}
	return v, s.delimited()
}

// Object reads {"name": value, ...}, calling field for each member to
// read its value. field returns the member's bit, distinct for each
// name, and false for an unknown name or a bad value; a name seen twice
// is declined.
func (s *Scanner) Object(field func(name []byte) (uint, bool)) bool {
	if !s.Byte('{') {
		return false
	}
	if s.Byte('}') {
		return true
	}
	var seen uint
	for {
		name, ok := s.RawString()
		if !ok || !s.Byte(':') {
			return false
		}
		bit, ok := field(name)
		if !ok || seen&bit != 0 {
			return false
		}
		seen |= bit
		switch s.Peek() {
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

// End reports whether only whitespace is left.
func (s *Scanner) End() bool {
	s.ws()
	return s.i == len(s.b)
}

// Plain reports whether encoding/json writes s as is between quotes:
// printable ASCII other than the quote, the backslash and the HTML
// characters it escapes.
func Plain(s string) bool {
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c < 0x20 || c > 0x7e, c == '"', c == '\\', c == '<', c == '>', c == '&':
			return false
		}
	}
	return true
}

// AppendField appends "name":"v", after a comma unless first. v must be
// Plain.
func AppendField(b []byte, first bool, name, v string) []byte {
	if !first {
		b = append(b, ',')
	}
	b = append(b, '"')
	b = append(b, name...)
	b = append(b, `":"`...)
	b = append(b, v...)
	return append(b, '"')
}

// AppendInt appends "name":v, after a comma unless first.
func AppendInt(b []byte, first bool, name string, v int64) []byte {
	if !first {
		b = append(b, ',')
	}
	b = append(b, '"')
	b = append(b, name...)
	b = append(b, `":`...)
	return strconv.AppendInt(b, v, 10)
}
