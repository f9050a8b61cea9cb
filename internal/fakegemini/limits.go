package fakegemini

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
	_ "time/tzdata" // America/Los_Angeles without the host's zoneinfo

	"github.com/keyd/keyd/internal/gemini"
)

// Window is the length of the RPM and TPM windows: a request admitted at t
// counts in every window (u-60s, u] with t in it.
const Window = 60 * time.Second

// Pacific is America/Los_Angeles, where RPD days start at midnight.
var Pacific = mustLoad("America/Los_Angeles")

func mustLoad(name string) *time.Location {
	loc, err := time.LoadLocation(name)
	if err != nil {
		panic(err)
	}
	return loc
}

// Day is the Pacific calendar day of t, "2006-01-02": the RPD day.
func Day(t time.Time) string { return t.In(Pacific).Format(time.DateOnly) }

// dayStart is the midnight America/Los_Angeles that starts t's day.
func dayStart(t time.Time) time.Time {
	p := t.In(Pacific)
	return time.Date(p.Year(), p.Month(), p.Day(), 0, 0, 0, 0, Pacific)
}

// QuotaKind names a limit dimension in records and stats.
type QuotaKind string

// Quota kinds.
const (
	QuotaRPM  QuotaKind = "rpm"  // requests per minute
	QuotaTPM  QuotaKind = "tpm"  // input tokens per minute
	QuotaRPD  QuotaKind = "rpd"  // requests per Pacific day
	QuotaZero QuotaKind = "zero" // the model is unavailable to the tier (all limits 0)
)

// bucketKey names a (project, model) bucket.
type bucketKey struct{ project, model string }

// event is one admitted request in a bucket's 60 s window.
type event struct {
	at     time.Time
	tokens int
}

// bucket is the live state of one (project, model).
type bucket struct {
	window []event        // admitted in the last 60 s, sorted by time
	days   map[string]int // admitted per Pacific day
}

// violation is one limit a request would exceed.
type violation struct {
	kind  QuotaKind // QuotaRPM, QuotaTPM or QuotaRPD
	limit int
}

// limitsOf returns the limits and tier of (project, model).
func (s *Server) limitsOf(project string, m *Model) (Limits, Tier) {
	l, tier := m.Limits, m.Tier
	if p, ok := s.projects[project]; ok {
		if pl, ok := p.Models[m.Name]; ok {
			l = pl
		}
		if p.Tier != "" {
			tier = p.Tier
		}
	}
	if tier == "" {
		tier = Paid
	}
	return l, tier
}

// admit decides, at now, whether a request of tokens input tokens to
// (project, model) fits its limits; if it does it is counted. Otherwise it
// returns the violated limits (day, minute requests, input tokens: the
// order of the real bodies) and the retry delay. The caller holds s.mu.
func (s *Server) admit(now time.Time, k bucketKey, l Limits, tokens int) (ok bool, vs []violation, retry time.Duration) {
	if l.Unavailable {
		return false, []violation{{QuotaRPD, 0}, {QuotaRPM, 0}, {QuotaTPM, 0}}, dayRetry(now)
	}
	b := s.buckets[k]
	if b == nil {
		b = &bucket{days: map[string]int{}}
		s.buckets[k] = b
	}
	// Prune what left the window.
	cut := 0
	for cut < len(b.window) && !b.window[cut].at.After(now.Add(-Window)) {
		cut++
	}
	b.window = b.window[cut:]

	day := Day(now)
	if l.RPD > 0 && b.days[day]+1 > l.RPD {
		vs = append(vs, violation{QuotaRPD, l.RPD})
		retry = max(retry, dayRetry(now))
	}
	if l.RPM > 0 && len(b.window)+1 > l.RPM {
		vs = append(vs, violation{QuotaRPM, l.RPM})
		// The (n-RPM)th oldest must leave for one more to fit.
		leave := b.window[len(b.window)-l.RPM]
		retry = max(retry, leave.at.Add(Window).Sub(now))
	}
	if l.TPM > 0 {
		sum := 0
		for _, e := range b.window {
			sum += e.tokens
		}
		if sum+tokens > l.TPM {
			vs = append(vs, violation{QuotaTPM, l.TPM})
			d := Window // a prompt larger than TPM never fits
			if tokens <= l.TPM {
				for _, e := range b.window {
					sum -= e.tokens
					if sum+tokens <= l.TPM {
						d = e.at.Add(Window).Sub(now)
						break
					}
				}
			}
			retry = max(retry, d)
		}
	}
	if len(vs) > 0 {
		return false, vs, retry
	}
	// Keep the window sorted even if the clock stepped back.
	i := len(b.window)
	for i > 0 && b.window[i-1].at.After(now) {
		i--
	}
	b.window = slices.Insert(b.window, i, event{now, tokens})
	b.days[day]++
	old := Day(now.Add(-72 * time.Hour))
	for d := range b.days { // forget days long gone
		if d < old {
			delete(b.days, d)
		}
	}
	return true, nil, 0
}

