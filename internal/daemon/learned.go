package daemon

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/keyd/keyd/internal/config"
	"github.com/keyd/keyd/internal/gemini"
	"github.com/keyd/keyd/internal/limiter"
	"github.com/keyd/keyd/internal/store"
)

// Limits Gemini reports lower than keys.json's.
//
// A 429's quota violations carry the quota's value (quotaValue). One lower
// than the limit keys.json gives the bucket for the same dimension (rpm,
// tpm, rpd; an rpd of 0, none, is above any) means keys.json is wrong,
// most often because the project is on a lower tier than it says, and
// that keyd would keep granting more than Gemini allows and collecting
// 429s. keyd then learns the value for that bucket and quota. Several
// quotas may limit one dimension (one per model, one project-wide, ...),
// so learned limits are kept per (dimension, quota id), and the lowest of
// a dimension binds. For that bucket and dimension keyd:
//
//   - warns: a bucket warning in GET /v1/status that names the binding
//     quota, says what is wrong and the fix, logged at warn when a quota
//     first binds and when the binding value or quota changes, not on
//     every report;
//   - enforces the binding value as the bucket's limit. limiter.SetLimits
//     lowers a limit in place, keeping the window, the day count and the
//     pacer, so the bucket's promise (never more than the limit in any
//     sliding window or day) holds at the lower value at once.
//
// A later 429 of a quota sets that quota's learned value, or clears it
// when the value is no lower than keys.json's; it never touches another
// quota's. A learned limit also ends when a reload changes that
// dimension's limit in keys.json (to the reported value or to any other:
// Gemini's next 429 teaches keyd again if it is still too high), when an
// admin resets a key of the bucket (keyctl reset: the way out after a
// tier upgrade, which no 429 announces while keyd keeps to the lower
// value), and when a reload removes the bucket. A reload that leaves the
// limit as it was keeps them. They are durable, in the bucket's store
// record (putBucket), so a restart keeps them, unless keys.json's limit
// changed while keyd was stopped (restoreLearned), as for a reload.
//
// A quotaValue of 0 is not learned here: the report's quota_zero verdict
// disables the bucket.

// learnedLimit is the value Gemini reported for one quota, lower than
// keys.json's limit of its dimension.
type learnedLimit struct {
	quotaID    string // the violated quota's id, redacted by gemini.Classify; may be ""
	value      int64  // Gemini's quotaValue
	configured int64  // keys.json's limit when learned (rpd 0: none)
}

// quotaKey names a learned limit: its dimension (gemini.Quota*) and the
// id of its quota.
type quotaKey struct {
	dim, quotaID string
}

// learnedLimits are a bucket's learned limits.
type learnedLimits map[quotaKey]learnedLimit

// binding returns the learned limit of dimension dim that the bucket
// enforces: the lowest, and among equal ones the first by quota id.
func (ll learnedLimits) binding(dim string) (learnedLimit, bool) {
	var best learnedLimit
	found := false
	for k, x := range ll {
		if k.dim == dim && (!found || x.value < best.value || x.value == best.value && x.quotaID < best.quotaID) {
			best, found = x, true
		}
	}
	return best, found
}

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

// effectiveLimits are keys.json's limits l with the binding learned ones
// in their place. burst_capacity is kept at most rpm, as keys.json must.
func effectiveLimits(l config.Limits, ll learnedLimits) limiter.Limits {
	lim := limiter.Limits{RPM: l.RPM, TPM: l.TPM, RPD: l.RPD, BurstCapacity: l.BurstCapacity}
	for _, d := range []struct {
		dim string
		dst *int64
	}{{gemini.QuotaRPM, &lim.RPM}, {gemini.QuotaTPM, &lim.TPM}, {gemini.QuotaRPD, &lim.RPD}} {
		if x, ok := ll.binding(d.dim); ok && lowerThan(x.value, *d.dst) {
			*d.dst = x.value
		}
	}
	lim.BurstCapacity = min(lim.BurstCapacity, lim.RPM)
	return lim
}

// bindingChange is how the binding learned limit of one dimension of a
// bucket changed: was (when had) before, now (when has) after.
type bindingChange struct {
	dim      string
	was, now learnedLimit
	had, has bool
}

// setLearned makes ll the learned limits of bucket bid and returns the
// dimensions whose binding limit changed, in dimension order. It neither
// logs nor sets the bucket's limits. Callers hold mu.
func (p *pool) setLearned(bid config.BucketID, ll learnedLimits) []bindingChange {
	old := p.learned[bid]
	if len(ll) == 0 {
		delete(p.learned, bid)
	} else {
		p.learned[bid] = ll
	}
	if !maps.Equal(old, ll) {
		p.learnedDirty[bid] = true
	}
	var out []bindingChange
	for _, dim := range dimensions {
		was, had := old.binding(dim)
		now, has := ll.binding(dim)
		if had != has || was != now {
			out = append(out, bindingChange{dim: dim, was: was, now: now, had: had, has: has})
		}
	}
	return out
}

