package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/config"
	"github.com/keyd/keyd/internal/store"
)

// memStore is a Store that keeps batches in memory and commits at once.
type memStore struct {
	mu      sync.Mutex
	batches []store.Batch
	fail    error
}

func (m *memStore) Commit(ctx context.Context, b *store.Batch) error { return m.Submit(b).Wait(ctx) }
func (m *memStore) Submit(b *store.Batch) *store.Pending {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fail != nil {
		return store.Done(m.fail)
	}
	m.batches = append(m.batches, *b)
	return store.Done(nil)
}
func (m *memStore) Load(time.Time, []string) (*store.State, error) { return &store.State{}, nil }
func (m *memStore) Usage(time.Time, string) ([]api.UsageRow, error) {
	return nil, nil
}
func (m *memStore) Prune(time.Time, time.Time, time.Time) error { return nil }
func (m *memStore) Close() error                                { return nil }

// testConfig parses keys.json text with every key's secret set to "AIzaTEST-<key_id>".
func testConfig(t testing.TB, keysJSON string) *config.Config {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "keys.json")
	if err := os.WriteFile(path, []byte(keysJSON), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path, config.Options{Getenv: func(k string) string {
		if id, ok := strings.CutPrefix(k, "GEMINI_KEY_"); ok && !strings.HasPrefix(id, "nosecret") {
			return "AIzaTEST-" + id
		}
		return ""
	}})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(keysJSON, "window_margin") {
		cfg.WindowMargin = 0 // exact 60 s windows keep the tests' arithmetic plain
	}
	return cfg
}

func testPool(t testing.TB, st store.Store, keysJSON string) *pool {
	t.Helper()
	p := newPool(st, time.Now, slog.New(slog.NewTextHandler(io.Discard, nil)))
	p.mu.Lock()
	p.apply(testConfig(t, keysJSON), time.Now(), &store.Batch{})
	p.mu.Unlock()
	return p
}

func mustLease(t *testing.T, p *pool, req api.LeaseRequest) *api.Lease {
	t.Helper()
	l, err := p.lease(context.Background(), &req)
	if err != nil {
		t.Fatalf("lease %+v: %v (%s)", req, err, err.Code)
	}
	return l
}

func leaseErr(t *testing.T, p *pool, req api.LeaseRequest) *api.Error {
	t.Helper()
	l, err := p.lease(context.Background(), &req)
	if err == nil {
		t.Fatalf("lease %+v: got lease on %s, want an error", req, l.KeyID)
	}
	return err
}

func mustReport(t *testing.T, p *pool, id string, rep api.ReportRequest) *api.ReportResponse {
	t.Helper()
	r, err := p.report(context.Background(), id, &rep)
	if err != nil {
		t.Fatalf("report %s: %v", id, err)
	}
	return r
}

const oneKey = `{"keys":[{"key_id":"k1","model_name":"m","rpm":2,"tpm":100000}]}`

func TestNoCapacityRetryAfterIsExact(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, oneKey)
		mustLease(t, p, api.LeaseRequest{Model: "m", Tokens: 10})
		time.Sleep(10 * time.Second)
		mustLease(t, p, api.LeaseRequest{Model: "m", Tokens: 10})
		e := leaseErr(t, p, api.LeaseRequest{Model: "m", Tokens: 10})
		if e.Code != api.CodeNoCapacity || e.HTTPStatus != http.StatusTooManyRequests {
			t.Fatalf("got %s %d, want no_capacity 429", e.Code, e.HTTPStatus)
		}
		if d, ok := e.RetryAfter(); !ok || d != 50*time.Second {
			t.Fatalf("retry after %v %v, want 50s (the first grant leaves the window)", d, ok)
		}
		if !strings.Contains(e.Message, "rpm 2/2") {
			t.Errorf("message %q does not say which limit is in the way", e.Message)
		}
		time.Sleep(50*time.Second - time.Nanosecond)
		leaseErr(t, p, api.LeaseRequest{Model: "m", Tokens: 10})
		time.Sleep(time.Nanosecond)
		mustLease(t, p, api.LeaseRequest{Model: "m", Tokens: 10})
	})
}

func TestWaitersAreServedFIFOAsSoonAsCapacityFrees(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, oneKey)
		t0 := time.Now()
		mustLease(t, p, api.LeaseRequest{Model: "m"})
		mustLease(t, p, api.LeaseRequest{Model: "m"})
		type got struct {
			n  int
			at time.Duration
		}
		var mu sync.Mutex
		var order []got
		var wg sync.WaitGroup
		for i := range 3 {
			wg.Go(func() {
				mustLease(t, p, api.LeaseRequest{Model: "m", WaitMS: 200_000})
				mu.Lock()
				order = append(order, got{i, time.Since(t0)})
				mu.Unlock()
			})
			synctest.Wait() // queued in order i
		}
		wg.Wait()
		want := []got{{0, time.Minute}, {1, time.Minute}, {2, 2 * time.Minute}}
		for i := range want {
			if order[i] != want[i] {
				t.Fatalf("grants %v, want %v", order, want)
			}
		}
	})
}

