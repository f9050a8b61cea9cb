package daemon

import (
	"time"

	"github.com/keyd/keyd/api"
)

// reportedLeases remembers, for every lease reported in the last
// reportRetention, the answer its report got: what a repeated report
// answers (with Duplicate set), and all that keyd keeps of a reported
// lease. At a sustained 1,000 reports/s that is 600,000 answers, so each
// is small and the garbage collector need not look inside them: a 16-byte
// key (the lease ID in binary) and a 16-byte value without pointers, the
// key ID and classification as indices into a table of the distinct ones
// (50 to 80 bytes of heap per answer with the map's slack; see
// BenchmarkRetainedLeaseMemory). The few answers with an action (a
// penalty's, say) keep that text in a side map.
//
// Answers are kept in generations, each taking the reports of
// reportGenSpan: a whole generation is dropped once its newest answer is
// older than reportRetention, which gives its memory back (a Go map never
// shrinks) and costs no per-answer bookkeeping. An answer is found up to
// reportRetention after its report, exactly, and stays in memory up to
// reportGenSpan longer.
//
// The zero value is empty and ready. Callers hold pool.mu.
type reportedLeases struct {
	gens  []*reportGen      // oldest first; the last one takes new answers
	names []string          // the key IDs and classifications of answers
	index map[string]uint32 // a name's index in names
}

// reportGenSpan is how long a generation takes new answers, from its
// first.
const reportGenSpan = reportRetention / 4

// reportGen is the answers of the reports of one span of time.
type reportGen struct {
	first, last int64 // earliest and latest report time held, Unix ns
	answers     map[leaseKey]answer
	actions     map[leaseKey]string // the non-empty actions; nil until one
}

// answer is a report's answer, without the lease ID and the action.
type answer struct {
	at    int64  // report time, Unix ns
	keyID uint32 // index in reportedLeases.names
	class uint32 // index in reportedLeases.names
}

// leaseKey is a lease ID of the form newLeaseID makes ("l" and 32
// lowercase hex digits) as the 16 bytes it encodes.
type leaseKey [16]byte

// parseLeaseKey returns the key of id, or false when id is not of
// newLeaseID's form (no lease of keyd has such an ID).
func parseLeaseKey(id string) (k leaseKey, ok bool) {
	if len(id) != 1+2*len(k) || id[0] != 'l' {
		return k, false
	}
	for i := range k {
		hi, ok1 := unhex(id[1+2*i])
		lo, ok2 := unhex(id[2+2*i])
		if !ok1 || !ok2 {
			return k, false
		}
		k[i] = hi<<4 | lo
	}
	return k, true
}

// unhex decodes one lowercase hex digit. Upper case is refused, so that
// one key has one ID.
func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	}
	return 0, false
}

// add remembers the answer to the report of lease id made at `at`. An ID
// not of keyd's form (never granted by keyd) is not remembered.
func (r *reportedLeases) add(id string, at time.Time, keyID, class, action string) {
	k, ok := parseLeaseKey(id)
	if !ok {
		return
	}
	ns := at.UnixNano()
	var g *reportGen
	if n := len(r.gens); n > 0 && ns-r.gens[n-1].first < int64(reportGenSpan) {
		g = r.gens[n-1]
	} else {
		g = &reportGen{first: ns, last: ns, answers: map[leaseKey]answer{}}
		r.gens = append(r.gens, g)
	}
	g.first, g.last = min(g.first, ns), max(g.last, ns)
	g.answers[k] = answer{at: ns, keyID: r.intern(keyID), class: r.intern(class)}
	if action != "" {
		if g.actions == nil {
			g.actions = map[leaseKey]string{}
		}
		g.actions[k] = action
	}
}

// intern returns the index of name in r.names, adding it if new. The
// names are the key IDs and the classifications: a few, however many
// answers.
func (r *reportedLeases) intern(name string) uint32 {
	if i, ok := r.index[name]; ok {
		return i
	}
	if r.index == nil {
		r.index = map[string]uint32{}
	}
	i := uint32(len(r.names))
	r.names = append(r.names, name)
	r.index[name] = i
	return i
}

// find returns the answer to a repeated report of lease id at now, if
// its first report was at most reportRetention before now.
func (r *reportedLeases) find(id string, now time.Time) (*api.ReportResponse, bool) {
	k, ok := parseLeaseKey(id)
	if !ok {
		return nil, false
	}
	for i := len(r.gens) - 1; i >= 0; i-- {
		g := r.gens[i]
		a, ok := g.answers[k]
		if !ok {
			continue
		}
		if now.UnixNano()-a.at > int64(reportRetention) {
			return nil, false
		}
		return &api.ReportResponse{LeaseID: id, KeyID: r.names[a.keyID], Classification: r.names[a.class],
			Action: g.actions[k], Duplicate: true}, true
	}
	return nil, false
}

// forget drops the generations whose every answer was reported more than
// reportRetention before now.
func (r *reportedLeases) forget(now time.Time) {
	cut := 0
	for cut < len(r.gens) && now.UnixNano()-r.gens[cut].last > int64(reportRetention) {
		cut++
	}
	if cut > 0 {
		r.gens = append(r.gens[:0], r.gens[cut:]...)
	}
}
