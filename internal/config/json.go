package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"
)

// node is one JSON value and the offset of its first byte in the file.
type node struct {
	off    int
	val    any      // string, json.Number, bool, nil, or json.Delim '[' or '{'
	elems  []*node  // an array's elements
	fields []member // an object's members, in file order
}

type member struct {
	name string
	val  *node
}

func isObject(n *node) bool { return n.val == json.Delim('{') }
func isArray(n *node) bool  { return n.val == json.Delim('[') }

// field returns the value of n's first member called name, or nil.
func (n *node) field(name string) *node {
	for _, m := range n.fields {
		if m.name == name {
			return m.val
		}
	}
	return nil
}

// describe names n's type, and its value when it is a scalar, for "got ..."
// in messages.
func describe(n *node) string {
	switch v := n.val.(type) {
	case string:
		if r := []rune(v); len(r) > 40 {
			v = string(r[:40]) + "…"
		}
		return "string " + strconv.Quote(v)
	case json.Number:
		return "number " + string(v)
	case bool:
		return "boolean " + strconv.FormatBool(v)
	case nil:
		return "null"
	}
	if isObject(n) {
		return "an object"
	}
	return "a list"
}

// readTree reads the next JSON value from dec, which reads data from its
// start and has data's first value known to be valid.
func readTree(dec *json.Decoder, data []byte) (*node, error) {
	n := &node{off: valueStart(data, int(dec.InputOffset()))}
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	n.val = tok
	switch tok {
	case json.Delim('{'):
		for dec.More() {
			tok, err := dec.Token()
			if err != nil {
				return nil, err
			}
			v, err := readTree(dec, data)
			if err != nil {
				return nil, err
			}
			name, _ := tok.(string)
			n.fields = append(n.fields, member{name, v})
		}
	case json.Delim('['):
		for dec.More() {
			v, err := readTree(dec, data)
			if err != nil {
				return nil, err
			}
			n.elems = append(n.elems, v)
		}
	default:
		return n, nil
	}
	_, err = dec.Token() // the closing '}' or ']'
	return n, err
}

// valueStart returns the offset of the token after off: past white space
// and at most one ',' or ':', which json.Decoder.Token consumes unseen.
func valueStart(data []byte, off int) int {
	off = skipSpace(data, off)
	if off < len(data) && (data[off] == ',' || data[off] == ':') {
		off = skipSpace(data, off+1)
	}
	return off
}

func skipSpace(data []byte, off int) int {
	for off < len(data) && strings.IndexByte(" \t\r\n", data[off]) >= 0 {
		off++
	}
	return off
}

// diag is a problem found at an offset of the file.
type diag struct {
	off int
	msg string
}

// parser checks one file, collecting every error and warning with its
// offset so that all of them are reported at once, in file order.
type parser struct {
	path  string
	data  []byte
	lines []int // offset of each line's first byte
	errs  []diag
	warns []diag
}

func newParser(path string, data []byte) *parser {
	p := &parser{path: path, data: data, lines: []int{0}}
	for i, b := range data {
		if b == '\n' {
			p.lines = append(p.lines, i+1)
		}
	}
	return p
}

// pos renders off as "PATH:LINE:COLUMN", both 1-based, columns in runes.
func (p *parser) pos(off int) string {
	off = min(max(off, 0), len(p.data))
	line := sort.Search(len(p.lines), func(i int) bool { return p.lines[i] > off })
	col := utf8.RuneCount(p.data[p.lines[line-1]:off]) + 1
	return fmt.Sprintf("%s:%d:%d", p.path, line, col)
}

// errorf records an error at off; ctx ("key flash_01") prefixes it.
func (p *parser) errorf(off int, ctx, format string, args ...any) {
	p.errs = append(p.errs, diag{off, prefix(ctx, fmt.Sprintf(format, args...))})
}

func (p *parser) warnf(off int, ctx, format string, args ...any) {
	p.warns = append(p.warns, diag{off, prefix(ctx, fmt.Sprintf(format, args...))})
}

func prefix(ctx, msg string) string {
	if ctx == "" {
		return msg
	}
	return ctx + ": " + msg
}

// errors returns the errors in file order, each starting with its position.
func (p *parser) errors() []error {
	slices.SortStableFunc(p.errs, func(a, b diag) int { return a.off - b.off })
	out := make([]error, len(p.errs))
	for i, d := range p.errs {
		out[i] = fmt.Errorf("%s: %s", p.pos(d.off), d.msg)
	}
	return out
}

// warnings returns the warnings in file order.
func (p *parser) warnings() []string {
	slices.SortStableFunc(p.warns, func(a, b diag) int { return a.off - b.off })
	out := make([]string, len(p.warns))
	for i, d := range p.warns {
		out[i] = d.msg
	}
	return out
}

// decode returns the file's tree, or nil after reporting why the file is
// not a JSON value. Data after the value is reported too.
func (p *parser) decode() *node {
	dec := json.NewDecoder(bytes.NewReader(p.data))
	if err := dec.Decode(new(json.RawMessage)); err != nil {
		p.syntaxError(err)
		return nil
	}
	if off := skipSpace(p.data, int(dec.InputOffset())); off < len(p.data) {
		p.errorf(off, "", "unexpected data after the top-level object: remove it")
	}
	dec = json.NewDecoder(bytes.NewReader(p.data))
	dec.UseNumber()
	root, err := readTree(dec, p.data)
	if err != nil { // not expected: the value is valid JSON
		p.errorf(0, "", "invalid JSON: %v", err)
		return nil
	}
	return root
}

