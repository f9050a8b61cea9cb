package fakegemini

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/keyd/keyd/internal/gemini"
)

// API methods, as in Record.Method and FaultRule.Method.
const (
	MethodGenerate    = "generateContent"
	MethodStream      = "streamGenerateContent"
	MethodCountTokens = "countTokens"
	MethodListModels  = "models.list"
	MethodGetModel    = "models.get"
)

// MaxBodyBytes is the largest request body accepted (the real API's
// request size limit, 20 MB).
const MaxBodyBytes = 20 << 20

// Server is the fake Gemini API. It is an http.Handler; serve it with
// httptest.NewServer or http.Server. All its methods are safe for
// concurrent use.
type Server struct {
	clock      func() time.Time
	latency    time.Duration
	format     QuotaFormat
	pageSize   int
	keys       map[string]Key
	models     map[string]*Model
	modelOrder []*Model
	projects   map[string]Project

	mu      sync.Mutex
	offset  time.Duration // added to clock by Advance
	seq     int
	buckets map[bucketKey]*bucket
	records []*Record
	next    []*ruleState // InjectNext queue
	rules   []*ruleState // Config.Faults, AddRule
	fails   []func(Request) *Fault
}

// New returns a fake serving cfg. It panics if cfg is not valid (see
// Config.Validate): it is meant for tests and a command that validated
// its configuration first.
func New(cfg Config) *Server {
	if err := cfg.Validate(); err != nil {
		panic("fakegemini: invalid config: " + err.Error())
	}
	s := &Server{
		clock:    cfg.Clock,
		latency:  cfg.Latency,
		format:   cfg.QuotaFormat,
		pageSize: cfg.PageSize,
		keys:     map[string]Key{},
		models:   map[string]*Model{},
		projects: map[string]Project{},
		buckets:  map[bucketKey]*bucket{},
	}
	if s.clock == nil {
		s.clock = time.Now
	}
	if s.format == "" {
		s.format = QuotaClassic
	}
	if s.pageSize == 0 {
		s.pageSize = DefaultPageSize
	}
	for _, k := range cfg.Keys {
		if k.Project == "" {
			k.Project = k.Key
		}
		if k.State == "" {
			k.State = KeyOK
		}
		s.keys[k.Key] = k
	}
	for _, m := range cfg.Models {
		m := m
		if m.DisplayName == "" {
			m.DisplayName = displayName(m.Name)
		}
		if m.InputTokenLimit == 0 {
			m.InputTokenLimit = DefaultInputTokenLimit
		}
		if m.OutputTokenLimit == 0 {
			m.OutputTokenLimit = DefaultOutputTokenLimit
		}
		if m.OutputTokens == 0 {
			m.OutputTokens = DefaultOutputTokens
		}
		if m.StreamChunks == 0 {
			m.StreamChunks = DefaultStreamChunks
		}
		s.models[m.Name] = &m
		s.modelOrder = append(s.modelOrder, &m)
	}
	for _, p := range cfg.Projects {
		s.projects[p.Name] = p
	}
	for _, r := range cfg.Faults {
		s.rules = append(s.rules, &ruleState{rule: r})
	}
	return s
}

// displayName turns "gemini-2.5-flash" into "Gemini 2.5 Flash".
func displayName(name string) string {
	words := strings.Split(name, "-")
	for i, w := range words {
		if w != "" {
			words[i] = strings.ToUpper(w[:1]) + w[1:]
		}
	}
	return strings.Join(words, " ")
}

// Now is the fake's current time: Config.Clock plus what Advance added.
func (s *Server) Now() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.nowLocked()
}

func (s *Server) nowLocked() time.Time { return s.clock().Add(s.offset) }

// Advance moves the fake's clock forward by d (backward if d < 0, which
// windows do not undo).
func (s *Server) Advance(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.offset += d
}

// Reset forgets every record, window and day count, and the InjectNext
// queue. Rules, Fail functions and the clock offset stay.
func (s *Server) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seq = 0
	s.records = nil
	s.buckets = map[bucketKey]*bucket{}
	s.next = nil
}

