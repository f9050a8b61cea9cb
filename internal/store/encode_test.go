package store

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"
)

// decodeBoth decodes what json.Marshal and our appender make of v and
// fails unless both decode to the same value.
func decodeBoth[T any](t *testing.T, v *T, ours []byte) {
	t.Helper()
	std, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("json.Marshal: %v", err)
	}
	var fromStd, fromOurs T
	if err := json.Unmarshal(std, &fromStd); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(ours, &fromOurs); err != nil {
		t.Fatalf("decoding %s: %v", ours, err)
	}
	if !reflect.DeepEqual(fromStd, fromOurs) {
		t.Errorf("decoded differently:\n std  %s\n ours %s", std, ours)
	}
}

// fill sets every field of the struct v points to to a non-zero value.
func fill(v any) {
	rv := reflect.ValueOf(v).Elem()
	for i := range rv.NumField() {
		f := rv.Field(i)
		switch f.Kind() {
		case reflect.String:
			f.SetString("s" + rv.Type().Field(i).Name)
		case reflect.Int, reflect.Int64:
			f.SetInt(int64(i + 1))
		case reflect.Bool:
			f.SetBool(true)
		case reflect.Struct:
			f.Set(reflect.ValueOf(time.Date(2025, 1, 2, 3, 4, 5, i, time.FixedZone("", 3600))))
		default:
			panic("fill: unhandled kind " + f.Kind().String())
		}
	}
}

// TestAppendCoversEveryField fails when a field is added to Lease, Day or
// counters without being added to its appender.
func TestAppendCoversEveryField(t *testing.T) {
	var l Lease
	fill(&l)
	b, err := appendLease(nil, &l)
	if err != nil {
		t.Fatal(err)
	}
	var l2 Lease
	if err := json.Unmarshal(b, &l2); err != nil {
		t.Fatal(err)
	}
	// Times keep their instant but not their *Location pointer.
	if !l2.GrantedAt.Equal(l.GrantedAt) || !l2.ExpiresAt.Equal(l.ExpiresAt) || !l2.ReportedAt.Equal(l.ReportedAt) {
		t.Errorf("times differ: %s", b)
	}
	l2.GrantedAt, l2.ExpiresAt, l2.ReportedAt = l.GrantedAt, l.ExpiresAt, l.ReportedAt
	if !reflect.DeepEqual(l, l2) {
		t.Errorf("lease round trip:\n in  %+v\n out %+v", l, l2)
	}
	decodeBoth(t, &l, b)

	var d, d2 Day
	fill(&d)
	if err := json.Unmarshal(appendDay(nil, &d), &d2); err != nil || d != d2 {
		t.Errorf("day round trip: %+v, %v", d2, err)
	}
	var c, c2 counters
	fill(&c)
	if err := json.Unmarshal(appendCounters(nil, &c), &c2); err != nil || c != c2 {
		t.Errorf("counters round trip: %+v, %v", c2, err)
	}
	for _, c := range []counters{{}, {Unused: 1}, {Requests: -1, Unused: 1}} {
		decodeBoth(t, &c, appendCounters(nil, &c))
	}
}

func TestAppendTimeInvalid(t *testing.T) {
	for _, tm := range []time.Time{
		time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC),
		time.Date(-1, 1, 1, 0, 0, 0, 0, time.UTC),
		time.Date(2025, 1, 1, 0, 0, 0, 0, time.FixedZone("", 24*3600)),
	} {
		_, errStd := tm.MarshalJSON()
		_, errOurs := appendTime(nil, tm)
		if errStd == nil || errOurs == nil || validTime(tm) {
			t.Errorf("%v: std %v, ours %v, valid %v", tm, errStd, errOurs, validTime(tm))
		}
	}
}

func FuzzAppendLease(f *testing.F) {
	f.Add("id", "k", "p", "m", "c", int64(-1), int64(1700000000), true, "ok")
	f.Add("a\"b\\c\n\r\t\x00\x1f", "<>&", "\u2028\u2029", "\xff\xfe", "é日本", int64(0), int64(0), false, "")
	f.Add(strings.Repeat("x", 300), "", "", "", "", int64(1<<62), int64(-1<<40), false, "\x7f")
	f.Fuzz(func(t *testing.T, id, key, project, model, client string, n, sec int64, reported bool, class string) {
		at := time.Unix(sec%(1<<34), n%1e9).In(time.FixedZone("", int(n%(24*3600))))
		l := Lease{
			ID: id, KeyID: key, Project: project, Model: model, Client: client,
			Tokens: n, GrantedAt: at, ExpiresAt: at.UTC(), Day: id + key,
			Reported: reported, Classification: class, Action: client,
			PromptTokens: -n, OutputTokens: n / 2,
		}
		if reported {
			l.ReportedAt = at
		}
		b, err := appendLease(nil, &l)
		if _, errStd := json.Marshal(&l); (err == nil) != (errStd == nil) {
			t.Fatalf("errors differ: ours %v, std %v", err, errStd)
		}
		if err != nil {
			if validTime(l.GrantedAt) && validTime(l.ExpiresAt) && validTime(l.ReportedAt) {
				t.Fatalf("validTime accepts what fails: %v", err)
			}
			return
		}
		decodeBoth(t, &l, b)
		d := Day{Project: project, Model: model, Day: class, Count: n}
		decodeBoth(t, &d, appendDay(nil, &d))
	})
}