func TestWaitEndsWithNoCapacity(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, oneKey)
		mustLease(t, p, api.LeaseRequest{Model: "m"})
		mustLease(t, p, api.LeaseRequest{Model: "m"})
		start := time.Now()
		e := leaseErr(t, p, api.LeaseRequest{Model: "m", WaitMS: 5000})
		if e.Code != api.CodeNoCapacity || time.Since(start) != 5*time.Second {
			t.Fatalf("got %s after %v, want no_capacity after 5s", e.Code, time.Since(start))
		}
		if d, _ := e.RetryAfter(); d != 55*time.Second {
			t.Fatalf("retry after %v, want 55s", d)
		}
		if len(p.queues) != 0 {
			t.Fatalf("queue not emptied: %v", p.queues)
		}
	})
}

func TestCanceledWaiterLeavesTheQueue(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, oneKey)
		mustLease(t, p, api.LeaseRequest{Model: "m"})
		mustLease(t, p, api.LeaseRequest{Model: "m"})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan *api.Error)
		go func() {
			_, err := p.lease(ctx, &api.LeaseRequest{Model: "m", WaitMS: 100_000})
			done <- err
		}()
		synctest.Wait()
		cancel()
		if err := <-done; err == nil {
			t.Fatal("canceled waiter got a lease")
		}
		if len(p.queues) != 0 {
			t.Fatalf("queue not emptied: %v", p.queues)
		}
	})
}

func TestUnknownModelNamesTheConfiguredOnes(t *testing.T) {
	p := testPool(t, &memStore{}, `{"keys":[
		{"key_id":"f1","model_name":"gemini-2.0-flash","rpm":15,"tpm":1000000},
		{"key_id":"p1","model_name":"gemini-1.5-pro","rpm":60,"tpm":4000000}]}`)
	e := leaseErr(t, p, api.LeaseRequest{Model: "gemini-2.5-flash"})
	want := "model gemini-2.5-flash is not configured; configured: gemini-1.5-pro, gemini-2.0-flash (did you mean gemini-2.0-flash?)"
	if e.Code != api.CodeUnknownModel || e.Message != want {
		t.Fatalf("got %s %q\nwant unknown_model %q", e.Code, e.Message, want)
	}
}

func TestTokensAboveTPMAreRefusedAtOnce(t *testing.T) {
	p := testPool(t, &memStore{}, oneKey)
	e := leaseErr(t, p, api.LeaseRequest{Model: "m", Tokens: 100_001, WaitMS: 60_000})
	if e.Code != api.CodeTokensExceedTPM {
		t.Fatalf("got %s: %s", e.Code, e.Message)
	}
}

func TestChoiceOrder(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, `{"keys":[
			{"key_id":"low","model_name":"m","rpm":100,"tpm":100000,"priority":1},
			{"key_id":"hi_a","model_name":"m","rpm":100,"tpm":100000,"priority":5},
			{"key_id":"hi_b","model_name":"m","rpm":100,"tpm":100000,"priority":5},
			{"key_id":"hi_c","project":"shared","model_name":"m","rpm":100,"tpm":100000,"priority":5},
			{"key_id":"hi_d","project":"shared","model_name":"m","rpm":100,"tpm":100000,"priority":5}]}`)
		var got []string
		for range 8 {
			got = append(got, mustLease(t, p, api.LeaseRequest{Model: "m", Tokens: 100}).KeyID)
			time.Sleep(time.Millisecond)
		}
		// Priority 5 first, never "low"; then the most remaining capacity;
		// then the least recently used. hi_c and hi_d share one bucket: after
		// both were used (4th), hi_a and hi_b have more left (5th, 6th).
		want := "hi_a hi_b hi_c hi_d hi_a hi_b hi_c hi_a"
		if strings.Join(got, " ") != want {
			t.Fatalf("order %v\nwant  %s", got, want)
		}
	})
}

func TestWorkloadType(t *testing.T) {
	p := testPool(t, &memStore{}, `{"keys":[
		{"key_id":"a","model_name":"m","rpm":10,"tpm":1000,"workload_type":"light"},
		{"key_id":"b","model_name":"m","rpm":10,"tpm":1000,"workload_type":"heavy"}]}`)
	if k := mustLease(t, p, api.LeaseRequest{Model: "m", WorkloadType: "heavy"}).KeyID; k != "b" {
		t.Fatalf("heavy got %s", k)
	}
	e := leaseErr(t, p, api.LeaseRequest{Model: "m", WorkloadType: "batch"})
	if e.Code != api.CodeNoKeys || !strings.Contains(e.Message, "heavy, light") {
		t.Fatalf("got %s %q", e.Code, e.Message)
	}
}