// ServeHTTP serves the API under /v1beta/ (and /v1/) and the admin
// endpoints under /_fake/ (see AdminHandler).
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if strings.HasPrefix(r.URL.Path, "/_fake/") {
		s.AdminHandler().ServeHTTP(w, r)
		return
	}
	var version, rest string
	for _, v := range []string{"v1beta", "v1"} {
		if after, ok := strings.CutPrefix(r.URL.Path, "/"+v+"/"); ok {
			version, rest = v, after
			break
		}
	}
	switch {
	case version == "":
	case rest == "models" && r.Method == http.MethodGet:
		s.serve(w, r, MethodListModels, "", version)
		return
	case strings.HasPrefix(rest, "models/"):
		name := strings.TrimPrefix(rest, "models/")
		if i := strings.LastIndexByte(name, ':'); i >= 0 {
			method := name[i+1:]
			switch method {
			case MethodGenerate, MethodStream, MethodCountTokens:
				if r.Method == http.MethodPost {
					s.serve(w, r, method, name[:i], version)
					return
				}
			}
		} else if r.Method == http.MethodGet && name != "" && !strings.Contains(name, "/") {
			s.serve(w, r, MethodGetModel, name, version)
			return
		}
	}
	writeError(w, errorBody(http.StatusNotFound, "NOT_FOUND",
		fmt.Sprintf("The requested URL %s was not found on this server.", r.URL.Path)))
}

// exchange is one API request in flight.
type exchange struct {
	s       *Server
	w       http.ResponseWriter
	r       *http.Request
	rec     *Record
	method  string
	version string
}

// finish sets the record's outcome.
func (x *exchange) finish(status int, update func(*Record)) {
	x.s.mu.Lock()
	defer x.s.mu.Unlock()
	x.rec.Status = status
	if update != nil {
		update(x.rec)
	}
}

func (x *exchange) fail(b gemini.ErrorBody, update func(*Record)) {
	x.finish(b.Error.Code, func(r *Record) {
		r.Error = b.Error.Status
		if update != nil {
			update(r)
		}
	})
	writeError(x.w, b)
}

// serve runs one API request: record, auth, model, body, fault, limits,
// latency, answer.
func (s *Server) serve(w http.ResponseWriter, r *http.Request, method, model, version string) {
	key := r.Header.Get("x-goog-api-key")
	if key == "" {
		key = r.URL.Query().Get("key")
	}
	s.mu.Lock()
	s.seq++
	rec := &Record{Seq: s.seq, Time: s.nowLocked(), Method: method, Key: key, Model: model}
	s.records = append(s.records, rec)
	s.mu.Unlock()
	x := &exchange{s: s, w: w, r: r, rec: rec, method: method, version: version}

	// Auth comes first, as in the real API.
	k, ok := s.keys[key]
	switch {
	case key == "":
		x.fail(errorBody(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API."), nil)
		return
	case !ok || k.State == KeyInvalid:
		x.fail(keyInvalidBody("API key not valid. Please pass a valid API key."), nil)
		return
	case k.State == KeyNotFound:
		x.fail(keyInvalidBody("API Key not found. Please pass a valid API key."), nil)
		return
	case k.State == KeyLeaked:
		x.fail(errorBody(403, "PERMISSION_DENIED", "Your API key was reported as leaked. Please use another API key."), withProject(k.Project))
		return
	case k.State == KeySuspended:
		x.fail(s.suspendedBody(k), withProject(k.Project))
		return
	}
	s.mu.Lock()
	rec.Project = k.Project
	s.mu.Unlock()

	var m *Model
	if method != MethodListModels {
		if m = s.models[model]; m == nil {
			verb := method
			if method == MethodGetModel {
				verb = "get"
			}
			x.fail(errorBody(404, "NOT_FOUND", fmt.Sprintf("models/%s is not found for API version %s, or is not supported for %s. Call ListModels to see the list of available models and their supported methods.", model, version, verb)), nil)
			return
		}
	}

	switch method {
	case MethodListModels, MethodGetModel:
		if !x.delay(s.pickFault(x.request(0))) {
			return
		}
		if method == MethodListModels {
			x.listModels()
		} else {
			x.finish(200, nil)
			writeJSON(w, 200, modelJSON(m, version))
		}
		return
	}

	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxBodyBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			x.fail(errorBody(400, "INVALID_ARGUMENT", fmt.Sprintf("Request payload size exceeds the limit: %d bytes.", MaxBodyBytes)), nil)
		} else {
			x.finish(499, func(r *Record) { r.Error = "CANCELLED" })
		}
		return
	}
	if method == MethodCountTokens {
		x.countTokens(m, body)
		return
	}
	x.generate(m, k, body)
}

