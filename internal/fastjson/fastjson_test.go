package fastjson

import "testing"

func TestScanner(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want bool // {"a": true} read as an object of one Bool
		v    bool
	}{
		{`{"a":true}`, true, true}, {` { "a" : false } `, true, false}, {`{"a":tru}`, false, false},
		{`{"a":truex}`, false, false}, {`{"a":null}`, false, false}, {`{"a":1}`, false, false},
		{`{"a":true,"a":true}`, false, false}, {`{"b":true}`, false, false}, {`{"a":true}x`, false, false},
	} {
		s := NewScanner([]byte(tt.in))
		var v bool
		ok := s.Object(func(name []byte) (uint, bool) {
			if string(name) != "a" {
				return 0, false
			}
			var ok bool
			v, ok = s.Bool()
			return 1, ok
		}) && s.End()
		if ok != tt.want || ok && v != tt.v {
			t.Errorf("%s: %v, %v; want %v, %v", tt.in, v, ok, tt.v, tt.want)
		}
	}
}

func TestSharedScannerStrings(t *testing.T) {
	b := []byte(`{"a":"xy","b":"","c":"z\u0041"}`)
	s := NewSharedScanner(b)
	var got []string
	s.Object(func(name []byte) (uint, bool) {
		v, ok := s.Str()
		if ok {
			got = append(got, v)
		}
		return 1 << (name[0] - 'a'), ok
	})
	clear(b)
	if len(got) != 2 || got[0] != "xy" || got[1] != "" {
		t.Errorf("strings = %q, want [xy \"\"] and a stop at the escape", got)
	}
	q := NewScanner([]byte(` "a b" `))
	if v, ok := q.Quoted(); !ok || string(v) != `"a b"` || !q.End() {
		t.Errorf("Quoted = %q, %v", v, ok)
	}
}
