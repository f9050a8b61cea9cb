package fakegemini

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// FaultKind is an injected failure.
type FaultKind string

// Fault kinds. The bodies are the literal ones of shared/gemini-api.md.
const (
	// FaultInternal: 500 INTERNAL "An internal error has occurred. ...".
	FaultInternal FaultKind = "internal"
	// FaultOverloaded: 503 UNAVAILABLE "The model is overloaded. Please try again later.".
	FaultOverloaded FaultKind = "overloaded"
	// FaultUnavailable: 503 UNAVAILABLE "The service is currently unavailable.".
	FaultUnavailable FaultKind = "unavailable"
	// FaultCapacity: 429 RESOURCE_EXHAUSTED without details, "Resource has
	// been exhausted (e.g. check quota)." (capacity throttling).
	FaultCapacity FaultKind = "capacity"
	// FaultPrepayment: 429 RESOURCE_EXHAUSTED without details, "Your
	// prepayment credits are depleted. ..." (billing).
	FaultPrepayment FaultKind = "prepayment"
	// FaultLatency only delays the answer (by Fault.Latency); the request
	// is then served as usual.
	FaultLatency FaultKind = "latency"
	// FaultCustom answers Fault.Status with Fault.Body as it is.
	FaultCustom FaultKind = "custom"
)

// Fault is one injected failure.
type Fault struct {
	Kind FaultKind `json:"kind"`
	// Latency delays the answer, on top of Config.Latency.
	Latency time.Duration `json:"-"`
	// ConsumeQuota counts the request against its bucket's limits before
	// it fails, as a request that reached the model would be. A request
	// over a limit then gets the limit's 429 instead of the fault.
	// Without it a failed request is not counted (and not recorded as
	// admitted).
	ConsumeQuota bool `json:"consume_quota,omitempty"`
	// Status and Body are the answer of FaultCustom; Body is sent as
	// application/json.
	Status int             `json:"status,omitempty"`
	Body   json.RawMessage `json:"body,omitempty"`
}

// faultJSON is the JSON form of a Fault.
type faultJSON struct {
	Kind         FaultKind       `json:"kind"`
	Latency      Duration        `json:"latency,omitempty"`
	ConsumeQuota bool            `json:"consume_quota,omitempty"`
	Status       int             `json:"status,omitempty"`
	Body         json.RawMessage `json:"body,omitempty"`
}

// MarshalJSON writes f with its latency as a duration string.
func (f Fault) MarshalJSON() ([]byte, error) {
	return json.Marshal(faultJSON{f.Kind, Duration(f.Latency), f.ConsumeQuota, f.Status, f.Body})
}

// UnmarshalJSON reads {"kind":..,"latency":"1s","consume_quota":..,"status":..,"body":..}.
func (f *Fault) UnmarshalJSON(b []byte) error {
	var j faultJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	*f = Fault{j.Kind, time.Duration(j.Latency), j.ConsumeQuota, j.Status, j.Body}
	return nil
}

func (f Fault) validate() error {
	switch f.Kind {
	case FaultInternal, FaultOverloaded, FaultUnavailable, FaultCapacity, FaultPrepayment, FaultLatency:
	case FaultCustom:
		if f.Status < 100 || f.Status > 599 {
			return fmt.Errorf("custom fault: status %d is not an HTTP status", f.Status)
		}
		if len(f.Body) > 0 && !json.Valid(f.Body) {
			return errors.New("custom fault: body is not JSON")
		}
	default:
		return fmt.Errorf("unknown fault kind %q (want internal, overloaded, unavailable, capacity, prepayment, latency or custom)", f.Kind)
	}
	if f.Latency < 0 {
		return errors.New("latency must not be negative")
	}
	return nil
}

// FaultRule applies a Fault to some requests.
type FaultRule struct {
	Fault Fault
	// Count > 0: the first Count matching requests, then the rule is spent.
	// Every > 0: every Every-th matching request (1: all). Neither: every
	// matching request. Not both.
	Count int
	Every int
	// Method, Model and Key narrow the matching requests; empty matches
	// any. Method is one of the Method* constants; empty means the two
	// generation methods (generateContent, streamGenerateContent).
	Method string
	Model  string
	Key    string
}

// ruleJSON is the flat JSON form of a FaultRule.
type ruleJSON struct {
	faultJSON
	Count  int    `json:"count,omitempty"`
	Every  int    `json:"every,omitempty"`
	Method string `json:"method,omitempty"`
	Model  string `json:"model,omitempty"`
	Key    string `json:"key,omitempty"`
}

// MarshalJSON writes r flat: the fault's fields next to count, every,
// method, model and key.
func (r FaultRule) MarshalJSON() ([]byte, error) {
	f := r.Fault
	return json.Marshal(ruleJSON{faultJSON{f.Kind, Duration(f.Latency), f.ConsumeQuota, f.Status, f.Body},
		r.Count, r.Every, r.Method, r.Model, r.Key})
}