func TestMaxInFlight(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, `{"lease_ttl":"30s","keys":[{"key_id":"k","model_name":"m","rpm":100,"tpm":100000,"max_in_flight":1}]}`)
		l := mustLease(t, p, api.LeaseRequest{Model: "m"})
		e := leaseErr(t, p, api.LeaseRequest{Model: "m"})
		if d, ok := e.RetryAfter(); !ok || d != 30*time.Second {
			t.Fatalf("retry after %v, want the lease's expiry (30s): %s", d, e.Message)
		}
		mustReport(t, p, l.LeaseID, api.ReportRequest{Status: 200})
		l = mustLease(t, p, api.LeaseRequest{Model: "m"})
		// An expired lease frees its slot.
		time.Sleep(30 * time.Second)
		p.mu.Lock()
		p.expire(time.Now())
		p.mu.Unlock()
		mustLease(t, p, api.LeaseRequest{Model: "m"})
		// ... and stays reportable.
		if r := mustReport(t, p, l.LeaseID, api.ReportRequest{Status: 200}); r.Classification != api.ClassSuccess {
			t.Fatalf("late report: %+v", r)
		}
	})
}

func readBody(t *testing.T, name string) any {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "gemini", "testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	var v any
	if err := json.Unmarshal(data, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

const twoKeysOneProject = `{"keys":[
	{"key_id":"a","project":"p","model_name":"m","rpm":100,"tpm":100000,"rpd":1000},
	{"key_id":"b","project":"p","model_name":"m","rpm":100,"tpm":100000,"rpd":1000},
	{"key_id":"c","project":"q","model_name":"m","rpm":100,"tpm":100000,"rpd":1000,"priority":-1}]}`

func keyStateOf(p *pool, id string) (string, string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, r, _ := p.keyState(p.keys[id], p.now())
	return s, r
}

func TestReportsPenalizeTheRightThing(t *testing.T) {
	la, _ := time.LoadLocation("America/Los_Angeles")
	cases := []struct {
		name      string
		status    int
		body      string // file in internal/gemini/testdata
		class     string
		stateA    string // of key a after the report
		stateC    string
		untilFrom func(now time.Time) time.Time
		action    string // regexp
	}{
		{"tpm 429", 429, "429_classic_tpm.json", api.ClassRateMinute, api.StateCooling, api.StateReady,
			func(now time.Time) time.Time { return now.Add(time.Minute) }, `^bucket p/m cooling for 1m0s$`}, // max(26s, window)
		{"rpd 429", 429, "429_rpd.json", api.ClassRateDay, api.StateExhausted, api.StateReady,
			func(now time.Time) time.Time {
				l := now.In(la)
				return time.Date(l.Year(), l.Month(), l.Day()+1, 0, 0, 0, 0, la)
			}, `^bucket p/m exhausted until 20[0-9-]+T[0-9:]+(Z|[+-][0-9:]+)$`},
		{"quota 0", 429, "429_newer_limit0.json", api.ClassQuotaZero, api.StateDisabled, api.StateReady, nil, `^bucket p/m disabled$`},
		{"capacity", 429, "429_no_details_capacity.json", api.ClassCapacity, api.StateCooling, api.StateReady,
			func(now time.Time) time.Time { return now.Add(capacityBackoff) }, `^bucket p/m backing off for 5s \(upstream capacity; key not blamed\)$`},
		{"invalid key", 400, "400_api_key_invalid.json", api.ClassKeyInvalid, api.StateDisabled, api.StateReady, nil, `^key a disabled; its grant refunded$`},
		{"leaked key", 403, "403_leaked_key.json", api.ClassKeyDenied, api.StateDisabled, api.StateReady, nil, `^key a disabled; its grant refunded$`},
		{"server error", 503, "503_overloaded.json", api.ClassServerError, api.StateReady, api.StateReady, nil, `^$`},
		{"network", 0, "", api.ClassNetworkError, api.StateReady, api.StateReady, nil, `^$`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				st := &memStore{}
				p := testPool(t, st, twoKeysOneProject)
				l := mustLease(t, p, api.LeaseRequest{Model: "m"})
				if l.KeyID != "a" {
					t.Fatalf("first lease on %s", l.KeyID)
				}
				rep := api.ReportRequest{Status: tc.status}
				if tc.body != "" {
					rep.Error = readBody(t, tc.body)
				}
				r := mustReport(t, p, l.LeaseID, rep)
				if r.Classification != tc.class {
					t.Fatalf("classification %s, want %s (%s)", r.Classification, tc.class, r.Action)
				}
				if !regexp.MustCompile(tc.action).MatchString(r.Action) {
					t.Fatalf("action %q does not match %q", r.Action, tc.action)
				}
				sa, reason := keyStateOf(p, "a")
				if sa != tc.stateA {
					t.Fatalf("key a %s (%s), want %s", sa, reason, tc.stateA)
				}
				if tc.stateA != api.StateReady && reason == "" {
					t.Fatal("a penalized key has no reason")
				}
				if strings.Contains(reason, "AIza") && !strings.Contains(reason, "AIza…") {
					t.Fatalf("reason leaks a key: %s", reason)
				}
				if sc, _ := keyStateOf(p, "c"); sc != tc.stateC {
					t.Fatalf("key c (other project) %s, want %s", sc, tc.stateC)
				}
				if tc.untilFrom != nil {
					p.mu.Lock()
					pen := p.buckets[config.BucketID{Project: "p", Model: "m"}].Penalty(time.Now())
					p.mu.Unlock()
					if want := tc.untilFrom(time.Now()); !pen.Until.Equal(want) {
						t.Fatalf("until %v, want %v", pen.Until, want)
					}
				}
				// Bucket penalties hit b too (same project); key verdicts do not.
				next := mustLease(t, p, api.LeaseRequest{Model: "m"})
				switch tc.class {
				case api.ClassKeyInvalid, api.ClassKeyDenied:
					if next.KeyID != "b" {
						t.Fatalf("after a key verdict the next lease went to %s, want b", next.KeyID)
					}
					// The rejected request was refunded: only the new one counts.
					if u := p.status("x").Buckets[0].RPM.Used; u != 1 {
						t.Fatalf("bucket p/m rpm used %d after a rejected key's refund and one lease, want 1", u)
					}
				case api.ClassRateMinute, api.ClassRateDay, api.ClassQuotaZero, api.ClassCapacity:
					if next.KeyID != "c" {
						t.Fatalf("after a bucket verdict the next lease went to %s, want c", next.KeyID)
					}
				}
				// A repeated report changes nothing.
				n := len(st.batches)
				if r2 := mustReport(t, p, l.LeaseID, rep); !r2.Duplicate || r2.Classification != tc.class || len(st.batches) != n {
					t.Fatalf("repeat report: %+v, %d new batches", r2, len(st.batches)-n)
				}
			})
		})
	}
}