// dayRetry is the RetryInfo of a per-day (or zero) quota. The real API
// does not send the time to the daily reset but some 20 to 60 seconds
// (the doc's captures: 22s, 38.86s, 47s); the fake sends 20 s plus the
// seconds since the Pacific midnight modulo 40 s, in [20 s, 60 s).
func dayRetry(now time.Time) time.Duration {
	return 20*time.Second + now.Sub(dayStart(now))%(40*time.Second)
}

// Quota ids and metrics of the real API.
const (
	metricPrefix = "generativelanguage.googleapis.com/"
	rateLimitURL = "https://ai.google.dev/gemini-api/docs/rate-limits"
	quotaMessage = "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: " + rateLimitURL + "."
	usageMessage = " To monitor your current usage, head to: https://ai.dev/rate-limit. "
)

// QuotaID is the quotaId the real API names the kind's limit with at a
// tier, e.g. "GenerateRequestsPerDayPerProjectPerModel-FreeTier".
func QuotaID(kind QuotaKind, tier Tier) string {
	var id string
	switch kind {
	case QuotaRPM:
		id = "GenerateRequestsPerMinutePerProjectPerModel"
	case QuotaTPM:
		id = "GenerateContentInputTokensPerModelPerMinute"
	case QuotaRPD:
		id = "GenerateRequestsPerDayPerProjectPerModel"
	default:
		return ""
	}
	if tier == Free {
		id += "-FreeTier"
	}
	return id
}

// QuotaMetric is the quotaMetric of the kind's limit at a tier. The free
// tier's and the paid per-minute requests metric are those seen in real
// bodies; the paid per-day and input-token metrics are not documented and
// are the fake's guesses ("generate_requests_per_model_per_day",
// "generate_content_paid_tier_input_token_count").
func QuotaMetric(kind QuotaKind, tier Tier) string {
	switch {
	case tier == Free && (kind == QuotaRPM || kind == QuotaRPD):
		return metricPrefix + "generate_content_free_tier_requests"
	case tier == Free && kind == QuotaTPM:
		return metricPrefix + "generate_content_free_tier_input_token_count"
	case kind == QuotaRPM:
		return metricPrefix + "generate_requests_per_model"
	case kind == QuotaRPD:
		return metricPrefix + "generate_requests_per_model_per_day"
	case kind == QuotaTPM:
		return metricPrefix + "generate_content_paid_tier_input_token_count"
	}
	return ""
}

