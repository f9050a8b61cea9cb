package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestGrowFails: a segment that cannot grow (disk full) fails only the
// group whose record needed the space, with an error naming the file and
// ENOSPC. The log does not stop: a record that fits in the space already
// grown commits while the disk is still full, and a big one once space is
// back. Nothing acknowledged is lost, nothing failed is applied, whether
// keyd.db gets the records from Close's checkpoint or from the log after
// a crash.
func TestGrowFails(t *testing.T) {
	var full atomic.Bool
	var refusedGrows atomic.Int64
	orig := growWriteAt
	growWriteAt = func(f *os.File, b []byte, off int64) (int, error) {
		if !full.Load() {
			return orig(f, b, off)
		}
		refusedGrows.Add(1)
		// A full disk takes part of the write, then refuses the rest.
		n, _ := orig(f, b[:len(b)/2], off)
		return n, &os.PathError{Op: "write", Path: f.Name(), Err: syscall.ENOSPC}
	}
	t.Cleanup(func() { growWriteAt = orig }) // after the DB's Close

	dir := t.TempDir()
	db := openOpts(t, dir, noCheckpoint)
	var acked []string
	batch := func(prefix string, n int) *Batch {
		b := &Batch{Usage: []UsageDelta{{Hour: t0, Project: "p", Model: "m", KeyID: "k", Requests: int64(n)}}}
		for i := range n {
			b.Leases = append(b.Leases, lease(fmt.Sprintf("%s%04d", prefix, i), t0.Add(time.Duration(len(acked)+i)*time.Millisecond)))
		}
		return b
	}
	ack := func(b *Batch) {
		for _, l := range b.Leases {
			acked = append(acked, l.ID)
		}
	}
	const big = 400 // leases: a record of about 100 KB, more than the segment's first 64 KiB

	a := batch("a", 1)
	commit(t, db, a) // grows the segment to its first 64 KiB
	ack(a)

	full.Store(true)
	// The group {x, s1}: x needs the segment to grow, s1 alone would fit.
	// The writer takes b alone and stalls; x and s1 queue behind it and
	// are then taken together.
	entered, stop := make(chan struct{}), make(chan struct{})
	hook := func() { entered <- struct{}{}; <-stop }
	db.stallHook.Store(&hook)
	b := batch("b", 1)
	pb := db.Submit(b)
	<-entered
	db.stallHook.Store(nil)
	x, s1 := batch("x", big), batch("s1-", 1)
	px, ps1 := db.Submit(x), db.Submit(s1)
	failedBefore := db.Stats().Failed
	close(stop)
	if err := pb.Wait(context.Background()); err != nil {
		t.Fatalf("a batch that fits failed: %v", err)
	}
	ack(b)
	seg := filepath.Join(dir, segmentName(0))
	want := fmt.Sprintf("growing %s: write %s: no space left on device: free space in %s", seg, seg, dir)
	for name, p := range map[string]*Pending{"the batch needing space": px, "the batch in its group": ps1} {
		err := p.Wait(context.Background())
		if err == nil {
			t.Fatalf("%s committed on a full disk", name)
		}
		if !errors.Is(err, syscall.ENOSPC) || err.Error() != want {
			t.Errorf("%s: error %q (ENOSPC: %v), want %q", name, err, errors.Is(err, syscall.ENOSPC), want)
		}
	}
	if n := refusedGrows.Load(); n != 1 {
		t.Errorf("%d grows refused, want 1", n)
	}
	if n := db.Stats().Failed - failedBefore; n != 2 {
		t.Errorf("%d batches counted failed, want 2", n)
	}
	// The grow that failed part-way did not count its space as grown:
	// the writer's size of the segment is what it had zeroed before, so
	// the next grow writes its zeros from there and no record extends the
	// file (whose fdatasync would flush the file's size too). The writer
	// answered px before this read.
	if fi, err := os.Stat(seg); err != nil {
		t.Fatal(err)
	} else if s := db.segs[0].size; s != minGrow || fi.Size() < s {
		t.Errorf("after the failed grow the writer counts %s as %d bytes (file %d), want its first %d", seg, s, fi.Size(), minGrow)
	}

	// Still full: a record that fits in the space grown commits.
	s2 := batch("s2-", 1)
	commit(t, db, s2)
	ack(s2)
	// Space is back: the big record commits.
	full.Store(false)
	y := batch("y", big)
	commit(t, db, y)
	ack(y)
	if n := refusedGrows.Load(); n != 1 {
		t.Errorf("%d grows refused, want 1", n)
	}
	img := crashImage(t, dir) // every record is in the log only
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	for name, d := range map[string]string{"after Close": dir, "after a crash": img} {
		db2 := openOpts(t, d, Options{})
		st := load(t, db2, time.Time{})
		if g, w := leaseIDs(st), strings.Join(acked, ","); g != w {
			t.Errorf("%s: leases\n %s\nwant\n %s", name, g, w)
		}
		rows, err := db2.Usage(time.Time{}, "")
		if err != nil {
			t.Fatal(err)
		}
		if len(rows) != 1 || rows[0].Requests != int64(len(acked)) {
			t.Errorf("%s: usage %+v, want %d requests", name, rows, len(acked))
		}
		if err := db2.Close(); err != nil {
			t.Fatal(err)
		}
	}
}