func TestCoolingDoublesAndSuccessResets(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, `{"keys":[{"key_id":"a","model_name":"m","rpm":100,"tpm":100000}]}`)
		body := readBody(t, "429_classic_tpm.json")
		var got []time.Duration
		for range 3 {
			l := mustLease(t, p, api.LeaseRequest{Model: "m"})
			mustReport(t, p, l.LeaseID, api.ReportRequest{Status: 429, Error: body})
			p.mu.Lock()
			pen := p.buckets[config.BucketID{Project: "a", Model: "m"}].Penalty(time.Now())
			p.mu.Unlock()
			got = append(got, pen.Until.Sub(time.Now()))
			time.Sleep(pen.Until.Sub(time.Now()))
		}
		if got[0] != time.Minute || got[1] != 2*time.Minute || got[2] != 4*time.Minute {
			t.Fatalf("cooldowns %v, want 1m 2m 4m", got)
		}
		l := mustLease(t, p, api.LeaseRequest{Model: "m"})
		mustReport(t, p, l.LeaseID, api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: 5}})
		time.Sleep(time.Minute)
		l = mustLease(t, p, api.LeaseRequest{Model: "m"})
		mustReport(t, p, l.LeaseID, api.ReportRequest{Status: 429, Error: body})
		p.mu.Lock()
		pen := p.buckets[config.BucketID{Project: "a", Model: "m"}].Penalty(time.Now())
		p.mu.Unlock()
		if d := pen.Until.Sub(time.Now()); d != time.Minute {
			t.Fatalf("cooldown after a success %v, want 1m", d)
		}
	})
}

func TestUnusedRefundsAndSuccessReconciles(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, `{"keys":[{"key_id":"a","model_name":"m","rpm":2,"tpm":1000,"rpd":3}]}`)
		l1 := mustLease(t, p, api.LeaseRequest{Model: "m", Tokens: 900})
		// 900 of 1000 tokens reserved: another 200 does not fit.
		leaseErr(t, p, api.LeaseRequest{Model: "m", Tokens: 200})
		mustReport(t, p, l1.LeaseID, api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: 100}})
		l2 := mustLease(t, p, api.LeaseRequest{Model: "m", Tokens: 200})
		leaseErr(t, p, api.LeaseRequest{Model: "m", Tokens: 1}) // rpm 2/2
		mustReport(t, p, l2.LeaseID, api.ReportRequest{Outcome: api.OutcomeUnused})
		mustLease(t, p, api.LeaseRequest{Model: "m", Tokens: 1}) // refunded
		st := p.status("test")
		b := st.Buckets[0]
		if b.RPM.Used != 2 || b.TPM.Used != 101 || b.RPD.Used != 2 {
			t.Fatalf("bucket %+v, want rpm 2 tpm 101 rpd 2", b)
		}
	})
}

