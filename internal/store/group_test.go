package store

import (
	"context"
	"reflect"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
)

// TestGroupMergesRows puts several batches in one transaction and checks
// that the writer's merging of day rows (last one wins) and usage rows
// (summed) leaves what one transaction per batch would.
func TestGroupMergesRows(t *testing.T) {
	db, dir := openTest(t, "")
	// Hold bbolt's writer lock so that the first batch blocks the writer
	// inside Update while the others queue behind it: they then make one
	// group.
	hold, err := db.bolt.Begin(true)
	if err != nil {
		t.Fatal(err)
	}
	const day = "2025-03-14"
	batches := []*Batch{
		{Leases: []Lease{lease("a", t0)}}, // committed alone, once hold ends
		{Days: []Day{{Project: "p", Model: "m", Day: day, Count: 1}},
			Usage: []UsageDelta{{Hour: t0, Project: "p", Model: "m", KeyID: "k1", Requests: 1, PromptTokens: 10}}},
		{Days: []Day{{Project: "p", Model: "m", Day: day, Count: 2}},
			Usage: []UsageDelta{
				{Hour: t0.Add(10 * time.Minute), Project: "p", Model: "m", KeyID: "k1", Requests: 1, PromptTokens: 5, OutputTokens: 3},
				{Hour: t0, Project: "p", Model: "m", KeyID: "k2", Errors: 1},
			}},
		{Leases: []Lease{lease("b", t0)},
			Days: []Day{{Project: "p", Model: "m", Day: day, Count: 3}, {Project: "p", Model: "m2", Day: day, Count: 7}},
			Usage: []UsageDelta{
				{Hour: t0.Add(30 * time.Minute), Project: "p", Model: "m", KeyID: "k1", Requests: -1, PromptTokens: -10, Unused: 1},
				{Hour: t0.Add(time.Hour), Project: "p", Model: "m", KeyID: "k1", RateMinute: 1},
			}},
	}
	var pending []*Pending
	pending = append(pending, db.Submit(batches[0]))
	for len(db.reqs) > 0 { // until the writer took the first
		time.Sleep(time.Millisecond)
	}
	for _, b := range batches[1:] {
		pending = append(pending, db.Submit(b))
	}
	if err := hold.Rollback(); err != nil {
		t.Fatal(err)
	}
	for _, p := range pending {
		if err := p.Wait(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if st := db.Stats(); st.Commits != 4 {
		t.Fatalf("stats %+v", st)
	} else if st.Transactions > 2 {
		t.Logf("the batches took %d transactions: the merge was not exercised", st.Transactions)
	}
	check := func(db *DB) {
		t.Helper()
		st := load(t, db, time.Time{}, day)
		wantDays := []Day{{Project: "p", Model: "m", Day: day, Count: 3}, {Project: "p", Model: "m2", Day: day, Count: 7}}
		if !reflect.DeepEqual(st.Days, wantDays) {
			t.Errorf("days %+v\nwant %+v", st.Days, wantDays)
		}
		if len(st.Leases) != 2 {
			t.Errorf("leases %+v", st.Leases)
		}
		rows, err := db.Usage(time.Time{}, "")
		if err != nil {
			t.Fatal(err)
		}
		want := []api.UsageRow{
			{Hour: t0, Project: "p", Model: "m", KeyID: "k1", Requests: 1, PromptTokens: 5, OutputTokens: 3, Unused: 1},
			{Hour: t0, Project: "p", Model: "m", KeyID: "k2", Errors: 1},
			{Hour: t0.Add(time.Hour), Project: "p", Model: "m", KeyID: "k1", RateMinute: 1},
		}
		if !reflect.DeepEqual(rows, want) {
			t.Errorf("usage\n got %+v\nwant %+v", rows, want)
		}
	}
	check(db)
	// A later transaction adds to the merged rows.
	commit(t, db, &Batch{Usage: []UsageDelta{{Hour: t0, Project: "p", Model: "m", KeyID: "k2", Errors: 2}}})
	db.Close()
	db2, _ := openTest(t, dir)
	rows, err := db2.Usage(t0, "k2")
	if err != nil || len(rows) != 1 || rows[0].Errors != 3 {
		t.Errorf("k2 after reopen: %+v, %v", rows, err)
	}
}
