package fakegemini

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"time"
)

// Record is one API request as the fake saw it.
type Record struct {
	// Seq numbers requests from 1 in arrival order.
	Seq int `json:"seq"`
	// Time is the fake clock when the request was admitted (counted
	// against its bucket), else when it arrived.
	Time time.Time `json:"time"`
	// Method is one of the Method* constants.
	Method string `json:"method"`
	// Key is the API key sent ("" when none).
	Key string `json:"key,omitempty"`
	// Project is the key's project ("" for an unknown key or none).
	Project string `json:"project,omitempty"`
	// Model is the model named by the path ("" for models.list).
	Model string `json:"model,omitempty"`
	// Status is the HTTP status answered; 0 while the request is in
	// flight; 499 when the client went away before the answer.
	Status int `json:"status"`
	// Error is the google.rpc status name of an error answer.
	Error string `json:"error,omitempty"`
	// Admitted reports that the request counted against the RPM, TPM and
	// RPD of its (project, model).
	Admitted bool `json:"admitted"`
	// PromptTokens is the prompt's size (by the token-count rule), when
	// the body was read.
	PromptTokens int `json:"prompt_tokens"`
	// OutputTokens and ThoughtsTokens are the answer's candidates and
	// thoughts token counts.
	OutputTokens   int `json:"output_tokens"`
	ThoughtsTokens int `json:"thoughts_tokens,omitempty"`
	// Quota lists the limits a limit 429 named (QuotaZero alone for an
	// unavailable model); QuotaIDs their quotaIds; RetryDelay the exact
	// delay behind its RetryInfo.
	Quota      []QuotaKind   `json:"quota,omitempty"`
	QuotaIDs   []string      `json:"quota_ids,omitempty"`
	RetryDelay time.Duration `json:"retry_delay_ns,omitempty"`
	// Fault is the injected fault that answered (or delayed) the request.
	Fault FaultKind `json:"fault,omitempty"`
}

// Requests returns a copy of every record, in arrival order.
func (s *Server) Requests() []Record {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Record, len(s.records))
	for i, r := range s.records {
		out[i] = *r
		out[i].Quota = append([]QuotaKind(nil), r.Quota...)
		out[i].QuotaIDs = append([]string(nil), r.QuotaIDs...)
	}
	return out
}

// isGeneration reports whether the record is a generateContent or
// streamGenerateContent request.
func (r *Record) isGeneration() bool { return r.Method == MethodGenerate || r.Method == MethodStream }

// CountsByKey counts, per key, the generation requests (generateContent
// and streamGenerateContent) answered with a 2xx.
func (s *Server) CountsByKey() map[string]int {
	out := map[string]int{}
	for _, r := range s.Requests() {
		if r.isGeneration() && r.Status >= 200 && r.Status < 300 {
			out[r.Key]++
		}
	}
	return out
}

// Violations checks the record, independently of the admission logic,
// for any (project, model) whose admitted requests exceeded its RPM or TPM
// in some sliding 60 s window, or its RPD on some Pacific day, or that
// admitted a request for an unavailable model. It returns one line per
// finding (the first offending window of each kind, every offending day),
// nil if none: since the fake refuses what would exceed a limit, a non-nil
// result is a bug of the fake (or a clock that ran backward).
func (s *Server) Violations() []string {
	return s.violations(s.Requests())
}

// Stats summarizes the record.
type Stats struct {
	// Now is the fake clock.
	Now time.Time `json:"now"`
	// Requests counts every API request; Admitted those counted against
	// a bucket.
	Requests int `json:"requests"`
	Admitted int `json:"admitted"`
	// ByStatus counts requests by HTTP status ("200", "429", ...; "0" in
	// flight).
	ByStatus map[string]int `json:"by_status"`
	// RequestsByKey counts every API request per key sent.
	RequestsByKey map[string]int `json:"requests_by_key"`
	// CountsByKey is CountsByKey().
	CountsByKey map[string]int `json:"counts_by_key"`
	// Refused counts 429s by kind: "rpm", "tpm", "rpd", "zero" (one per
	// limit a body named) and "capacity", "prepayment" (injected).
	Refused map[string]int `json:"refused"`
	// Faults counts injected faults by kind.
	Faults map[string]int `json:"faults"`
	// Buckets counts admitted requests per "project/model".
	Buckets map[string]int `json:"buckets"`
	// Violations is Violations(), [] when none.
	Violations []string `json:"violations"`
}