func TestStoreFailureWithdrawsTheLease(t *testing.T) {
	st := &memStore{fail: errors.New("disk full")}
	p := testPool(t, st, oneKey)
	e := leaseErr(t, p, api.LeaseRequest{Model: "m"})
	if e.Code != api.CodeInternal {
		t.Fatalf("got %s", e.Code)
	}
	st.fail = nil
	mustLease(t, p, api.LeaseRequest{Model: "m"})
	mustLease(t, p, api.LeaseRequest{Model: "m"}) // the failed grant did not count
	if s := p.status("x"); s.Keys[0].InFlight != 2 {
		t.Fatalf("in flight %d, want 2", s.Keys[0].InFlight)
	}
}

func TestKeysWithoutSecretOrDisabledAreNeverLeased(t *testing.T) {
	p := testPool(t, &memStore{}, `{"keys":[
		{"key_id":"nosecret1","model_name":"m","rpm":10,"tpm":1000},
		{"key_id":"off","model_name":"m","rpm":10,"tpm":1000,"enabled":false}]}`)
	e := leaseErr(t, p, api.LeaseRequest{Model: "m", WaitMS: 10_000})
	if e.Code != api.CodeNoKeys || e.RetryAfterMS != nil {
		t.Fatalf("got %s retry=%v", e.Code, e.RetryAfterMS)
	}
	for _, want := range []string{"nosecret1: no secret", "off: enabled is false"} {
		if !strings.Contains(e.Message, want) {
			t.Errorf("message %q lacks %q", e.Message, want)
		}
	}
	st := p.status("x")
	if st.Keys[0].State != api.StateNoSecret || !strings.Contains(st.Keys[0].Reason, "GEMINI_KEY_nosecret1") {
		t.Errorf("status key 0: %+v", st.Keys[0])
	}
	if st.Keys[1].State != api.StateDisabled {
		t.Errorf("status key 1: %+v", st.Keys[1])
	}
}

func TestAdminActions(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, twoKeysOneProject)
		if _, err := p.keyAction(context.Background(), "a", "disable", "admin uid 0"); err != nil {
			t.Fatal(err)
		}
		if k := mustLease(t, p, api.LeaseRequest{Model: "m"}).KeyID; k != "b" {
			t.Fatalf("disabled key leased? got %s", k)
		}
		r, err := p.keyAction(context.Background(), "a", "enable", "admin uid 0")
		if err != nil || r.State != api.StateReady {
			t.Fatalf("enable: %+v %v", r, err)
		}
		l := mustLease(t, p, api.LeaseRequest{Model: "m"})
		mustReport(t, p, l.LeaseID, api.ReportRequest{Status: 429, Error: readBody(t, "429_rpd.json")})
		if s, _ := keyStateOf(p, "b"); s != api.StateExhausted {
			t.Fatalf("b %s", s)
		}
		if _, err := p.keyAction(context.Background(), "a", "reset", "admin uid 0"); err != nil {
			t.Fatal(err)
		}
		if s, _ := keyStateOf(p, "b"); s != api.StateReady {
			t.Fatalf("after reset b %s", s)
		}
		_, e := p.keyAction(context.Background(), "zz", "disable", "admin uid 0")
		if e == nil || e.Code != api.CodeNotFound {
			t.Fatalf("unknown key: %v", e)
		}
	})
}

