package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// noCheckpoint keeps every record in the log, so that a copy of the state
// dir taken while the DB is open is what a crash would leave.
var noCheckpoint = Options{CheckpointBytes: 1 << 30, CheckpointInterval: time.Hour}

// crashImage copies dir's files to a new directory, as a kill -9 at this
// moment would leave them: keyd.db and both log segments.
func crashImage(t *testing.T, dir string) string {
	t.Helper()
	img := t.TempDir()
	for _, name := range []string{FileName, segmentName(0), segmentName(1)} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(img, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return img
}

func openOpts(t *testing.T, dir string, o Options) *DB {
	t.Helper()
	o.Logf = t.Logf
	db, err := Open(dir, o)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := db.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return db
}

func leaseIDs(st *State) string {
	var ids []string
	for _, l := range st.Leases {
		ids = append(ids, l.ID)
	}
	return strings.Join(ids, ",")
}

// TestLogRecovers: acknowledged batches that only the log holds are in
// keyd.db after a restart, applied once.
func TestLogRecovers(t *testing.T) {
	db := openOpts(t, t.TempDir(), noCheckpoint)
	commit(t, db, &Batch{}) // keyd commits empty batches at start
	for i := range 5 {
		commit(t, db, &Batch{
			Leases: []Lease{lease(fmt.Sprintf("l%d", i), t0.Add(time.Duration(i)*time.Second))},
			Usage:  []UsageDelta{{Hour: t0, Project: "p", Model: "m", KeyID: "k", Requests: 1}},
			Days:   []Day{{Project: "p", Model: "m", Day: "2025-03-14", Count: int64(i + 1)}},
		})
	}
	commit(t, db, &Batch{DeleteLeases: []string{"l1"}})
	img := crashImage(t, db.dir)
	if db.Stats().Checkpoints != 0 {
		t.Fatalf("a checkpoint ran; the image does not test recovery")
	}

	for pass := range 2 { // the second open must not apply the records again
		db2 := openOpts(t, img, Options{})
		st := load(t, db2, time.Time{}, "2025-03-14")
		if g, w := leaseIDs(st), "l0,l2,l3,l4"; g != w {
			t.Errorf("pass %d: leases %s, want %s", pass, g, w)
		}
		if len(st.Days) != 1 || st.Days[0].Count != 5 {
			t.Errorf("pass %d: days %+v, want count 5", pass, st.Days)
		}
		rows, err := db2.Usage(time.Time{}, "")
		if err != nil {
			t.Fatal(err)
		}
		if len(rows) != 1 || rows[0].Requests != 5 {
			t.Errorf("pass %d: usage %+v, want 5 requests", pass, rows)
		}
		if err := db2.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestLogTornTail: a record cut short or damaged by a crash ends the log;
// the records before it are recovered. Its batch was never acknowledged,
// since the answer waits for the fdatasync that the crash prevented.
func TestLogTornTail(t *testing.T) {
	for _, damage := range []string{"truncated", "flipped", "zeroed"} {
		t.Run(damage, func(t *testing.T) {
			db := openOpts(t, t.TempDir(), noCheckpoint)
			commit(t, db, &Batch{Leases: []Lease{lease("a", t0)}})
			commit(t, db, &Batch{Leases: []Lease{lease("b", t0.Add(time.Second))}})
			start := db.off
			commit(t, db, &Batch{Leases: []Lease{lease("c", t0.Add(2*time.Second))}})
			end := db.off
			img := crashImage(t, db.dir)
			path := filepath.Join(img, segmentName(db.active))
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			switch damage {
			case "truncated":
				err = f.Truncate(end - 3)
			case "flipped":
				b := make([]byte, 1)
				f.ReadAt(b, end-10)
				b[0] ^= 0x40
				_, err = f.WriteAt(b, end-10)
			case "zeroed":
				_, err = f.WriteAt(make([]byte, end-start), start)
			}
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			db2 := openOpts(t, img, Options{})
			if g, w := leaseIDs(load(t, db2, time.Time{})), "a,b"; g != w {
				t.Errorf("leases %s, want %s", g, w)
			}
			// The log goes on after the torn record.
			commit(t, db2, &Batch{Leases: []Lease{lease("d", t0.Add(3*time.Second))}})
			if g, w := leaseIDs(load(t, db2, time.Time{})), "a,b,d"; g != w {
				t.Errorf("after a new commit: leases %s, want %s", g, w)
			}
		})
	}
}

// writeLog writes records with the given sequence numbers, each putting
// lease "s<seq>", into the segments of dir: seqs[i] into segment i. The
// first record of each segment starts with the store id id, unless id is
// nil (a schema 2 log).
func writeLog(t *testing.T, dir string, id []byte, seqs [2][]uint64) {
	t.Helper()
	segs, err := openSegments(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer closeSegments(segs)
	var e encoder
	for i, ss := range seqs {
		var off int64
		for _, seq := range ss {
			l := lease("s"+strconv.FormatUint(seq, 10), t0.Add(time.Duration(seq)*time.Second))
			rec := make([]byte, recHeader)
			if id != nil && off == 0 {
				rec = appendStoreID(rec, id)
			}
			rec, err := e.appendBatch(rec, &Batch{Leases: []Lease{l}})
			if err != nil {
				t.Fatal(err)
			}
			if err := segs[i].appendRecord(rec, off, seq); err != nil {
				t.Fatal(err)
			}
			off += int64(len(rec))
		}
	}
}

// storeIDOf returns the store id in dir's keyd.db, which must not be
// open; nil if it has none.
func storeIDOf(t *testing.T, dir string) []byte {
	t.Helper()
	bdb, err := bolt.Open(filepath.Join(dir, FileName), 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer bdb.Close()
	var id []byte
	bdb.View(func(tx *bolt.Tx) error {
		if meta := tx.Bucket(bucketMeta); meta != nil {
			id = bytes.Clone(meta.Get(keyStoreID))
		}
		return nil
	})
	return id
}

// setApplied sets keyd.db's last applied record.
func setApplied(t *testing.T, dir string, seq uint64) {
	t.Helper()
	bdb, err := bolt.Open(filepath.Join(dir, FileName), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer bdb.Close()
	if err := bdb.Update(func(tx *bolt.Tx) error { return putSeq(tx, seq) }); err != nil {
		t.Fatal(err)
	}
}

// TestLogSegments: records are taken from both segments in sequence
// order, those keyd.db has are skipped, and each segment ends where its
// numbers stop following each other (the rest is an older pass, with
// lower numbers).
func TestLogSegments(t *testing.T) {
	for _, tc := range []struct {
		name    string
		applied uint64
		seqs    [2][]uint64
		want    string
	}{
		{"one segment", 0, [2][]uint64{{1, 2, 3}, nil}, "s1,s2,s3"},
		{"both, newer in 0", 0, [2][]uint64{{4, 5}, {1, 2, 3}}, "s1,s2,s3,s4,s5"},
		{"older segment applied", 3, [2][]uint64{{4, 5}, {1, 2, 3}}, "s4,s5"},
		{"older pass after the end", 6, [2][]uint64{{7, 8, 3, 4}, {5, 6}}, "s7,s8"},
		{"nothing new", 8, [2][]uint64{{7, 8}, {5, 6}}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := newLogDir(t, tc.applied, tc.seqs)
			db2 := openOpts(t, dir, Options{})
			if g := leaseIDs(load(t, db2, time.Time{})); g != tc.want {
				t.Errorf("leases %q, want %q", g, tc.want)
			}
		})
	}
}

// newLogDir makes a state dir whose keyd.db has every record up to
// applied and whose segments hold the records seqs.
func newLogDir(t *testing.T, applied uint64, seqs [2][]uint64) string {
	t.Helper()
	dir := t.TempDir()
	db, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	db.Close()
	setApplied(t, dir, applied)
	writeLog(t, dir, storeIDOf(t, dir), seqs)
	return dir
}

// TestLogDamage: a log that lost records other than by a torn last write
// refuses to start, naming the files, what keyd.db has and the way out:
// a damaged record followed by valid ones, a gap between the segments, a
// number out of sequence (no pass writes a higher number after a lower
// one), a log whose keyd.db was replaced.
func TestLogDamage(t *testing.T) {
	for _, tc := range []struct {
		name    string
		applied uint64
		seqs    [2][]uint64
		damage  int // the record of segment 0 to damage, -1 for none
		want    []string
	}{
		{"damaged record in the middle", 0, [2][]uint64{{1, 2, 3}, nil}, 1, []string{
			"write-ahead log is damaged", segmentName(0) + " has a bad record after record 1 and valid ones up to 3 after it",
			"losing every record after 0, move keyd.0.wal and keyd.1.wal out of "}},
		{"gap between segments", 2, [2][]uint64{{1, 2, 3}, {5, 6}}, -1, []string{
			"write-ahead log is damaged: record 5 follows 3 in", segmentName(1), "keyd.db has every record up to 2",
			"losing every record after 2, move keyd.0.wal and keyd.1.wal out of "}},
		{"number out of sequence", 4, [2][]uint64{{5, 6, 10, 11}, nil}, -1, []string{
			segmentName(0) + " has a bad record after record 6 and valid ones up to 11 after it"}},
		{"keyd.db replaced", 0, [2][]uint64{{7, 8}, nil}, -1, []string{
			"starts at record 7, but keyd.db has none of it: keyd.db is new or was replaced",
			"put back the keyd.db these logs belong to, or move keyd.0.wal and keyd.1.wal out of "}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := newLogDir(t, tc.applied, tc.seqs)
			if tc.damage >= 0 {
				path := filepath.Join(dir, segmentName(0))
				b, err := os.ReadFile(path)
				if err != nil {
					t.Fatal(err)
				}
				off := 0
				for range tc.damage {
					off += recHeader + int(binary.LittleEndian.Uint32(b[off:]))
				}
				b[off+recHeader+5] ^= 1 // in the payload
				if err := os.WriteFile(path, b, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			_, err := Open(dir, Options{})
			if err == nil {
				t.Fatal("Open succeeded over a damaged log")
			}
			for _, want := range tc.want {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q lacks %q", err, want)
				}
			}
			if _, err := os.Stat(filepath.Join(dir, PIDFileName)); !os.IsNotExist(err) {
				t.Errorf("pid file left by a refused Open: %v", err)
			}
		})
	}
}

// TestLogManyCheckpoints commits through many segment switches and
// checkpoints, with reads in between, and checks that keyd.db ends with
// exactly what was committed, and that both segments stay bounded.
func TestLogManyCheckpoints(t *testing.T) {
	dir := t.TempDir()
	db := openOpts(t, dir, smallLog)
	const n = 2000
	for i := range n {
		now := t0.Add(time.Duration(i) * time.Millisecond)
		b := &Batch{
			Leases: []Lease{lease(fmt.Sprintf("l%05d", i), now)},
			Usage:  []UsageDelta{{Hour: t0, Project: "p", Model: "m", KeyID: "k", Requests: 1}},
		}
		if i%2 == 1 {
			b.DeleteLeases = []string{fmt.Sprintf("l%05d", i-1)}
		}
		commit(t, db, b)
		if i%500 == 0 {
			rows, err := db.Usage(time.Time{}, "")
			if err != nil {
				t.Fatal(err)
			}
			if len(rows) != 1 || rows[0].Requests != int64(i+1) {
				t.Fatalf("after %d commits, usage %+v", i+1, rows)
			}
		}
	}
	if c := db.Stats().Checkpoints; c < 10 {
		t.Errorf("%d checkpoints, want many", c)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		fi, err := os.Stat(filepath.Join(dir, segmentName(i)))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Size() > smallLog.MaxSegmentBytes+growStep {
			t.Errorf("%s is %d bytes", segmentName(i), fi.Size())
		}
	}
	db2 := openOpts(t, dir, Options{})
	st := load(t, db2, time.Time{})
	if len(st.Leases) != n/2 {
		t.Errorf("%d leases, want %d", len(st.Leases), n/2)
	}
	for i, l := range st.Leases {
		if want := fmt.Sprintf("l%05d", 2*i+1); l.ID != want {
			t.Fatalf("lease %d is %s, want %s", i, l.ID, want)
		}
	}
	rows, err := db2.Usage(time.Time{}, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1 || rows[0].Requests != n {
		t.Errorf("usage %+v, want %d requests", rows, n)
	}
}

// TestSchemaOneUpgrades: a version-1 file (before the log) opens and is
// marked the current version, with a store id.
func TestSchemaOneUpgrades(t *testing.T) {
	dir := t.TempDir()
	db, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	commit(t, db, &Batch{Leases: []Lease{lease("old", t0)}})
	db.Close()
	bdb, err := bolt.Open(filepath.Join(dir, FileName), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = bdb.Update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if err := meta.Delete(keyLogSeq); err != nil {
			return err
		}
		if err := meta.Delete(keyStoreID); err != nil {
			return err
		}
		return meta.Put(keySchema, []byte("1"))
	})
	bdb.Close()
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		os.Remove(filepath.Join(dir, segmentName(i)))
	}
	db2 := openOpts(t, dir, Options{})
	if g := leaseIDs(load(t, db2, time.Time{})); g != "old" {
		t.Errorf("leases %q", g)
	}
	db2.Close()
	bdb, err = bolt.Open(filepath.Join(dir, FileName), 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer bdb.Close()
	bdb.View(func(tx *bolt.Tx) error {
		if v := string(tx.Bucket(bucketMeta).Get(keySchema)); v != strconv.Itoa(SchemaVersion) {
			t.Errorf("schema %q after opening a version-1 file", v)
		}
		if id := tx.Bucket(bucketMeta).Get(keyStoreID); len(id) != storeIDLen {
			t.Errorf("store id %x after opening a version-1 file", id)
		}
		return nil
	})
}

// TestLogFullCheckpointFailing: with keyd.db unwritable, the log fills;
// commits then fail at once with the checkpoint's error and the way out,
// and keyd.db is retried once a second, not once per commit.
func TestLogFullCheckpointFailing(t *testing.T) {
	var lines atomic.Int64
	db, err := Open(t.TempDir(), Options{CheckpointBytes: 2 << 10, MaxSegmentBytes: 8 << 10, CheckpointInterval: time.Hour,
		Logf: func(string, ...any) { lines.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	db.bolt.Close() // every checkpoint fails from now on
	var failed int
	for i := 0; failed < 200; i++ {
		if i > 10000 {
			t.Fatal("the log never filled")
		}
		err := db.Commit(context.Background(), &Batch{Leases: []Lease{lease(fmt.Sprintf("l%05d", i), t0)}})
		if err == nil {
			continue
		}
		failed++
		for _, want := range []string{"write-ahead log", "is full, and ", "keyd retries every 1s: free space in"} {
			if !strings.Contains(err.Error(), want) {
				t.Fatalf("error %q lacks %q", err, want)
			}
		}
	}
	if n := lines.Load(); n > 5 {
		t.Errorf("%d log lines for 200 failed commits: the checkpoint was retried per commit", n)
	}
	if err := db.Close(); err == nil {
		t.Error("Close succeeded with records it could not checkpoint")
	}
}