// UnmarshalJSON reads the flat form, e.g. {"kind":"capacity","every":5,"model":"m"};
// unknown fields are errors.
func (r *FaultRule) UnmarshalJSON(b []byte) error {
	var j ruleJSON
	if err := decodeStrict(b, &j); err != nil {
		return err
	}
	*r = FaultRule{
		Fault: Fault{j.Kind, time.Duration(j.Latency), j.ConsumeQuota, j.Status, j.Body},
		Count: j.Count, Every: j.Every, Method: j.Method, Model: j.Model, Key: j.Key,
	}
	return nil
}

func (r FaultRule) validate(models map[string]bool) error {
	if err := r.Fault.validate(); err != nil {
		return err
	}
	if r.Count < 0 || r.Every < 0 {
		return errors.New("count and every must not be negative")
	}
	if r.Count > 0 && r.Every > 0 {
		return errors.New("set count or every, not both")
	}
	switch r.Method {
	case "", MethodGenerate, MethodStream, MethodCountTokens, MethodListModels, MethodGetModel:
	default:
		return fmt.Errorf("unknown method %q", r.Method)
	}
	if r.Model != "" && models != nil && !models[r.Model] {
		return fmt.Errorf("unknown model %q", r.Model)
	}
	return nil
}

// matches reports whether the rule applies to a request of the method,
// model and key.
func (r *FaultRule) matches(q Request) bool {
	switch {
	case r.Method == "" && q.Method != MethodGenerate && q.Method != MethodStream:
		return false
	case r.Method != "" && r.Method != q.Method:
		return false
	case r.Model != "" && r.Model != q.Model:
		return false
	case r.Key != "" && r.Key != q.Key:
		return false
	}
	return true
}

// ruleState is an installed FaultRule and its counters.
type ruleState struct {
	rule    FaultRule
	matched int // matching requests seen
}

// take reports the rule's fault for q, advancing its counters; nil when
// the rule does not fire.
func (s *ruleState) take(q Request) *Fault {
	r := &s.rule
	if !r.matches(q) {
		return nil
	}
	if r.Count > 0 && s.matched >= r.Count {
		return nil
	}
	s.matched++
	if r.Every > 0 && s.matched%r.Every != 0 {
		return nil
	}
	f := r.Fault
	return &f
}

// spent reports whether a Count rule will never fire again.
func (s *ruleState) spent() bool { return s.rule.Count > 0 && s.matched >= s.rule.Count }

// Request is what a fault function (Server.Fail) sees of a request.
type Request struct {
	// Seq numbers the server's requests from 1, as Record.Seq.
	Seq int
	// Time is the clock when the request arrived.
	Time time.Time
	// Method is one of the Method* constants.
	Method string
	// Key is the API key sent (known and valid: faults come after auth).
	Key string
	// Project is the key's project.
	Project string
	// Model is the model named by the path ("" for models.list).
	Model string
	// PromptTokens is the request's prompt size (0 for models.*).
	PromptTokens int
}

// InjectNext makes the next n generation requests (generateContent or
// streamGenerateContent, that pass auth and name a known model) fail with
// f. Queued injections are served before the configured rules and the
// Fail functions, in the order they were queued.
func (s *Server) InjectNext(n int, f Fault) {
	if n <= 0 {
		return
	}
	if err := f.validate(); err != nil {
		panic("fakegemini: InjectNext: " + err.Error())
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.next = append(s.next, &ruleState{rule: FaultRule{Fault: f, Count: n}})
}

// AddRule installs a fault rule after the configured ones.
func (s *Server) AddRule(r FaultRule) error {
	if err := r.validate(nil); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rules = append(s.rules, &ruleState{rule: r})
	return nil
}

// Fail installs a fault function. It is asked about every API request that
// passed auth and names a known model (models.list: any), after the
// InjectNext queue and the rules have not fired, in the order the
// functions were installed; the first non-nil Fault is used. It is called
// without the server's lock held, possibly concurrently.
func (s *Server) Fail(fn func(Request) *Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fails = append(s.fails, fn)
}

// pickFault returns the fault for q, or nil.
func (s *Server) pickFault(q Request) *Fault {
	s.mu.Lock()
	var f *Fault
	for _, r := range s.next {
		if f = r.take(q); f != nil {
			break
		}
	}
	if f == nil {
		for _, r := range s.rules {
			if f = r.take(q); f != nil {
				break
			}
		}
	}
	live := s.next[:0]
	for _, r := range s.next {
		if !r.spent() {
			live = append(live, r)
		}
	}
	clear(s.next[len(live):])
	s.next = live
	fails := s.fails
	s.mu.Unlock()
	if f != nil {
		return f
	}
	for _, fn := range fails {
		if f := fn(q); f != nil {
			if err := f.validate(); err != nil {
				panic("fakegemini: Fail function: " + err.Error())
			}
			return f
		}
	}
	return nil
}