func withProject(p string) func(*Record) { return func(r *Record) { r.Project = p } }

// request is what fault rules see.
func (x *exchange) request(prompt int) Request {
	x.s.mu.Lock()
	defer x.s.mu.Unlock()
	return Request{Seq: x.rec.Seq, Time: x.rec.Time, Method: x.method, Key: x.rec.Key,
		Project: x.rec.Project, Model: x.rec.Model, PromptTokens: prompt}
}

// delay applies Config.Latency and a fault's latency, then a fault's error.
// It reports whether the request goes on to be served.
func (x *exchange) delay(f *Fault) bool {
	d := x.s.latency
	if f != nil {
		d += f.Latency
	}
	if d > 0 && !sleepCtx(x.r.Context(), d) {
		x.finish(499, func(r *Record) {
			r.Error = "CANCELLED"
			if f != nil {
				r.Fault = f.Kind
			}
		})
		return false
	}
	if f == nil || f.Kind == FaultLatency {
		if f != nil {
			x.s.mu.Lock()
			x.rec.Fault = f.Kind
			x.s.mu.Unlock()
		}
		return true
	}
	if f.Kind == FaultCustom {
		x.finish(f.Status, func(r *Record) { r.Fault = f.Kind })
		x.w.Header().Set("Content-Type", "application/json; charset=UTF-8")
		x.w.WriteHeader(f.Status)
		_, _ = x.w.Write(f.Body)
		return false
	}
	x.fail(faultBody(f.Kind), func(r *Record) { r.Fault = f.Kind })
	return false
}