// Stats returns a summary of the record.
func (s *Server) Stats() Stats {
	recs := s.Requests()
	st := Stats{
		Now:           s.Now(),
		Requests:      len(recs),
		ByStatus:      map[string]int{},
		RequestsByKey: map[string]int{},
		CountsByKey:   map[string]int{},
		Refused:       map[string]int{},
		Faults:        map[string]int{},
		Buckets:       map[string]int{},
		Violations:    s.violations(recs),
	}
	if st.Violations == nil {
		st.Violations = []string{}
	}
	for _, r := range recs {
		st.ByStatus[strconv.Itoa(r.Status)]++
		st.RequestsByKey[r.Key]++
		if r.isGeneration() && r.Status >= 200 && r.Status < 300 {
			st.CountsByKey[r.Key]++
		}
		if r.Admitted {
			st.Admitted++
			st.Buckets[r.Project+"/"+r.Model]++
		}
		for _, q := range r.Quota {
			st.Refused[string(q)]++
		}
		if r.Fault != "" {
			st.Faults[string(r.Fault)]++
			if r.Status == http.StatusTooManyRequests {
				st.Refused[string(r.Fault)]++
			}
		}
	}
	return st
}

// AdminHandler serves the fake's own endpoints, for tests that run the fake
// as a process (ServeHTTP routes /_fake/ here):
//
//	GET  /_fake/stats     Stats as JSON
//	GET  /_fake/requests  every Record as a JSON array
//	GET  /_fake/clock     {"now": RFC 3339}
//	POST /_fake/clock     {"advance": "90s"} or {"set": RFC 3339}: move the clock; answers {"now": ...}
//	POST /_fake/faults    a FaultRule, e.g. {"kind": "overloaded", "count": 2}; a rule with
//	                      count is queued like InjectNext, any other is added like AddRule
//	POST /_fake/reset     Reset
//
// Errors are {"error": "..."} with 400 or 405.
func (s *Server) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /_fake/stats", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, s.Stats())
	})
	mux.HandleFunc("GET /_fake/requests", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, s.Requests())
	})
	mux.HandleFunc("GET /_fake/clock", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, map[string]time.Time{"now": s.Now()})
	})
	mux.HandleFunc("POST /_fake/clock", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Advance *Duration `json:"advance"`
			Set     string    `json:"set"`
		}
		if err := readAdmin(r, &req); err != nil {
			adminError(w, err)
			return
		}
		switch {
		case req.Advance != nil && req.Set != "":
			adminError(w, fmt.Errorf("give advance or set, not both"))
			return
		case req.Advance != nil:
			s.Advance(time.Duration(*req.Advance))
		case req.Set != "":
			t, err := time.Parse(time.RFC3339Nano, req.Set)
			if err != nil {
				adminError(w, err)
				return
			}
			s.mu.Lock()
			s.offset += t.Sub(s.nowLocked())
			s.mu.Unlock()
		default:
			adminError(w, fmt.Errorf("give advance or set"))
			return
		}
		writeJSON(w, 200, map[string]time.Time{"now": s.Now()})
	})
	mux.HandleFunc("POST /_fake/faults", func(w http.ResponseWriter, r *http.Request) {
		var rule FaultRule
		if err := readAdmin(r, &rule); err != nil {
			adminError(w, err)
			return
		}
		if err := rule.validate(s.modelSet()); err != nil {
			adminError(w, err)
			return
		}
		if rule.Count > 0 && rule.Method == "" && rule.Model == "" && rule.Key == "" {
			s.InjectNext(rule.Count, rule.Fault)
		} else if err := s.AddRule(rule); err != nil {
			adminError(w, err)
			return
		}
		writeJSON(w, 200, map[string]bool{"ok": true})
	})
	mux.HandleFunc("POST /_fake/reset", func(w http.ResponseWriter, r *http.Request) {
		s.Reset()
		writeJSON(w, 200, map[string]bool{"ok": true})
	})
	return mux
}

func (s *Server) modelSet() map[string]bool {
	m := map[string]bool{}
	for name := range s.models {
		m[name] = true
	}
	return m
}

func readAdmin(r *http.Request, v any) error {
	var b json.RawMessage
	if err := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 1<<20)).Decode(&b); err != nil {
		return fmt.Errorf("body: %w", err)
	}
	if err := decodeStrict(b, v); err != nil {
		return fmt.Errorf("body: %w", err)
	}
	return nil
}

func adminError(w http.ResponseWriter, err error) {
	writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
}
