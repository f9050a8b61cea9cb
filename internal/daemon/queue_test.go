package daemon

import (
	"context"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/keyd/keyd/api"
)

// TestShutdownWithManyWaitersIsLinear: on shutdown every waiter leaves
// with shutting_down, and leaving must not run a pass over those still
// queued (a pass per leaver makes shutdown quadratic in the waiters:
// 2,000 of them took 1.7 s). p.stamp counts choose calls.
func TestShutdownWithManyWaitersIsLinear(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, `{"keys":[
			{"key_id":"k1","project":"p1","model_name":"m","rpm":1,"tpm":100000},
			{"key_id":"k2","project":"p2","model_name":"m","rpm":1,"tpm":100000}]}`)
		mustLease(t, p, api.LeaseRequest{Model: "m"})
		mustLease(t, p, api.LeaseRequest{Model: "m"})
		const n = 500
		var wg sync.WaitGroup
		errs := make(chan *api.Error, n)
		for range n {
			wg.Go(func() {
				_, err := p.lease(context.Background(), &api.LeaseRequest{Model: "m", WaitMS: 50_000})
				errs <- err
			})
		}
		synctest.Wait()
		p.mu.Lock()
		if q := len(p.queues["m"]); q != n {
			t.Fatalf("%d waiting, want %d", q, n)
		}
		before := p.stamp
		p.closing = true
		p.kick()
		p.mu.Unlock()
		wg.Wait()
		for range n {
			if err := <-errs; err == nil || err.Code != api.CodeShuttingDown {
				t.Fatalf("waiter got %v, want shutting_down", err)
			}
		}
		if calls := p.stamp - before; calls > 2*n {
			t.Fatalf("shutting %d waiters down took %d choices, want at most %d", n, calls, 2*n)
		}
	})
}

// TestWaiterForMaxInFlightIsGrantedAtExpiry: a waiter for a key at
// max_in_flight 1 whose lease is never reported is granted the moment
// that lease expires, by the pool's timer (no janitor runs here), and the
// timer does not spin on the expiry meanwhile (under synctest a spin
// would keep time from moving and hang the test).
func TestWaiterForMaxInFlightIsGrantedAtExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, `{"lease_ttl":"2m","keys":[{"key_id":"k1","model_name":"m","rpm":100,"tpm":100000,"max_in_flight":1}]}`)
		t0 := time.Now()
		mustLease(t, p, api.LeaseRequest{Model: "m"})
		time.Sleep(10 * time.Second)
		mustLease(t, p, api.LeaseRequest{Model: "m", WaitMS: 300_000})
		if got := time.Since(t0); got != 2*time.Minute {
			t.Fatalf("granted at %v, want 2m0s (the first lease's expiry)", got)
		}
	})
}

// TestNoClaimOnAKeyThatCannotServeInTime: a waiter whose only key is at
// max_in_flight until after its wait ends claims nothing, so a request of
// another workload on the same bucket is served at once; and a waiter
// whose key frees within its wait claims the bucket from then on.
func TestNoClaimOnAKeyThatCannotServeInTime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, `{"keys":[
			{"key_id":"k1","project":"p","model_name":"m","rpm":100,"tpm":1000,"workload_type":"a","max_in_flight":1},
			{"key_id":"k2","project":"p","model_name":"m","rpm":100,"tpm":1000,"workload_type":"b"}]}`)
		// k1 is busy for lease_ttl (10 min); p holds 500 of its 1,000.
		mustLease(t, p, api.LeaseRequest{Model: "m", WorkloadType: "a", Tokens: 500})
		done := make(chan *api.Error)
		go func() {
			_, err := p.lease(context.Background(), &api.LeaseRequest{Model: "m", WorkloadType: "a", Tokens: 900, WaitMS: 120_000})
			done <- err
		}()
		synctest.Wait()
		time.Sleep(time.Second)
		// p has room for 900 in a minute, but k1 not for 10: nothing to
		// hold for the waiter, whose wait ends in 2.
		if l, err := p.lease(context.Background(), &api.LeaseRequest{Model: "m", WorkloadType: "b", Tokens: 200}); err != nil {
			t.Fatalf("b: %v, want a lease on k2 at once", err)
		} else if l.KeyID != "k2" {
			t.Fatalf("b got %s", l.KeyID)
		}
		if err := <-done; err == nil || err.Code != api.CodeNoCapacity {
			t.Fatalf("waiter: %v, want no_capacity", err)
		}
	})
}

// TestStatusShowsWaiting: GET /v1/status lists, by model, how many lease
// requests wait and how long the first in line has; nothing once none do.
func TestStatusShowsWaiting(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, oneKey)
		mustLease(t, p, api.LeaseRequest{Model: "m"})
		mustLease(t, p, api.LeaseRequest{Model: "m"})
		var wg sync.WaitGroup
		for range 3 {
			wg.Go(func() { mustLease(t, p, api.LeaseRequest{Model: "m", WaitMS: 300_000}) })
			synctest.Wait()
			time.Sleep(2 * time.Second)
		}
		want := []api.ModelWaiting{{Model: "m", Requests: 3, OldestMS: 6000}}
		if got := p.status("x").Waiting; !slices.Equal(got, want) {
			t.Fatalf("waiting %+v, want %+v", got, want)
		}
		wg.Wait() // granted as the window frees
		if got := p.status("x").Waiting; got != nil {
			t.Fatalf("waiting %+v once all were granted", got)
		}
	})
}

// TestExpiredLeaseFreesItsSlotAtOnce: at a lease's expires_at its
// max_in_flight slot is free for a request that does not wait, without
// the janitor (which no test pool runs).
func TestExpiredLeaseFreesItsSlotAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := testPool(t, &memStore{}, `{"lease_ttl":"1m","keys":[{"key_id":"k1","model_name":"m","rpm":100,"tpm":100000,"max_in_flight":1}]}`)
		mustLease(t, p, api.LeaseRequest{Model: "m"})
		time.Sleep(time.Minute - time.Nanosecond)
		leaseErr(t, p, api.LeaseRequest{Model: "m"})
		time.Sleep(time.Nanosecond)
		mustLease(t, p, api.LeaseRequest{Model: "m"})
	})
}
