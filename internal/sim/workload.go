package sim

import (
	"math"
	"math/rand/v2"
	"slices"
	"time"
)

// Scenario is one world and its demand: projects and their limits, keys,
// clients, and how much they ask for.
type Scenario struct {
	// Name is short and stable (used in file names and tests); Title and
	// About describe it in the report.
	Name, Title, About string
	// Start is the virtual time the run starts at; Duration its length.
	Start    time.Time
	Duration time.Duration
	// Model is the one model every request is for.
	Model string
	// Projects maps each project to its limits; Keys lists the keys in
	// keys.json order.
	Projects map[string]Limits
	Keys     []KeySpec
	// Configured, when set, is what the operator wrote down for each
	// project instead of Projects (the provider's real limits): a quota
	// cut the configuration has not caught up with.
	Configured map[string]Limits
	// Clients issue the requests; Load is the offered demand as a multiple
	// of the per-minute capacity (RPM and TPM over every project, in
	// requests of the demand's token mix). RPD is on top.
	Clients []ClientSpec
	Load    float64
	// Workers is how many requests one client has in progress at most;
	// the others wait in its own FIFO queue.
	Workers int
	// GiveUp is how long after arriving a request is abandoned if it has
	// not been sent successfully.
	GiveUp time.Duration
	// BurstEvery is the mean time between one client's bursts, of
	// BurstMin..BurstMax requests arriving within BurstSpread; zero: none.
	BurstEvery         time.Duration
	BurstMin, BurstMax int
	BurstSpread        time.Duration
	// CrashRate is the share of requests whose client dies once it holds
	// a key, half of them before sending, without reporting.
	CrashRate float64
	// LatencyMedian and LatencySigma shape the lognormal latency of a
	// successful call (an error answers in 300 ms).
	LatencyMedian time.Duration
	LatencySigma  float64
	Seed          uint64
	LeaseTTL      time.Duration // keyd's lease_ttl; zero: keyd's default
}

// KeySpec is one API key.
type KeySpec struct {
	ID, Project string
	// InvalidAfter, when positive, is when (after Start) the key starts
	// answering 400 API_KEY_INVALID.
	InvalidAfter time.Duration
}

// ClientSpec is one client: its share of the demand and its prompts'
// sizes, lognormal with median TokenMedian and shape TokenSigma, capped at
// TokenMax.
type ClientSpec struct {
	Name        string
	Heavy       bool // a client of large prompts (reported apart)
	Weight      float64
	TokenMedian float64
	TokenSigma  float64
	TokenMax    int64
}

// Request is one request of a trace. Traces are immutable: every policy
// runs the same one.
type Request struct {
	ID     int
	Client int
	Arrive time.Duration // since Start
	Tokens int64         // input tokens, as countTokens would say
	// Crash: the client dies once it holds a key, without reporting;
	// CrashBeforeSend: before sending (else just after).
	Crash, CrashBeforeSend bool
	// Latency of the successful call.
	Latency time.Duration
}

// Trace is a scenario's demand.
type Trace struct {
	Requests []Request
	// MeanTokens is the mean prompt size of the demand's mix.
	MeanTokens float64
	// PerMinute is the per-minute capacity in requests of that mix.
	PerMinute float64
}

// tokens draws one prompt size of c.
func (c *ClientSpec) tokens(r *rand.Rand) int64 {
	t := int64(math.Round(math.Exp(math.Log(c.TokenMedian) + c.TokenSigma*r.NormFloat64())))
	return min(max(t, 1), c.TokenMax)
}

// meanTokens estimates the mean prompt size of the demand's mix by
// sampling, with its own stream so that the trace does not depend on it.
func (s *Scenario) meanTokens() float64 {
	r := rand.New(rand.NewPCG(s.Seed, 1))
	var sum, weights float64
	for i := range s.Clients {
		c := &s.Clients[i]
		const n = 20000
		var t float64
		for range n {
			t += float64(c.tokens(r))
		}
		sum += c.Weight * t / n
		weights += c.Weight
	}
	return sum / weights
}

// Generate builds the scenario's trace, deterministically from Seed:
// Poisson arrivals per client plus Poisson bursts, skewed prompt sizes,
// lognormal latencies, and crashes.
func (s *Scenario) Generate() *Trace {
	tr := &Trace{MeanTokens: s.meanTokens()}
	for _, l := range s.Projects {
		tr.PerMinute += min(float64(l.RPM), float64(l.TPM)/tr.MeanTokens)
	}
	r := rand.New(rand.NewPCG(s.Seed, 2))
	var weights float64
	for _, c := range s.Clients {
		weights += c.Weight
	}
	perSecond := s.Load * tr.PerMinute / 60
	var reqs []Request
	add := func(client int, at time.Duration) {
		c := &s.Clients[client]
		q := Request{Client: client, Arrive: at, Tokens: c.tokens(r)}
		q.Crash = r.Float64() < s.CrashRate
		q.CrashBeforeSend = q.Crash && r.Float64() < 0.5
		lat := math.Exp(math.Log(s.LatencyMedian.Seconds()) + s.LatencySigma*r.NormFloat64())
		q.Latency = time.Duration(min(max(lat, 0.3), 60) * float64(time.Second))
		reqs = append(reqs, q)
	}
	for i, c := range s.Clients {
		rate := perSecond * c.Weight / weights // requests per second, bursts included
		var burstRate float64                  // bursts per second
		if s.BurstEvery > 0 {
			burstRate = 1 / s.BurstEvery.Seconds()
			mean := float64(s.BurstMin+s.BurstMax) / 2
			if burstRate*mean > rate/2 { // bursts at most half the demand
				burstRate = rate / 2 / mean
			}
			rate -= burstRate * mean
			for t := r.ExpFloat64() / burstRate; t < s.Duration.Seconds(); t += r.ExpFloat64() / burstRate {
				n := s.BurstMin + r.IntN(s.BurstMax-s.BurstMin+1)
				for range n {
					at := t + r.Float64()*s.BurstSpread.Seconds()
					if at < s.Duration.Seconds() {
						add(i, time.Duration(at*float64(time.Second)))
					}
				}
			}
		}
		for t := r.ExpFloat64() / rate; t < s.Duration.Seconds(); t += r.ExpFloat64() / rate {
			add(i, time.Duration(t*float64(time.Second)))
		}
	}
	slices.SortStableFunc(reqs, func(a, b Request) int {
		if a.Arrive != b.Arrive {
			return int(a.Arrive - b.Arrive)
		}
		return a.Client - b.Client
	})
	for i := range reqs {
		reqs[i].ID = i
	}
	tr.Requests = reqs
	return tr
}

// jitter is a deterministic number in [0, 1) for (id, n), so that client
// back-off jitter is the same whatever the order the policies ask in.
func jitter(id, n int) float64 {
	x := uint64(id)*0x9E3779B97F4A7C15 + uint64(n)*0xBF58476D1CE4E5B9 + 0x94D049BB133111EB
	x ^= x >> 30
	x *= 0xBF58476D1CE4E5B9
	x ^= x >> 27
	x *= 0x94D049BB133111EB
	x ^= x >> 31
	return float64(x>>11) / (1 << 53)
}