func TestRestoreFromStore(t *testing.T) {
	dir := t.TempDir()
	now := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	cfgText := `{"keys":[{"key_id":"a","project":"p","model_name":"m","rpm":3,"tpm":1000,"rpd":5},
		{"key_id":"b","project":"q","model_name":"m","rpm":3,"tpm":1000,"rpd":5,"priority":-1}]}`
	open := func() (*store.DB, *pool) {
		st, err := store.Open(dir, store.Options{})
		if err != nil {
			t.Fatal(err)
		}
		p := testPool(t, st, cfgText)
		p.now = clock
		restoreFrom(t, p, st, now)
		return st, p
	}
	st, p := open()
	l1 := mustLease(t, p, api.LeaseRequest{Model: "m", Tokens: 10})
	l2 := mustLease(t, p, api.LeaseRequest{Model: "m", Tokens: 20})
	mustReport(t, p, l1.LeaseID, api.ReportRequest{Status: 200, Usage: &api.Usage{PromptTokens: 7}})
	lb := mustLease(t, p, api.LeaseRequest{Model: "m", Tokens: 10})
	if lb.KeyID != "a" {
		t.Fatalf("third lease on %s", lb.KeyID)
	}
	l4 := mustLease(t, p, api.LeaseRequest{Model: "m"})
	mustReport(t, p, l4.LeaseID, api.ReportRequest{Status: 400, Error: readBody(t, "400_api_key_invalid.json")})
	st.Close()

	now = now.Add(30 * time.Second)
	st, p = open()
	defer st.Close()
	s := p.status("x")
	if b := s.Buckets[0]; b.RPM.Used != 3 || b.TPM.Used != 37 || b.RPD.Used != 3 || b.InFlight != 2 {
		t.Fatalf("restored bucket p/m %+v, want rpm 3, tpm 7+20+10, rpd 3, 2 in flight", b)
	}
	if s.Keys[1].State != api.StateDisabled || !strings.Contains(s.Keys[1].Reason, "API_KEY_INVALID") {
		t.Fatalf("key b after restart: %+v", s.Keys[1])
	}
	// Open leases are still reportable, reported ones are duplicates.
	if r := mustReport(t, p, l2.LeaseID, api.ReportRequest{Outcome: api.OutcomeUnused}); r.Duplicate {
		t.Fatal("open lease came back reported")
	}
	if r := mustReport(t, p, l1.LeaseID, api.ReportRequest{Status: 200}); !r.Duplicate {
		t.Fatal("reported lease came back open")
	}
	if b := p.status("x").Buckets[0]; b.RPM.Used != 2 || b.RPD.Used != 2 {
		t.Fatalf("after refund %+v", b)
	}
	// Key b's rejected request was refunded before the restart and stays so.
	if b := p.status("x").Buckets[1]; b.RPM.Used != 0 || b.RPD.Used != 0 {
		t.Fatalf("bucket q/m after restart %+v, want the rejected request refunded", b)
	}
}

func TestWaitersDoNotBlockRequestsTheyCannotServe(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, `{"keys":[
			{"key_id":"light","model_name":"m","rpm":1,"tpm":100000,"workload_type":"light"},
			{"key_id":"heavy","model_name":"m","rpm":1,"tpm":100000,"workload_type":"heavy"}]}`)
		mustLease(t, p, api.LeaseRequest{Model: "m", WorkloadType: "heavy"})
		done := make(chan string)
		go func() {
			done <- mustLease(t, p, api.LeaseRequest{Model: "m", WorkloadType: "heavy", WaitMS: 120_000}).KeyID
		}()
		synctest.Wait() // the heavy request waits for the heavy key
		// A light request is not stuck behind it: the waiter cannot use "light".
		if k := mustLease(t, p, api.LeaseRequest{Model: "m", WorkloadType: "light"}).KeyID; k != "light" {
			t.Fatalf("got %s", k)
		}
		time.Sleep(time.Minute)
		if k := <-done; k != "heavy" {
			t.Fatalf("waiter got %s", k)
		}
		// A newcomer may not take capacity that a waiter ahead of it can
		// use: freeze a waiter in the queue as if it had not woken yet.
		time.Sleep(time.Minute)
		p.mu.Lock()
		p.queues["m"] = []*waiter{{req: &api.LeaseRequest{Model: "m", WorkloadType: "heavy"}, tokens: 1}}
		p.mu.Unlock()
		e := leaseErr(t, p, api.LeaseRequest{Model: "m", WorkloadType: "heavy"})
		if e.Code != api.CodeNoCapacity || !strings.Contains(e.Message, "earlier requests") {
			t.Fatalf("newcomer: %s %s", e.Code, e.Message)
		}
		if k := mustLease(t, p, api.LeaseRequest{Model: "m", WorkloadType: "light"}).KeyID; k != "light" {
			t.Fatalf("light newcomer got %s", k)
		}
	})
}

func TestDayFullShowsExhausted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, `{"keys":[{"key_id":"k","model_name":"m","rpm":10,"tpm":100000,"rpd":1}]}`)
		mustLease(t, p, api.LeaseRequest{Model: "m"})
		s := p.status("x")
		if s.Keys[0].State != api.StateExhausted || s.Keys[0].Until == nil || s.Buckets[0].State != api.StateExhausted {
			t.Fatalf("after rpd used up: key %+v bucket %+v", s.Keys[0], s.Buckets[0])
		}
	})
}

