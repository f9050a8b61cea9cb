package sim

import (
	"fmt"
	"runtime"
	"sync"
	"time"

	"github.com/keyd/keyd/internal/fakegemini"
)

// SmokeDuration is the length of every run of the smoke suite.
const SmokeDuration = 20 * time.Minute

// Model is the model every scenario's requests are for.
const Model = "gemini-2.5-flash"

// limits of every project: RPM and TPM chosen so that both bind for the
// demand's token mix (about 2,600 tokens per request on average), RPD high
// enough not to bind except where a scenario lowers it.
var limits = Limits{RPM: 30, TPM: 80_000, RPD: 10_000}

// clients: ten with short prompts (median 600 tokens, heavy tail to
// 16,000) and two with long ones (median 10,000, up to 40,000), all asking
// at the same rate.
func clients() []ClientSpec {
	var cs []ClientSpec
	for i := range 10 {
		cs = append(cs, ClientSpec{Name: fmt.Sprintf("light-%02d", i+1), Weight: 1, TokenMedian: 600, TokenSigma: 1.0, TokenMax: 16_000})
	}
	for i := range 2 {
		cs = append(cs, ClientSpec{Name: fmt.Sprintf("heavy-%02d", i+1), Heavy: true, Weight: 1, TokenMedian: 10_000, TokenSigma: 0.4, TokenMax: 40_000})
	}
	return cs
}

func pacific(s string) time.Time {
	t, err := time.ParseInLocation(time.DateTime, s, fakegemini.Pacific)
	if err != nil {
		panic(err)
	}
	return t
}

// base is a scenario with one key per project in n projects.
func base(name string, n int, load float64, smoke bool, seed uint64) *Scenario {
	s := &Scenario{
		Name: name, Start: pacific("2026-03-10 09:00:00"), Duration: 4 * time.Hour,
		Model: Model, Projects: map[string]Limits{}, Clients: clients(), Load: load,
		Workers: 4, GiveUp: 5 * time.Minute,
		BurstEvery: 30 * time.Minute, BurstMin: 10, BurstMax: 30, BurstSpread: 10 * time.Second,
		CrashRate: 0.01, LatencyMedian: 2200 * time.Millisecond, LatencySigma: 0.4,
		Seed: seed,
	}
	if smoke {
		s.Duration = SmokeDuration
	}
	for i := range n {
		p := fmt.Sprintf("proj-%d", i+1)
		s.Projects[p] = limits
		s.Keys = append(s.Keys, KeySpec{ID: fmt.Sprintf("key-%d", i+1), Project: p})
	}
	return s
}

// Suite returns the scenarios: demand below, at and 3x above capacity;
// keys sharing projects; a daily quota running out; a key going invalid;
// and a quota cut that the configuration missed.
// smoke shortens every run to SmokeDuration (for CI).
func Suite(smoke bool) []*Scenario {
	below := base("below", 4, 0.5, smoke, 101)
	below.Title = "Demand at half the capacity"
	below.About = "4 keys, each in its own project; demand is half of what the 4 buckets allow."

	at := base("at", 4, 1.0, smoke, 102)
	at.Title = "Demand at the capacity"
	at.About = "4 keys in 4 projects; demand equals what the buckets allow per minute, with Poisson noise and bursts."

	over := base("over", 4, 3.0, smoke, 103)
	over.Title = "Demand 3x the capacity"
	over.About = "4 keys in 4 projects; demand is three times the capacity."

	shared := base("shared", 3, 3.0, smoke, 104)
	shared.Title = "Keys sharing projects, demand 3x the capacity"
	shared.About = "8 keys in 3 projects (3 + 3 + 2): keys of one project share its quota; demand is three times what the 3 buckets allow."
	shared.Keys = nil
	for i, p := range []string{"proj-1", "proj-1", "proj-1", "proj-2", "proj-2", "proj-2", "proj-3", "proj-3"} {
		shared.Keys = append(shared.Keys, KeySpec{ID: fmt.Sprintf("key-%d", i+1), Project: p})
	}

	daily := base("daily", 4, 1.0, smoke, 105)
	daily.Title = "A daily quota running out"
	daily.About = "4 keys in 4 projects with RPD 1,000; the run starts at 22:00 America/Los_Angeles, so each day's RPD runs out within the hour and resets at midnight; demand equals the per-minute capacity."
	daily.Start = pacific("2026-03-10 22:00:00")
	if smoke {
		daily.Start = pacific("2026-03-10 23:50:00")
	}
	for p := range daily.Projects {
		l := limits
		l.RPD = 1000
		if smoke {
			l.RPD = 100
		}
		daily.Projects[p] = l
	}

	invalid := base("invalid", 4, 1.0, smoke, 106)
	invalid.Title = "A key going invalid"
	invalid.About = "4 keys in 4 projects, demand at the capacity of all 4; one hour in, key-2 is deleted and answers 400 API_KEY_INVALID from then on (its project's quota is lost)."
	invalid.Keys[1].InvalidAfter = time.Hour
	if smoke {
		invalid.Keys[1].InvalidAfter = 5 * time.Minute
	}

	cut := base("cut", 4, 2.0, smoke, 107)
	cut.Title = "A quota cut the configuration missed"
	cut.About = "4 keys in 4 projects whose RPM was cut from 30 to 20 while keys.json (and every policy's configuration) still says 30; demand is twice the real capacity. Not part of the sanity checks: keyd's configuration is wrong on purpose."
	cut.Configured = cut.Projects
	cut.Projects = map[string]Limits{}
	for p, l := range cut.Configured {
		l.RPM = 20
		cut.Projects[p] = l
	}
	return []*Scenario{below, at, over, shared, daily, invalid, cut}
}

// Outcome is the results of a suite: Results[i][j] is scenario i under
// Policies[j].
type Outcome struct {
	Scenarios []*Scenario
	Traces    []*Trace
	Results   [][]*Result
}

// RunSuite runs every policy on every scenario, in parallel on up to
// GOMAXPROCS goroutines; the results do not depend on the parallelism.
func RunSuite(scenarios []*Scenario) (*Outcome, error) {
	o := &Outcome{Scenarios: scenarios, Traces: make([]*Trace, len(scenarios)), Results: make([][]*Result, len(scenarios))}
	for i, s := range scenarios {
		o.Traces[i] = s.Generate()
		o.Results[i] = make([]*Result, len(Policies))
	}
	type job struct{ i, j int }
	jobs := make(chan job)
	errs := make([]error, len(scenarios)*len(Policies))
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Go(func() {
			for jb := range jobs {
				r, err := Run(scenarios[jb.i], o.Traces[jb.i], Policies[jb.j])
				if err != nil {
					errs[jb.i*len(Policies)+jb.j] = fmt.Errorf("%s/%s: %w", scenarios[jb.i].Name, Policies[jb.j].Name, err)
					continue
				}
				o.Results[jb.i][jb.j] = r
			}
		})
	}
	// keyd's runs are the slowest: hand them out first.
	for j := range Policies {
		for i := range scenarios {
			jobs <- job{i, j}
		}
	}
	close(jobs)
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return o, nil
}
