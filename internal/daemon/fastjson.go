package daemon

import (
	"strconv"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/fastjson"
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
//
// The scanner and the encoding helpers are in internal/fastjson, shared
// with the client's codecs for the other direction (client/fastjson.go).

// parseLeaseRequest decodes a plain lease request body (see above).
func parseLeaseRequest(b []byte, req *api.LeaseRequest) bool {
	s := fastjson.NewScanner(b)
	ok := s.Object(func(name []byte) (bit uint, ok bool) {
		switch string(name) {
		case "model":
			req.Model, ok = s.Str()
			return 1, ok
		case "tokens":
			req.Tokens, ok = s.Int(64)
			return 2, ok
		case "workload_type":
			req.WorkloadType, ok = s.Str()
			return 4, ok
		case "wait_ms":
			req.WaitMS, ok = s.Int(64)
			return 8, ok
		case "client":
			req.Client, ok = s.Str()
			return 16, ok
		}
		return 0, false
	})
	return ok && s.End()
}

// parseReportRequest decodes a plain report body (see above); a body with
// "error" is left to encoding/json.
func parseReportRequest(b []byte, rep *api.ReportRequest) bool {
	s := fastjson.NewScanner(b)
	ok := s.Object(func(name []byte) (bit uint, ok bool) {
		switch string(name) {
		case "outcome":
			rep.Outcome, ok = s.Str()
			return 1, ok
		case "status":
			var v int64
			v, ok = s.Int(strconv.IntSize)
			rep.Status = int(v)
			return 2, ok
		case "usage":
			u := &api.Usage{}
			rep.Usage = u
			return 4, s.Object(func(name []byte) (bit uint, ok bool) {
				switch string(name) {
				case "prompt_tokens":
					u.PromptTokens, ok = s.Int(64)
					return 1, ok
				case "output_tokens":
					u.OutputTokens, ok = s.Int(64)
					return 2, ok
				case "total_tokens":
					u.TotalTokens, ok = s.Int(64)
					return 4, ok
				}
				return 0, false
			})
		}
		return 0, false
	})
	return ok && s.End()
}

// appendLease appends l as json.Encoder.Encode writes it, newline
// included, or reports false when a string needs escaping or the time
// cannot be encoded.
func appendLease(b []byte, l *api.Lease) ([]byte, bool) {
	if !fastjson.Plain(l.LeaseID) || !fastjson.Plain(l.KeyID) || !fastjson.Plain(l.Project) || !fastjson.Plain(l.Model) || !fastjson.Plain(l.Secret) {
		return b, false
	}
	b0 := b
	b = append(b, '{')
	b = fastjson.AppendField(b, true, "lease_id", l.LeaseID)
	b = fastjson.AppendField(b, false, "key_id", l.KeyID)
	b = fastjson.AppendField(b, false, "project", l.Project)
	b = fastjson.AppendField(b, false, "model", l.Model)
	b = fastjson.AppendField(b, false, "secret", l.Secret)
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
	if !fastjson.Plain(r.LeaseID) || !fastjson.Plain(r.KeyID) || !fastjson.Plain(r.Classification) || !fastjson.Plain(r.Action) {
		return b, false
	}
	b = append(b, '{')
	b = fastjson.AppendField(b, true, "lease_id", r.LeaseID)
	b = fastjson.AppendField(b, false, "key_id", r.KeyID)
	b = fastjson.AppendField(b, false, "classification", r.Classification)
	if r.Action != "" {
		b = fastjson.AppendField(b, false, "action", r.Action)
	}
	if r.Duplicate {
		b = append(b, `,"duplicate":true`...)
	}
	return append(b, "}\n"...), true
}