// logChange logs change c of bucket bid: the warning of a new binding
// limit at warn; a cleared one at info, saying why, with the value Gemini
// reported (the one it reports now, when a 429 cleared it) and attrs.
// Callers hold mu.
func (p *pool) logChange(bid config.BucketID, c bindingChange, why string, reported int64, attrs ...any) {
	if c.has {
		p.log.Warn(p.quotaWarning(bid, c.dim, c.now), "bucket", bid.String())
		return
	}
	conf := c.was.configured
	if l, ok := p.cfg.Buckets[bid]; ok {
		conf = configuredLimit(l, c.dim)
	}
	p.log.Info("quota warning cleared: "+why, append([]any{"bucket", bid.String(), "limit", c.dim,
		"keys_json", conf, "gemini_reported", reported, "quota", c.was.quotaID}, attrs...)...)
}

// limitsFor returns the limits bucket bid enforces under keys.json's
// limits l, forgetting each learned limit whose keys.json value l changes.
// Callers hold mu.
func (p *pool) limitsFor(bid config.BucketID, l config.Limits) limiter.Limits {
	ll := maps.Clone(p.learned[bid])
	maps.DeleteFunc(ll, func(k quotaKey, x learnedLimit) bool { return configuredLimit(l, k.dim) != x.configured })
	for _, c := range p.setLearned(bid, ll) {
		p.logChange(bid, c, "keys.json changed the limit", c.was.value)
	}
	return effectiveLimits(l, ll)
}

// forget clears the learned limits of bucket bid, logging each warning
// that goes with why and attrs, and returns the limits of bid under
// keys.json's l. Callers hold mu.
func (p *pool) forget(bid config.BucketID, l config.Limits, why string, attrs ...any) limiter.Limits {
	for _, c := range p.setLearned(bid, nil) {
		p.logChange(bid, c, why, c.was.value, attrs...)
	}
	return effectiveLimits(l, nil)
}

// learnQuotas compares the quota values of an upstream 429 on lease ls
// with keys.json's limits of its bucket, learns or forgets limits (see
// above), and returns what it changed in the limits the bucket enforces,
// for the report's action: "" when nothing. Callers hold mu.
func (p *pool) learnQuotas(now time.Time, ls *leaseState, v gemini.Verdict) string {
	bid, b := ls.bid, ls.bucket
	l, configured := p.cfg.Buckets[bid]
	if v.HTTPStatus != 429 || len(v.Quotas) == 0 || !configured || p.buckets[bid] != b {
		return "" // a bucket gone from keys.json has no limit to fix
	}
	// The lowest value of each quota: a 429 may list one twice.
	reported := map[quotaKey]int64{}
	var order []quotaKey
	for _, q := range v.Quotas {
		switch {
		case q.Dimension == "" || !q.HasValue || q.Value == 0: // 0: the quota_zero verdict
			continue
		case q.Model != "" && strings.TrimPrefix(q.Model, "models/") != bid.Model:
			p.log.Debug("429 names another model's quota; not compared with keys.json", "bucket", bid.String(),
				"quota", q.ID, "model", q.Model)
			continue
		}
		k := quotaKey{dim: q.Dimension, quotaID: q.ID}
		r, seen := reported[k]
		if !seen {
			order = append(order, k)
		}
		if !seen || q.Value < r {
			reported[k] = q.Value
		}
	}
	ll := maps.Clone(p.learned[bid])
	if ll == nil {
		ll = learnedLimits{}
	}
	var changed []quotaKey
	for _, k := range order {
		value, conf := reported[k], configuredLimit(l, k.dim)
		old, had := ll[k]
		switch {
		case lowerThan(value, conf):
			if had && old.value == value {
				continue // known: said once already
			}
			ll[k] = learnedLimit{quotaID: k.quotaID, value: value, configured: conf}
		case had:
			delete(ll, k)
		default:
			continue
		}
		changed = append(changed, k)
	}
	if len(changed) == 0 {
		return ""
	}
	binds := map[string]bool{} // dimensions whose binding limit changed
	var did []string
	for _, c := range p.setLearned(bid, ll) {
		binds[c.dim] = true
		conf := limitText(configuredLimit(l, c.dim))
		switch {
		case !c.has: // the binding quota's clear; it was the last
			value := reported[quotaKey{dim: c.dim, quotaID: c.was.quotaID}]
			p.logChange(bid, c, "Gemini reports a limit no lower than keys.json's", value)
			did = append(did, fmt.Sprintf("%s back to keys.json's %s (Gemini reports %d)", c.dim, conf, value))
		case c.had && c.was.value == c.now.value:
			p.logChange(bid, c, "", 0) // the same limit, from another quota
		default:
			p.logChange(bid, c, "", 0)
			did = append(did, fmt.Sprintf("%s limited to %d as Gemini reports (keys.json says %s)", c.dim, c.now.value, conf))
		}
	}
	// A quota that does not bind changes nothing keyd does; said at info.
	for _, k := range changed {
		if binds[k.dim] {
			continue
		}
		x, ok := ll[k]
		bound, _ := ll.binding(k.dim)
		if ok {
			p.log.Info("quota lower than keys.json's noted; another quota's lower limit binds", "bucket", bid.String(),
				"limit", k.dim, "quota", k.quotaID, "gemini_reported", x.value, "keys_json", x.configured,
				"enforced", bound.value, "enforced_quota", bound.quotaID)
		} else {
			p.log.Info("quota no longer lower than keys.json's; another quota's lower limit still binds", "bucket", bid.String(),
				"limit", k.dim, "quota", k.quotaID, "gemini_reported", reported[k], "enforced", bound.value, "enforced_quota", bound.quotaID)
		}
	}
	if len(binds) > 0 {
		b.SetLimits(effectiveLimits(l, p.learned[bid]), now)
	}
	if len(did) == 0 {
		return ""
	}
	return "; " + strings.Join(did, "; ")
}