// syntaxError reports why data is not one JSON value; decErr is what
// json.Decoder.Decode said.
func (p *parser) syntaxError(decErr error) {
	var se *json.SyntaxError
	switch {
	case len(bytes.TrimSpace(p.data)) == 0:
		p.errorf(0, "", `the file is empty: write {"keys": [...]}`)
	case errors.Is(decErr, io.ErrUnexpectedEOF):
		p.errorf(len(p.data), "", "invalid JSON: the file ends early: finish the last value and close every { and [")
	// The decoder's offsets count from where it resumed, Unmarshal's from
	// the start of the file.
	case errors.As(json.Unmarshal(p.data, new(json.RawMessage)), &se):
		off := max(int(se.Offset)-1, 0)
		msg := "invalid JSON: " + se.Error()
		if c := p.data[off]; c == '}' || c == ']' {
			if prev := bytes.TrimRight(p.data[:off], " \t\r\n"); bytes.HasSuffix(prev, []byte(",")) {
				msg += ": remove the comma before it"
			}
		}
		p.errorf(off, "", "%s", msg)
	default:
		p.errorf(0, "", "invalid JSON: %v", decErr)
	}
}

// fields returns n's members by name. A name given twice is an error; a
// name not in known is a warning suggesting the nearest known name (known
// nil accepts every name). ctx prefixes the messages.
func (p *parser) fields(n *node, ctx string, known []string) map[string]*node {
	f := make(map[string]*node, len(n.fields))
	for _, m := range n.fields {
		if first, dup := f[m.name]; dup {
			p.errorf(m.val.off, ctx, "field %q is set twice (first at %s): remove one", m.name, p.pos(first.off))
			continue
		}
		f[m.name] = m.val
		if known == nil || slices.Contains(known, m.name) {
			continue
		}
		msg := fmt.Sprintf("unknown field %q", m.name)
		if ctx == "" {
			msg = fmt.Sprintf("unknown top-level field %q", m.name)
		}
		if s := Nearest(m.name, known); s != "" {
			msg += fmt.Sprintf(" (did you mean %q?)", s)
		}
		p.warnf(m.val.off, ctx, "%s", msg)
	}
	return f
}

// Nearest returns the candidate nearest to name by edit distance, ignoring
// case, for "did you mean" hints; "" when none is within 2 edits and half
// of name's length. Ties go to the earlier candidate.
func Nearest(name string, candidates []string) string {
	best, bestD := "", 3
	for _, c := range candidates {
		if d := editDistance(strings.ToLower(name), strings.ToLower(c)); d < bestD {
			best, bestD = c, d
		}
	}
	if 2*bestD > len(name) {
		return ""
	}
	return best
}

// editDistance is the Levenshtein distance between a and b, in bytes.
func editDistance(a, b string) int {
	row := make([]int, len(b)+1)
	for j := range row {
		row[j] = j
	}
	for i := 1; i <= len(a); i++ {
		prev := row[0]
		row[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			prev, row[j] = row[j], min(row[j]+1, row[j-1]+1, prev+cost)
		}
	}
	return row[len(b)]
}

func (p *parser) typeError(ctx, name string, n *node, want string) {
	p.errorf(n.off, ctx, "field %q: want %s, got %s", name, want, describe(n))
}

// str reads string field name, whose value is n (nil when absent); ok
// reports a string was there.
func (p *parser) str(ctx, name string, n *node) (s string, ok bool) {
	if n == nil {
		return "", false
	}
	if s, ok = n.val.(string); !ok {
		p.typeError(ctx, name, n, "a string")
	}
	return s, ok
}

func (p *parser) boolean(ctx, name string, n *node) (b bool, ok bool) {
	if n == nil {
		return false, false
	}
	if b, ok = n.val.(bool); !ok {
		p.typeError(ctx, name, n, "true or false")
	}
	return b, ok
}

// int reads whole-number field name, which must be >= least; ok reports
// a valid value was there (the value is 0 otherwise).
func (p *parser) int(ctx, name string, n *node, least int64) (v int64, ok bool) {
	if n == nil {
		return 0, false
	}
	num, isNum := n.val.(json.Number)
	if !isNum {
		p.typeError(ctx, name, n, "a whole number")
		return 0, false
	}
	v, err := strconv.ParseInt(string(num), 10, 64)
	switch {
	case errors.Is(err, strconv.ErrRange):
		p.errorf(n.off, ctx, "field %q: %s is out of range", name, num)
	case err != nil:
		p.typeError(ctx, name, n, "a whole number")
	case v < least && least == 1:
		p.errorf(n.off, ctx, "field %q: must be > 0, got %d", name, v)
	case v < least:
		p.errorf(n.off, ctx, "field %q: must be >= %d, got %d", name, least, v)
	default:
		return v, true
	}
	return 0, false
}
