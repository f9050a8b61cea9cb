package daemon

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/keyd/keyd/internal/config"
	"github.com/keyd/keyd/internal/gemini"
	"github.com/keyd/keyd/internal/limiter"
)

// Limits Gemini reports lower than keys.json's.
//
// A 429's quota violations carry the quota's value (quotaValue). One lower
// than the limit keys.json gives the bucket for the same dimension (rpm,
// tpm, rpd; an rpd of 0, none, is above any) means keys.json is wrong,
// most often because the project is on a lower tier than it says, and
// that keyd would keep granting more than Gemini allows and collecting
// 429s. keyd then, for that bucket and dimension:
//
//   - warns: a bucket warning in GET /v1/status that says what is wrong
//     and the fix, logged at warn when first seen and when the reported
//     value changes, not on every report;
//   - enforces the reported value as the bucket's limit. limiter.SetLimits
//     lowers a limit in place, keeping the window, the day count and the
//     pacer, so the bucket's promise (never more than the limit in any
//     sliding window or day) holds at the lower value at once.
//
// Both end when a reload changes that dimension's limit in keys.json (to
// the reported value or to any other: Gemini's next 429 teaches keyd again
// if it is still too high), or when a later 429 reports a value no lower
// than keys.json's (the project moved up a tier). A reload that leaves the
// limit as it was keeps them. They are kept in memory only: a restart
// forgets them, and the first 429 after it teaches them again.
//
// A quotaValue of 0 is not learned here: the report's quota_zero verdict
// disables the bucket.

// learnedLimit is one limit Gemini reported lower than keys.json's.
type learnedLimit struct {
	value      int64  // Gemini's quotaValue
	quotaID    string // the violated quota's id, redacted by gemini.Classify
	configured int64  // keys.json's limit when learned (rpd 0: none)
}

// learnedLimits are a bucket's learned limits by dimension (gemini.Quota*).
type learnedLimits map[string]learnedLimit

// dimensions lists the dimensions in the order they are shown.
var dimensions = []string{gemini.QuotaRPM, gemini.QuotaTPM, gemini.QuotaRPD}

// configuredLimit is keys.json's limit of dimension dim (rpd 0: none).
func configuredLimit(l config.Limits, dim string) int64 {
	switch dim {
	case gemini.QuotaRPM:
		return l.RPM
	case gemini.QuotaTPM:
		return l.TPM
	case gemini.QuotaRPD:
		return l.RPD
	}
	return 0
}

// lowerThan reports whether a reported value is below a configured limit;
// 0 configured is "none" (rpd), above any value.
func lowerThan(value, configured int64) bool {
	return configured == 0 || value < configured
}

// effectiveLimits are keys.json's limits l with the learned ones in their
// place. burst_capacity is kept at most rpm, as keys.json must.
func effectiveLimits(l config.Limits, ll learnedLimits) limiter.Limits {
	lim := limiter.Limits{RPM: l.RPM, TPM: l.TPM, RPD: l.RPD, BurstCapacity: l.BurstCapacity}
	if x, ok := ll[gemini.QuotaRPM]; ok {
		lim.RPM = min(lim.RPM, x.value)
	}
	if x, ok := ll[gemini.QuotaTPM]; ok {
		lim.TPM = min(lim.TPM, x.value)
	}
	if x, ok := ll[gemini.QuotaRPD]; ok && lowerThan(x.value, lim.RPD) {
		lim.RPD = x.value
	}
	lim.BurstCapacity = min(lim.BurstCapacity, lim.RPM)
	return lim
}

// limitsFor returns the limits bucket bid enforces under keys.json's
// limits l, forgetting each learned limit whose keys.json value l changes.
// Callers hold mu.
func (p *pool) limitsFor(bid config.BucketID, l config.Limits) limiter.Limits {
	ll := p.learned[bid]
	for _, dim := range dimensions {
		x, ok := ll[dim]
		if !ok {
			continue
		}
		if now := configuredLimit(l, dim); now != x.configured {
			delete(ll, dim)
			p.log.Info("quota warning cleared: keys.json changed the limit", "bucket", bid.String(), "limit", dim,
				"keys_json", now, "gemini_reported", x.value)
		}
	}
	if len(ll) == 0 {
		delete(p.learned, bid)
	}
	return effectiveLimits(l, ll)
}