// quotaWarning says what is wrong with keys.json's limit dim of bucket
// bid, learned as x, how to fix it, and how to forget it. Callers hold mu.
func (p *pool) quotaWarning(bid config.BucketID, dim string, x learnedLimit) string {
	quota := ""
	if x.quotaID != "" {
		quota = " (quota " + x.quotaID + ")"
	}
	set := fmt.Sprintf("%q: %d", dim, x.value)
	if l, ok := p.cfg.Buckets[bid]; ok && dim == gemini.QuotaRPM && l.BurstCapacity > x.value {
		// keys.json rejects a burst_capacity above rpm.
		set += fmt.Sprintf(" and %q: %d or less", "burst_capacity", x.value)
	}
	keys, reset := "", ""
	if ids := p.bucketKeys(bid); len(ids) > 0 {
		keys = " (" + listIDs(ids, 6) + ")"
		reset = " (keyctl reset " + ids[0] + " forgets it)"
	}
	return fmt.Sprintf("project %s model %s: Gemini reports %s %d%s, keys.json says %s: set %s for its keys%s; keyd enforces %d until then%s",
		bid.Project, bid.Model, dim, x.value, quota, limitText(x.configured), set, keys, x.value, reset)
}

// bucketWarnings are the warnings of bucket bid, one per dimension with a
// learned limit, naming the binding one, in dimension order; nil when it
// has none. Callers hold mu.
func (p *pool) bucketWarnings(bid config.BucketID) []string {
	ll := p.learned[bid]
	var out []string
	for _, dim := range dimensions {
		if x, ok := ll.binding(dim); ok {
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

// learnedRecord is the durable form of bucket bid's learned limits, in
// dimension order, then by quota id; nil when it has none. Callers hold
// mu.
func (p *pool) learnedRecord(bid config.BucketID) []store.LearnedLimit {
	ll := p.learned[bid]
	if len(ll) == 0 {
		return nil
	}
	out := make([]store.LearnedLimit, 0, len(ll))
	for k, x := range ll {
		out = append(out, store.LearnedLimit{Limit: k.dim, Quota: k.quotaID, Value: x.value, Configured: x.configured})
	}
	slices.SortFunc(out, func(a, b store.LearnedLimit) int {
		return cmp.Or(cmp.Compare(slices.Index(dimensions, a.Limit), slices.Index(dimensions, b.Limit)), strings.Compare(a.Quota, b.Quota))
	})
	return out
}

// restoreLearned brings back, at start, the learned limits of bucket bid
// (b) from its record: each one whose keys.json limit is still the one it
// was learned under (a restart under another value forgets it, as a
// reload does). It enforces them, logs the warning of each that binds as
// when it was learned, and adds the record to batch again if it dropped
// any. Callers hold mu.
func (p *pool) restoreLearned(bid config.BucketID, b *limiter.Bucket, recs []store.LearnedLimit, now time.Time, batch *store.Batch) {
	if len(recs) == 0 {
		return
	}
	l, configured := p.cfg.Buckets[bid]
	ll := learnedLimits{}
	for _, r := range recs {
		if configured && slices.Contains(dimensions, r.Limit) && r.Value > 0 &&
			configuredLimit(l, r.Limit) == r.Configured && lowerThan(r.Value, r.Configured) {
			ll[quotaKey{dim: r.Limit, quotaID: r.Quota}] = learnedLimit{quotaID: r.Quota, value: r.Value, configured: r.Configured}
		}
	}
	for _, c := range p.setLearned(bid, ll) {
		p.logChange(bid, c, "", 0)
	}
	if len(ll) < len(recs) {
		p.log.Info("learned limits forgotten at start: keys.json changed them", "bucket", bid.String(),
			"kept", len(ll), "forgotten", len(recs)-len(ll))
		p.putBucket(batch, bid, b.Penalty(now))
	} else {
		delete(p.learnedDirty, bid)
	}
	if configured {
		b.SetLimits(effectiveLimits(l, ll), now)
	}
}