func TestRestoredLeaseOfARemovedKeyStaysReportable(t *testing.T) {
	dir := t.TempDir()
	open := func(cfgText string) (*store.DB, *pool) {
		st, err := store.Open(dir, store.Options{})
		if err != nil {
			t.Fatal(err)
		}
		p := testPool(t, st, cfgText)
		s, err := st.Load(time.Now().Add(-2*time.Hour), restoreDays(p.cfg, time.Now()))
		if err != nil {
			t.Fatal(err)
		}
		p.mu.Lock()
		p.restore(s, time.Now(), &store.Batch{})
		p.mu.Unlock()
		return st, p
	}
	st, p := open(`{"keys":[{"key_id":"a","model_name":"m","rpm":10,"tpm":100000},{"key_id":"b","project":"p","model_name":"m","rpm":10,"tpm":100000}]}`)
	var ids []string
	for range 4 {
		ids = append(ids, mustLease(t, p, api.LeaseRequest{Model: "m"}).LeaseID)
	}
	st.Close()
	// a removed, b moved to another project.
	st, p = open(`{"keys":[{"key_id":"b","project":"q","model_name":"m","rpm":10,"tpm":100000}]}`)
	defer st.Close()
	reps := []api.ReportRequest{{Status: 200}, {Outcome: api.OutcomeUnused},
		{Status: 400, Error: readBody(t, "400_api_key_invalid.json")}, {Status: 429, Error: readBody(t, "429_rpd.json")}}
	for i, id := range ids {
		mustReport(t, p, id, reps[i])
	}
	if s := p.status("x"); len(s.Keys) != 1 || s.Keys[0].State != api.StateReady || s.Keys[0].InFlight != 0 {
		t.Fatalf("status after reports of old leases: %+v", s.Keys)
	}
}

func TestWindowMarginHoldsSlotsLonger(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, `{"window_margin":"1s","keys":[{"key_id":"k","model_name":"m","rpm":1,"tpm":100000}]}`)
		mustLease(t, p, api.LeaseRequest{Model: "m"})
		e := leaseErr(t, p, api.LeaseRequest{Model: "m"})
		if d, _ := e.RetryAfter(); d != 61*time.Second {
			t.Fatalf("retry after %v, want 61s (60 s window + 1 s margin)", d)
		}
		time.Sleep(61*time.Second - time.Nanosecond)
		leaseErr(t, p, api.LeaseRequest{Model: "m"})
		time.Sleep(time.Nanosecond)
		mustLease(t, p, api.LeaseRequest{Model: "m"})
	})
}

// restoreFrom loads st as Run does at now (the leases of the last lease_ttl
// + leaseGrace, the day counts of now's days) and restores p from it.
func restoreFrom(t *testing.T, p *pool, st store.Store, now time.Time) {
	t.Helper()
	s, err := st.Load(now.Add(-(p.cfg.LeaseTTL + leaseGrace)), restoreDays(p.cfg, now))
	if err != nil {
		t.Fatal(err)
	}
	p.mu.Lock()
	p.restore(s, now, &store.Batch{})
	p.mu.Unlock()
}

// TestLargeRequestIsNotStarvedBySmallOnes: a request of 900 tokens waits
// for a 1,000-token window that a stream of 100-token requests keeps
// nearly full. Each small one would fit as soon as an older grant leaves
// the window, so without holding the bucket for the large one it would
// never fit; with it, the large one is granted the moment the window has
// room for it, and the small ones wait their turn behind it.
func TestLargeRequestIsNotStarvedBySmallOnes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, `{"keys":[{"key_id":"k1","model_name":"m","rpm":1000,"tpm":1000}]}`)
		t0 := time.Now()
		var wg sync.WaitGroup
		defer wg.Wait()
		// A small request every 6 s for 3 minutes, each willing to wait.
		for i := range 30 {
			wg.Go(func() {
				time.Sleep(time.Duration(i) * 6 * time.Second)
				mustLease(t, p, api.LeaseRequest{Model: "m", Tokens: 100, WaitMS: 300_000})
			})
		}
		time.Sleep(30 * time.Second)
		synctest.Wait() // the small request of t=30s is granted: 600 tokens in the window
		l := mustLease(t, p, api.LeaseRequest{Model: "m", Tokens: 900, WaitMS: 120_000})
		// 900 fits once 500 of the 600 have left: the grant of t=24s
		// leaves at t=84s.
		if got := time.Since(t0); got != 84*time.Second || l.Tokens != 900 {
			t.Fatalf("large request granted at %v, want 1m24s", got)
		}
	})
}