// learnQuotas compares the quota values of an upstream 429 on lease ls
// with keys.json's limits of its bucket, learns or forgets limits (see
// above), and returns what it changed, for the report's action: "" when
// nothing. Callers hold mu.
func (p *pool) learnQuotas(now time.Time, ls *leaseState, v gemini.Verdict) string {
	bid, b := ls.bid, ls.bucket
	l, configured := p.cfg.Buckets[bid]
	if v.HTTPStatus != 429 || len(v.Quotas) == 0 || !configured || p.buckets[bid] != b {
		return "" // a bucket gone from keys.json has no limit to fix
	}
	// The lowest value of each dimension: several quotas may limit one.
	reported := map[string]gemini.Quota{}
	for _, q := range v.Quotas {
		switch {
		case q.Dimension == "" || !q.HasValue || q.Value == 0: // 0: the quota_zero verdict
			continue
		case q.Model != "" && strings.TrimPrefix(q.Model, "models/") != bid.Model:
			p.log.Debug("429 names another model's quota; not compared with keys.json", "bucket", bid.String(),
				"quota", q.ID, "model", q.Model)
			continue
		}
		if r, ok := reported[q.Dimension]; !ok || q.Value < r.Value {
			reported[q.Dimension] = q
		}
	}
	var did []string
	for _, dim := range dimensions {
		q, ok := reported[dim]
		if !ok {
			continue
		}
		conf := configuredLimit(l, dim)
		old, had := p.learned[bid][dim]
		switch {
		case lowerThan(q.Value, conf):
			x := learnedLimit{value: q.Value, quotaID: q.ID, configured: conf}
			if had && old.value == x.value {
				continue // known: said once already
			}
			if p.learned[bid] == nil {
				p.learned[bid] = learnedLimits{}
			}
			p.learned[bid][dim] = x
			p.log.Warn(p.quotaWarning(bid, dim, x), "bucket", bid.String())
			did = append(did, fmt.Sprintf("%s limited to %d as Gemini reports (keys.json says %s)", dim, q.Value, limitText(conf)))
		case had:
			delete(p.learned[bid], dim)
			if len(p.learned[bid]) == 0 {
				delete(p.learned, bid)
			}
			p.log.Info("quota warning cleared: Gemini reports a limit no lower than keys.json's", "bucket", bid.String(),
				"limit", dim, "keys_json", conf, "gemini_reported", q.Value, "quota", q.ID)
			did = append(did, fmt.Sprintf("%s back to keys.json's %d (Gemini reports %d)", dim, conf, q.Value))
		}
	}
	if len(did) == 0 {
		return ""
	}
	b.SetLimits(effectiveLimits(l, p.learned[bid]), now)
	return "; " + strings.Join(did, "; ")
}

// quotaWarning says what is wrong with keys.json's limit dim of bucket
// bid and how to fix it. Callers hold mu.
func (p *pool) quotaWarning(bid config.BucketID, dim string, x learnedLimit) string {
	quota := ""
	if x.quotaID != "" {
		quota = " (quota " + x.quotaID + ")"
	}
	keys := ""
	if ids := p.bucketKeys(bid); len(ids) > 0 {
		keys = " (" + listIDs(ids, 6) + ")"
	}
	return fmt.Sprintf("project %s model %s: Gemini reports %s %d%s, keys.json says %s: set %q: %d for its keys%s; keyd enforces %d until then",
		bid.Project, bid.Model, dim, x.value, quota, limitText(x.configured), dim, x.value, keys, x.value)
}

// bucketWarnings are the warnings of bucket bid, in dimension order; nil
// when it has none. Callers hold mu.
func (p *pool) bucketWarnings(bid config.BucketID) []string {
	ll := p.learned[bid]
	var out []string
	for _, dim := range dimensions {
		if x, ok := ll[dim]; ok {
			out = append(out, p.quotaWarning(bid, dim, x))
		}
	}
	return out
}

// bucketKeys lists the configured keys of bucket bid, in file order.
// Callers hold mu.
func (p *pool) bucketKeys(bid config.BucketID) []string {
	var ids []string
	for _, ks := range p.order {
		if _, ok := ks.key.Models[bid.Model]; ok && ks.key.Project == bid.Project {
			ids = append(ids, ks.key.ID)
		}
	}
	return ids
}

// listIDs joins ids with commas, at most n of them and then how many more.
func listIDs(ids []string, n int) string {
	if len(ids) <= n {
		return strings.Join(ids, ", ")
	}
	return strings.Join(ids[:n], ", ") + fmt.Sprintf(" and %d more", len(ids)-n)
}

// limitText writes a configured limit; 0 (an rpd of none) as "none".
func limitText(n int64) string {
	if n == 0 {
		return "none"
	}
	return strconv.FormatInt(n, 10)
}
