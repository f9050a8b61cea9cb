package client

import (
	"strings"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/fastjson"
)

// Lease and Report, the calls a busy caller makes for every Gemini request,
// encode their request bodies and decode keyd's answers by hand when they
// can, instead of through encoding/json's reflection, which was about a
// sixth of the client's CPU time per lease+report pair. keyd does the same
// on its side (internal/daemon/fastjson.go); both use internal/fastjson.
//
// Encoding: appendLeaseRequest and appendReportRequest write exactly the
// bytes json.Marshal writes (TestAppendMatchesMarshal), and decline values
// holding a string that encoding/json would escape, or a report's Error.
//
// Decoding: parseLease and parseReportResponse accept only the plainest
// form of an answer (see internal/fastjson), which is the form keyd
// writes. Whatever they accept, json.Unmarshal decodes to the same value
// without error; everything else they decline, and json.Unmarshal decodes
// it (FuzzParseLease and FuzzParseReportResponse check this).

// appendLeaseRequest appends r as json.Marshal writes it, or reports false
// when a string needs escaping.
func appendLeaseRequest(b []byte, r *api.LeaseRequest) ([]byte, bool) {
	if !fastjson.Plain(r.Model) || !fastjson.Plain(r.WorkloadType) || !fastjson.Plain(r.Client) {
		return b, false
	}
	b = append(b, '{')
	b = fastjson.AppendField(b, true, "model", r.Model)
	if r.Tokens != 0 {
		b = fastjson.AppendInt(b, false, "tokens", r.Tokens)
	}
	if r.WorkloadType != "" {
		b = fastjson.AppendField(b, false, "workload_type", r.WorkloadType)
	}
	if r.WaitMS != 0 {
		b = fastjson.AppendInt(b, false, "wait_ms", r.WaitMS)
	}
	if r.Client != "" {
		b = fastjson.AppendField(b, false, "client", r.Client)
	}
	return append(b, '}'), true
}

// appendReportRequest appends r as json.Marshal writes it, or reports
// false when it holds an Error or a string that needs escaping.
func appendReportRequest(b []byte, r *api.ReportRequest) ([]byte, bool) {
	if r.Error != nil || !fastjson.Plain(r.Outcome) {
		return b, false
	}
	b = append(b, '{')
	if r.Outcome != "" {
		b = fastjson.AppendField(b, true, "outcome", r.Outcome)
	}
	b = fastjson.AppendInt(b, r.Outcome == "", "status", int64(r.Status))
	if u := r.Usage; u != nil {
		b = append(b, `,"usage":{`...)
		b = fastjson.AppendInt(b, true, "prompt_tokens", u.PromptTokens)
		if u.OutputTokens != 0 {
			b = fastjson.AppendInt(b, false, "output_tokens", u.OutputTokens)
		}
		if u.TotalTokens != 0 {
			b = fastjson.AppendInt(b, false, "total_tokens", u.TotalTokens)
		}
		b = append(b, '}')
	}
	return append(b, '}'), true
}

// parseLease decodes a plain lease (see above). It reads the strings in
// place and copies them out only once the whole answer is accepted: the
// secret into an allocation of its own, the others into one they share
// (see setLeaseStrings).
func parseLease(b []byte, l *api.Lease) bool {
	s := fastjson.NewScanner(b)
	var id, key, project, model, secret []byte // in b
	ok := s.Object(func(name []byte) (bit uint, ok bool) {
		switch string(name) {
		case "lease_id":
			id, ok = s.RawString()
			return 1, ok
		case "key_id":
			key, ok = s.RawString()
			return 2, ok
		case "project":
			project, ok = s.RawString()
			return 4, ok
		case "model":
			model, ok = s.RawString()
			return 8, ok
		case "secret":
			secret, ok = s.RawString()
			return 16, ok
		case "tokens":
			l.Tokens, ok = s.Int(64)
			return 32, ok
		case "expires_at":
			// What encoding/json does with a time: hand the quoted
			// literal, here free of escapes, to Time.UnmarshalJSON.
			var v []byte
			if v, ok = s.Quoted(); ok {
				ok = l.ExpiresAt.UnmarshalJSON(v) == nil
			}
			return 64, ok
		}
		return 0, false
	})
	if !ok || !s.End() {
		return false
	}
	var sb strings.Builder
	sb.Grow(len(id) + len(key) + len(project) + len(model))
	sb.Write(id)
	sb.Write(key)
	sb.Write(project)
	sb.Write(model)
	setLeaseStrings(l, sb.String(), len(id), len(key), len(project))
	l.Secret = ownSecret(secret)
	return true
}

// A lease's secret must not share memory with its other strings: a
// caller that keeps only the lease ID, say to report the lease later,
// would keep the secret in memory as long. So parseLease copies the
// secret into an allocation of its own and the other strings into one
// they share, instead of all of them into one copy of the answer. The
// strings json.Unmarshal decodes are allocations of their own already,
// save small ones (see minOwn), which rehomeShortSecret deals with.

// minOwn is the least size of an allocation the runtime never packs with
// others: it packs pointer-free allocations of fewer bytes into shared
// 16-byte blocks (its tiny allocator), and a block lives as long as any
// of them does.
const minOwn = 16

// setLeaseStrings sets l's strings other than the secret to the
// consecutive substrings of all of lengths id, key and project, and the
// rest.
func setLeaseStrings(l *api.Lease, all string, id, key, project int) {
	l.LeaseID, all = all[:id], all[id:]
	l.KeyID, all = all[:key], all[key:]
	l.Project, l.Model = all[:project], all[project:]
}

// ownSecret returns secret as a string in an allocation of its own.
func ownSecret(secret []byte) string {
	if len(secret) == 0 {
		return ""
	}
	var sb strings.Builder
	sb.Grow(max(len(secret), minOwn))
	sb.Write(secret)
	return sb.String()
}

// rehomeShortSecret is for a lease json.Unmarshal decoded: when its
// secret is short enough to share a tiny block with its other strings
// (see minOwn), it copies the secret into an allocation of its own and
// the others into one they share, each of at least minOwn bytes, lest
// the copies land in the block of the old secret. Only the collector
// then holds that block.
func rehomeShortSecret(l *api.Lease) {
	if len(l.Secret) == 0 || len(l.Secret) >= minOwn {
		return
	}
	var sb strings.Builder
	sb.Grow(max(len(l.LeaseID)+len(l.KeyID)+len(l.Project)+len(l.Model), minOwn))
	sb.WriteString(l.LeaseID)
	sb.WriteString(l.KeyID)
	sb.WriteString(l.Project)
	sb.WriteString(l.Model)
	setLeaseStrings(l, sb.String(), len(l.LeaseID), len(l.KeyID), len(l.Project))
	var sec strings.Builder
	sec.Grow(minOwn)
	sec.WriteString(l.Secret)
	l.Secret = sec.String()
}

// parseReportResponse decodes a plain report answer (see above).
func parseReportResponse(b []byte, r *api.ReportResponse) bool {
	s := fastjson.NewSharedScanner(b)
	ok := s.Object(func(name []byte) (bit uint, ok bool) {
		switch string(name) {
		case "lease_id":
			r.LeaseID, ok = s.Str()
			return 1, ok
		case "key_id":
			r.KeyID, ok = s.Str()
			return 2, ok
		case "classification":
			r.Classification, ok = s.Str()
			return 4, ok
		case "action":
			r.Action, ok = s.Str()
			return 8, ok
		case "duplicate":
			r.Duplicate, ok = s.Bool()
			return 16, ok
		}
		return 0, false
	})
	return ok && s.End()
}