// TestHeldBucketOnlyWhenItDelaysAWaiter: a later request may not take
// capacity of the bucket a waiter waits for when that would delay the
// waiter's grant within its wait. It goes to another bucket if one can
// serve it, and waits or is refused if none can; when the waiter's wait
// ends before the bucket frees, nothing is held for it.
func TestHeldBucketOnlyWhenItDelaysAWaiter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// Requests that name a workload type go to one key; the others
		// may use both.
		p := testPool(t, &memStore{}, `{"keys":[
			{"key_id":"a","project":"p1","model_name":"m","rpm":1000,"tpm":1000,"workload_type":"wa"},
			{"key_id":"b","project":"p2","model_name":"m","rpm":1000,"tpm":1000,"workload_type":"wb"}]}`)
		t0 := time.Now()
		at := func(d time.Duration) { time.Sleep(t0.Add(d).Sub(time.Now())) }
		lease := func(tokens int64, waitMS int64) (*api.Lease, *api.Error) {
			return p.lease(context.Background(), &api.LeaseRequest{Model: "m", Tokens: tokens, WaitMS: waitMS})
		}
		// p1: 100 tokens at each of t=0,10,...,50 s; p2: 850 at t=50 s.
		for i := range 6 {
			at(time.Duration(i) * 10 * time.Second)
			mustLease(t, p, api.LeaseRequest{Model: "m", Tokens: 100, WorkloadType: "wa"})
		}
		mustLease(t, p, api.LeaseRequest{Model: "m", Tokens: 850, WorkloadType: "wb"})

		// x needs 900: p1 has room once the grant of t=40 s leaves (t=100
		// s), p2 once its 850 leave (t=110 s). It waits for p1.
		at(55 * time.Second)
		xDone := make(chan time.Duration)
		go func() {
			l, err := lease(900, 120_000)
			if err != nil || l.KeyID != "a" {
				t.Errorf("x: %+v %v, want a lease on a", l, err)
			}
			xDone <- time.Since(t0)
		}()
		synctest.Wait()

		// 100 tokens fit on p1 now, but would move x's grant from t=100
		// s to t=110 s: they go to p2, which has room for them.
		at(60 * time.Second)
		if l, err := lease(100, 0); err != nil || l.KeyID != "b" {
			t.Fatalf("r1: %+v %v, want a lease on b at once", l, err)
		}
		// p2 is now full; p1 is held for x.
		if l, err := lease(100, 0); err == nil {
			t.Fatalf("r2 got a lease on %s, want no_capacity", l.KeyID)
		} else if err.Code != api.CodeNoCapacity || !strings.Contains(err.Message, "a: its free capacity is held for earlier requests waiting for it") {
			t.Fatalf("r2: %s %q", err.Code, err.Message)
		}
		if got := <-xDone; got != 100*time.Second {
			t.Fatalf("x granted at %v, want 1m40s", got)
		}

		// y needs 900 and waits 5 s: p1 frees for it at t=160 s, p2 at
		// t=110 s, both after its wait; nothing is held for it, and a
		// request that fits on p2 takes it at once.
		at(101 * time.Second)
		yDone := make(chan *api.Error)
		go func() {
			_, err := lease(900, 5000)
			yDone <- err
		}()
		synctest.Wait()
		at(102 * time.Second)
		if l, err := lease(50, 0); err != nil || l.KeyID != "b" {
			t.Fatalf("r3: %+v %v, want a lease on b at once", l, err)
		}
		if err := <-yDone; err == nil || err.Code != api.CodeNoCapacity || time.Since(t0) != 106*time.Second {
			t.Fatalf("y: %v at %v, want no_capacity at 1m46s", err, time.Since(t0))
		}
	})
}

// TestWaitersBehindAnotherWorkloadAreWoken: a pass over the queue goes on
// past a request that cannot be granted, so a waiter behind it is granted
// the moment its own key frees, and each waiter of a key that frees is
// granted in turn, without polling (the clock only moves when every
// goroutine waits, so a poll would show as a grant at the wrong time).
func TestWaitersBehindAnotherWorkloadAreWoken(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, `{"keys":[
			{"key_id":"light","model_name":"m","rpm":1,"tpm":100000,"workload_type":"light"},
			{"key_id":"heavy","model_name":"m","rpm":1,"tpm":100000,"workload_type":"heavy"}]}`)
		t0 := time.Now()
		mustLease(t, p, api.LeaseRequest{Model: "m", WorkloadType: "light"})
		time.Sleep(30 * time.Second)
		mustLease(t, p, api.LeaseRequest{Model: "m", WorkloadType: "heavy"})
		// light frees at 1m, heavy at 1m30s; each heavy waiter is queued
		// ahead of a light one.
		type got struct {
			who string
			at  time.Duration
		}
		results := make(chan got, 4)
		for _, who := range []string{"heavy", "light", "heavy", "light"} {
			go func() {
				l := mustLease(t, p, api.LeaseRequest{Model: "m", WorkloadType: who, WaitMS: 300_000})
				results <- got{l.KeyID, time.Since(t0)}
			}()
			synctest.Wait() // queued in this order
		}
		var order []got
		for range 4 {
			order = append(order, <-results)
		}
		want := []got{{"light", time.Minute}, {"heavy", 90 * time.Second}, {"light", 2 * time.Minute}, {"heavy", 150 * time.Second}}
		for i := range want {
			if order[i] != want[i] {
				t.Fatalf("grants %v, want %v", order, want)
			}
		}
	})
}