// quotaBody is the 429 of exceeded limits.
func quotaBody(format QuotaFormat, model string, tier Tier, vs []violation, retry time.Duration) gemini.ErrorBody {
	qf := gemini.QuotaFailure{}
	var lines strings.Builder
	for _, v := range vs {
		qf.Violations = append(qf.Violations, gemini.QuotaViolation{
			QuotaMetric:     QuotaMetric(v.kind, tier),
			QuotaID:         QuotaID(v.kind, tier),
			QuotaDimensions: map[string]string{"location": "global", "model": model},
			QuotaValue:      strconv.Itoa(v.limit),
		})
		fmt.Fprintf(&lines, "\n* Quota exceeded for metric: %s, limit: %d, model: %s", QuotaMetric(v.kind, tier), v.limit, model)
	}
	help := gemini.Help{Links: []gemini.HelpLink{{Description: "Learn more about Gemini API quotas", URL: rateLimitURL}}}
	// RetryInfo carries whole seconds (the real "38s" beside "Please retry
	// in 38.863719904s."); the newer message the exact delay.
	ri := gemini.RetryInfo{RetryDelay: gemini.FormatDuration(retry.Truncate(time.Second))}
	e := gemini.ErrorDetail{Code: 429, Status: "RESOURCE_EXHAUSTED"}
	if format == QuotaNewer {
		e.Message = quotaMessage + usageMessage + lines.String() + "\nPlease retry in " + gemini.FormatDuration(retry) + "."
		e.Details = []any{help, qf, ri}
	} else {
		e.Message = quotaMessage
		e.Details = []any{qf, help, ri}
	}
	return gemini.ErrorBody{Error: e}
}

// violations checks recs, independently of the admission path, against
// the configured limits: for every (project, model), the admitted requests
// in every sliding window (t-60s, t] and on every Pacific day.
func (s *Server) violations(recs []Record) []string {
	groups := map[bucketKey][]Record{}
	var order []bucketKey
	for _, r := range recs {
		if !r.Admitted {
			continue
		}
		k := bucketKey{r.Project, r.Model}
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], r)
	}
	var out []string
	for _, k := range order {
		m, ok := s.models[k.model]
		if !ok {
			out = append(out, fmt.Sprintf("project %s, model %s: %d requests admitted for a model the fake does not serve", k.project, k.model, len(groups[k])))
			continue
		}
		l, _ := s.limitsOf(k.project, m)
		out = append(out, checkBucket(k, l, groups[k])...)
	}
	return out
}

// checkBucket checks the admitted records of one bucket against l.
func checkBucket(k bucketKey, l Limits, rs []Record) []string {
	name := fmt.Sprintf("project %s, model %s", k.project, k.model)
	if l.Unavailable {
		return []string{fmt.Sprintf("%s: %d requests admitted, but the model is unavailable (limit 0)", name, len(rs))}
	}
	rs = slices.Clone(rs)
	slices.SortStableFunc(rs, func(a, b Record) int { return a.Time.Compare(b.Time) })
	var out []string
	// Sliding windows: the fullest window ends at some request's time, so
	// checking the windows (t_i-60s, t_i] for every i suffices.
	rpmHit, tpmHit := false, false
	lo, sum := 0, 0 // rs[lo:hi] is the window; sum its tokens
	hi := 0
	for i := 0; i < len(rs); i++ {
		end := rs[i].Time
		for hi < len(rs) && !rs[hi].Time.After(end) {
			sum += rs[hi].PromptTokens
			hi++
		}
		for lo < hi && !rs[lo].Time.After(end.Add(-Window)) {
			sum -= rs[lo].PromptTokens
			lo++
		}
		n := hi - lo
		if l.RPM > 0 && n > l.RPM && !rpmHit {
			rpmHit = true
			out = append(out, fmt.Sprintf("%s: %d requests in the 60s window ending %s, over rpm %d", name, n, end.UTC().Format(time.RFC3339Nano), l.RPM))
		}
		if l.TPM > 0 && sum > l.TPM && !tpmHit {
			tpmHit = true
			out = append(out, fmt.Sprintf("%s: %d input tokens in the 60s window ending %s, over tpm %d", name, sum, end.UTC().Format(time.RFC3339Nano), l.TPM))
		}
	}
	if l.RPD > 0 {
		perDay := map[string]int{}
		var days []string
		for _, r := range rs {
			d := Day(r.Time)
			if perDay[d] == 0 {
				days = append(days, d)
			}
			perDay[d]++
		}
		for _, d := range days {
			if perDay[d] > l.RPD {
				out = append(out, fmt.Sprintf("%s: %d requests on %s (America/Los_Angeles), over rpd %d", name, perDay[d], d, l.RPD))
			}
		}
	}
	return out
}