// faultBody is the literal body of an error fault.
func faultBody(k FaultKind) gemini.ErrorBody {
	switch k {
	case FaultInternal:
		return errorBody(500, "INTERNAL", "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting")
	case FaultOverloaded:
		return errorBody(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
	case FaultUnavailable:
		return errorBody(503, "UNAVAILABLE", "The service is currently unavailable.")
	case FaultCapacity:
		return errorBody(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota).")
	case FaultPrepayment:
		return errorBody(429, "RESOURCE_EXHAUSTED", "Your prepayment credits are depleted. Please go to AI Studio at https://ai.studio/projects to manage your project and billing...")
	}
	panic("fakegemini: no body for fault " + string(k))
}

func errorBody(code int, status, msg string) gemini.ErrorBody {
	return gemini.ErrorBody{Error: gemini.ErrorDetail{Code: code, Message: msg, Status: status}}
}

func keyInvalidBody(msg string) gemini.ErrorBody {
	b := errorBody(400, "INVALID_ARGUMENT", msg)
	b.Error.Details = []any{
		gemini.ErrorInfo{Reason: "API_KEY_INVALID", Domain: "googleapis.com",
			Metadata: map[string]string{"service": "generativelanguage.googleapis.com"}},
		gemini.LocalizedMessage{Locale: "en-US", Message: msg},
	}
	return b
}

func (s *Server) suspendedBody(k Key) gemini.ErrorBody {
	b := errorBody(403, "PERMISSION_DENIED", fmt.Sprintf("Permission denied: Consumer 'api_key:%s' has been suspended.", k.Key))
	b.Error.Details = []any{gemini.ErrorInfo{Reason: "CONSUMER_SUSPENDED", Domain: "googleapis.com",
		Metadata: map[string]string{"service": "generativelanguage.googleapis.com",
			"consumer": "projects/" + strconv.FormatInt(s.projectNumber(k.Project), 10)}}}
	return b
}

// projectNumber is the configured number of a project, else a 12-digit
// number derived from its name.
func (s *Server) projectNumber(name string) int64 {
	if p, ok := s.projects[name]; ok && p.Number != 0 {
		return p.Number
	}
	h := fnv.New64a()
	h.Write([]byte(name))
	return 100000000000 + int64(h.Sum64()%900000000000)
}

// writeError writes an error body as the real API does: indented JSON.
func writeError(w http.ResponseWriter, b gemini.ErrorBody) {
	writeJSON(w, b.Error.Code, b)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		panic("fakegemini: " + err.Error())
	}
	w.Header().Set("Content-Type", "application/json; charset=UTF-8")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// countTokens answers :countTokens. It does not count against limits (the
// real API has a separate countTokens quota, which the fake does not
// enforce).
func (x *exchange) countTokens(m *Model, body []byte) {
	var req countRequest
	if err := decodeBody(body, &req); err != nil {
		x.fail(errorBody(400, "INVALID_ARGUMENT", err.Error()), nil)
		return
	}
	g := req.GenerateContentRequest
	if g == nil {
		g = req.GenerateContentRequestSnake
	}
	var t tokens
	switch {
	case g != nil && len(req.Contents) > 0:
		x.fail(errorBody(400, "INVALID_ARGUMENT", "* CountTokensRequest: contents and generate_content_request must not both be set.\n"), nil)
		return
	case g != nil:
		if err := g.validate(); err != nil {
			x.fail(errorBody(400, "INVALID_ARGUMENT", err.Error()), nil)
			return
		}
		t = g.prompt()
	default:
		if len(req.Contents) == 0 {
			x.fail(errorBody(400, "INVALID_ARGUMENT", "* CountTokensRequest.contents: contents is not specified\n"), nil)
			return
		}
		for i := range req.Contents {
			t.addContent(&req.Contents[i])
		}
	}
	x.s.mu.Lock()
	x.rec.PromptTokens = t.total()
	x.s.mu.Unlock()
	if !x.delay(x.s.pickFault(x.request(t.total()))) {
		return
	}
	x.finish(200, nil)
	writeJSON(x.w, 200, countResponse{TotalTokens: t.total(), PromptTokensDetails: t.details()})
}

type countResponse struct {
	TotalTokens         int             `json:"totalTokens,omitempty"`
	PromptTokensDetails []modalityCount `json:"promptTokensDetails,omitempty"`
}

// Response shapes. Zero-valued fields are omitted, as by the real API.
type (
	modalityCount struct {
		Modality   string `json:"modality"`
		TokenCount int    `json:"tokenCount"`
	}
	respPart struct {
		Text string `json:"text,omitempty"`
	}
	respContent struct {
		Parts []respPart `json:"parts"`
		Role  string     `json:"role"`
	}
	candidate struct {
		Content      respContent `json:"content"`
		FinishReason string      `json:"finishReason,omitempty"`
		Index        *int        `json:"index,omitempty"`
	}
	usage struct {
		PromptTokenCount        int             `json:"promptTokenCount,omitempty"`
		CandidatesTokenCount    int             `json:"candidatesTokenCount,omitempty"`
		TotalTokenCount         int             `json:"totalTokenCount,omitempty"`
		ThoughtsTokenCount      int             `json:"thoughtsTokenCount,omitempty"`
		PromptTokensDetails     []modalityCount `json:"promptTokensDetails,omitempty"`
		CandidatesTokensDetails []modalityCount `json:"candidatesTokensDetails,omitempty"`
	}
	genResponse struct {
		Candidates    []candidate `json:"candidates"`
		UsageMetadata usage       `json:"usageMetadata"`
		ModelVersion  string      `json:"modelVersion"`
		ResponseID    string      `json:"responseId"`
	}
)

// generate answers :generateContent and :streamGenerateContent.
func (x *exchange) generate(m *Model, k Key, body []byte) {
	s := x.s
	var req generateRequest
	if err := decodeBody(body, &req); err != nil {
		x.fail(errorBody(400, "INVALID_ARGUMENT", err.Error()), nil)
		return
	}
	if err := req.validate(); err != nil {
		x.fail(errorBody(400, "INVALID_ARGUMENT", err.Error()), nil)
		return
	}
	prompt := req.prompt()
	s.mu.Lock()
	x.rec.PromptTokens = prompt.total()
	s.mu.Unlock()
	if prompt.total() > m.InputTokenLimit {
		x.fail(errorBody(400, "INVALID_ARGUMENT", fmt.Sprintf("The input token count (%d) exceeds the maximum number of tokens allowed (%d).", prompt.total(), m.InputTokenLimit)), nil)
		return
	}

	f := s.pickFault(x.request(prompt.total()))
	if f == nil || f.Kind == FaultLatency || f.ConsumeQuota {
		limits, tier := s.limitsOf(k.Project, m)
		s.mu.Lock()
		now := s.nowLocked()
		ok, vs, retry := s.admit(now, bucketKey{k.Project, m.Name}, limits, prompt.total())
		x.rec.Time = now
		x.rec.Admitted = ok
		s.mu.Unlock()
		if !ok {
			b := quotaBody(s.format, m.Name, tier, vs, retry)
			x.fail(b, func(r *Record) {
				if limits.Unavailable {
					r.Quota = []QuotaKind{QuotaZero}
				} else {
					for _, v := range vs {
						r.Quota = append(r.Quota, v.kind)
					}
				}
				for _, v := range b.Error.Details {
					if qf, ok := v.(gemini.QuotaFailure); ok {
						for _, qv := range qf.Violations {
							r.QuotaIDs = append(r.QuotaIDs, qv.QuotaID)
						}
					}
				}
				r.RetryDelay = retry
			})
			return
		}
	}
	if !x.delay(f) {
		return
	}

	// The answer.
	out := m.OutputTokens
	finish := "STOP"
	if mo := req.maxOutput(); mo > 0 && mo < out {
		out, finish = mo, "MAX_TOKENS"
	}
	thoughts := m.ThoughtsTokens
	if b, ok := req.thinkingBudget(); ok && b >= 0 {
		thoughts = min(thoughts, b)
	}
	text := []rune(answerText(req.lastUserText(), out))
	id := responseID(x.rec.Seq)
	usageAt := func(cands int) usage {
		u := usage{
			PromptTokenCount:     prompt.total(),
			CandidatesTokenCount: cands,
			TotalTokenCount:      prompt.total() + cands + thoughts,
			ThoughtsTokenCount:   thoughts,
			PromptTokensDetails:  prompt.details(),
		}
		if cands > 0 {
			u.CandidatesTokensDetails = []modalityCount{{"TEXT", cands}}
		}
		return u
	}
	x.finish(200, func(r *Record) { r.OutputTokens = out; r.ThoughtsTokens = thoughts })

	if x.method == MethodGenerate {
		zero := 0
		writeJSON(x.w, 200, genResponse{
			Candidates: []candidate{{
				Content:      respContent{Parts: []respPart{{Text: string(text)}}, Role: "model"},
				FinishReason: finish,
				Index:        &zero,
			}},
			UsageMetadata: usageAt(out),
			ModelVersion:  m.Name,
			ResponseID:    id,
		})
		return
	}

	// Stream: StreamChunks chunks (at most one per token), each with the
	// cumulative usage; the last one has the finishReason.
	n := min(m.StreamChunks, out)
	sse := x.r.URL.Query().Get("alt") == "sse"
	h := x.w.Header()
	if sse {
		h.Set("Content-Type", "text/event-stream")
	} else {
		h.Set("Content-Type", "application/json; charset=UTF-8")
	}
	x.w.WriteHeader(200)
	rc := http.NewResponseController(x.w)
	cum := 0
	for i := range n {
		size := out / n
		if i < out%n {
			size++
		}
		chunkText := string(text[4*cum : 4*(cum+size)])
		cum += size
		c := genResponse{
			Candidates:    []candidate{{Content: respContent{Parts: []respPart{{Text: chunkText}}, Role: "model"}}},
			UsageMetadata: usageAt(cum),
			ModelVersion:  m.Name,
			ResponseID:    id,
		}
		if i == n-1 {
			c.Candidates[0].FinishReason = finish
		}
		b, err := json.Marshal(c)
		if err != nil {
			panic("fakegemini: " + err.Error())
		}
		var frame string
		switch {
		case sse:
			frame = "data: " + string(b) + "\r\n\r\n"
		case i == 0:
			frame = "[" + string(b)
		default:
			frame = ",\r\n" + string(b)
		}
		if _, err := io.WriteString(x.w, frame); err != nil {
			return
		}
		_ = rc.Flush()
	}
	if !sse {
		_, _ = io.WriteString(x.w, "]")
	}
}

// responseID is a response id of the real length (23), from the request's
// sequence number.
func responseID(seq int) string {
	sum := sha256.Sum256([]byte("fakegemini-response-" + strconv.Itoa(seq)))
	return base64.RawURLEncoding.EncodeToString(sum[:])[:23]
}

// modelResource is a Model resource of models.list and models.get.
type modelResource struct {
	Name                       string   `json:"name"`
	Version                    string   `json:"version"`
	DisplayName                string   `json:"displayName"`
	Description                string   `json:"description"`
	InputTokenLimit            int      `json:"inputTokenLimit"`
	OutputTokenLimit           int      `json:"outputTokenLimit"`
	SupportedGenerationMethods []string `json:"supportedGenerationMethods"`
	Thinking                   bool     `json:"thinking,omitempty"`
}

// modelJSON is m as a Model resource.
func modelJSON(m *Model, version string) modelResource {
	return modelResource{
		Name:                       "models/" + m.Name,
		Version:                    "001",
		DisplayName:                m.DisplayName,
		Description:                "Fake " + m.DisplayName + " served by fakegemini (API " + version + ").",
		InputTokenLimit:            m.InputTokenLimit,
		OutputTokenLimit:           m.OutputTokenLimit,
		SupportedGenerationMethods: []string{"generateContent", "countTokens"},
		Thinking:                   m.ThoughtsTokens > 0,
	}
}

// listModels answers GET /v1beta/models[?pageSize=&pageToken=]. The page
// token is opaque to clients (it is the offset, base64-encoded).
func (x *exchange) listModels() {
	q := x.r.URL.Query()
	size := x.s.pageSize
	if v := q.Get("pageSize"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			x.fail(errorBody(400, "INVALID_ARGUMENT", fmt.Sprintf("Invalid value at 'page_size' (TYPE_INT32), %q", v)), nil)
			return
		}
		if n > 0 {
			size = min(n, 1000)
		}
	}
	start := 0
	if tok := q.Get("pageToken"); tok != "" {
		b, err := base64.RawURLEncoding.DecodeString(tok)
		n, err2 := strconv.Atoi(strings.TrimPrefix(string(b), "offset:"))
		if err != nil || err2 != nil || !strings.HasPrefix(string(b), "offset:") || n < 0 || n > len(x.s.modelOrder) {
			x.fail(errorBody(400, "INVALID_ARGUMENT", "Invalid page token."), nil)
			return
		}
		start = n
	}
	end := min(start+size, len(x.s.modelOrder))
	resp := struct {
		Models        []modelResource `json:"models"`
		NextPageToken string          `json:"nextPageToken,omitempty"`
	}{Models: []modelResource{}}
	for _, m := range x.s.modelOrder[start:end] {
		resp.Models = append(resp.Models, modelJSON(m, x.version))
	}
	if end < len(x.s.modelOrder) {
		resp.NextPageToken = base64.RawURLEncoding.EncodeToString([]byte("offset:" + strconv.Itoa(end)))
	}
	x.finish(200, nil)
	writeJSON(x.w, 200, resp)
}

// sleepCtx waits d or until ctx is done; it reports whether d passed.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
