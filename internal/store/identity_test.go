package store

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// readLogFiles returns the contents of dir's two segments.
func readLogFiles(t *testing.T, dir string) [2][]byte {
	t.Helper()
	var b [2][]byte
	for i := range b {
		var err error
		if b[i], err = os.ReadFile(filepath.Join(dir, segmentName(i))); err != nil {
			t.Fatal(err)
		}
	}
	return b
}

// refused checks that Open(dir) fails with exactly want, leaves the log
// files as they were and writes no pid file.
func refused(t *testing.T, dir, want string) {
	t.Helper()
	before := readLogFiles(t, dir)
	db, err := Open(dir, Options{Logf: t.Logf})
	if err == nil {
		db.Close()
		t.Fatal("Open succeeded with a log of another keyd.db")
	}
	if err.Error() != want {
		t.Errorf("error\n %q\nwant\n %q", err, want)
	}
	after := readLogFiles(t, dir)
	for i := range after {
		if !bytes.Equal(before[i], after[i]) {
			t.Errorf("the refused Open changed %s", segmentName(i))
		}
	}
	if _, err := os.Stat(filepath.Join(dir, PIDFileName)); !os.IsNotExist(err) {
		t.Errorf("pid file left by a refused Open: %v", err)
	}
}

func foreignMsg(dir, detail string) string {
	return fmt.Sprintf("state dir %s: keyd.0.wal belongs to another keyd.db (%s): restore the keyd.db that belongs with it, "+
		"or move keyd.0.wal and keyd.1.wal out of %s to start from keyd.db alone", dir, detail, dir)
}

// commitLeases commits one batch per id, each with its lease and one
// usage request.
func commitLeases(t *testing.T, db *DB, ids ...string) {
	t.Helper()
	for i, id := range ids {
		commit(t, db, &Batch{
			Leases: []Lease{lease(id, t0.Add(time.Duration(i)*time.Second))},
			Usage:  []UsageDelta{{Hour: t0, Project: "p", Model: "m", KeyID: "k", Requests: 1}},
		})
	}
}

// TestLogOfDeletedDB: keyd.db deleted while its log remains, the log
// starting at record 1. Open used to create a new keyd.db and replay the
// log into it; it must refuse, naming both store ids, and leave the log
// alone. Restoring keyd.db, as the error says, works.
func TestLogOfDeletedDB(t *testing.T) {
	dir := t.TempDir()
	db := openOpts(t, dir, Options{})
	commitLeases(t, db, "a", "b", "c")
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	idA := storeIDOf(t, dir)
	if len(idA) != storeIDLen {
		t.Fatalf("store id %x", idA)
	}
	// The log still starts at record 1: nothing but the ids tells it
	// from a log of the new keyd.db.
	if recs, _, err := readSegment(mustSegments(t, dir)[0], 0); err != nil || len(recs) != 3 || recs[0].seq != 1 {
		t.Fatalf("segment 0 holds %d records from %v (%v), want 3 from 1", len(recs), recs, err)
	}
	saved, err := os.ReadFile(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, FileName)); err != nil {
		t.Fatal(err)
	}

	// The refused Open leaves the keyd.db it created; its id is in the
	// error.
	before := readLogFiles(t, dir)
	db, err = Open(dir, Options{})
	if err == nil {
		db.Close()
		t.Fatal("Open replayed the log into a new keyd.db")
	}
	idB := storeIDOf(t, dir)
	if want := foreignMsg(dir, fmt.Sprintf("store id %x, keyd.db has %x and was created just now", idA, idB)); err.Error() != want {
		t.Errorf("error\n %q\nwant\n %q", err, want)
	}
	after := readLogFiles(t, dir)
	for i := range after {
		if !bytes.Equal(before[i], after[i]) {
			t.Errorf("the refused Open changed %s", segmentName(i))
		}
	}
	if bytes.Equal(idA, idB) {
		t.Fatal("the new keyd.db has the old one's id")
	}
	// Again, now that keyd.db exists.
	refused(t, dir, foreignMsg(dir, fmt.Sprintf("store id %x, keyd.db has %x", idA, idB)))

	// The way out: the keyd.db that belongs with the log.
	if err := os.WriteFile(filepath.Join(dir, FileName), saved, 0o600); err != nil {
		t.Fatal(err)
	}
	db2 := openOpts(t, dir, Options{})
	if g, w := leaseIDs(load(t, db2, time.Time{})), "a,b,c"; g != w {
		t.Errorf("leases %s, want %s", g, w)
	}
}

// mustSegments opens dir's segments for reading; they are closed at the
// end of the test.
func mustSegments(t *testing.T, dir string) [2]*segment {
	t.Helper()
	segs, err := openSegments(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeSegments(segs) })
	return segs
}

// TestLogOfAnotherDB: keyd.db of store X beside the log of store Y is
// refused whether Y's log is behind X's keyd.db (its records would have
// been skipped, then overwritten) or ahead of it (they would have been
// applied to X). Moving the log away, as the error says, starts from
// X's keyd.db alone.
func TestLogOfAnotherDB(t *testing.T) {
	for _, tc := range []struct {
		name   string
		nx, ny int // records committed to X and to Y
	}{
		{"log behind keyd.db", 5, 2},
		{"log ahead of keyd.db", 2, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x, y := t.TempDir(), t.TempDir()
			var xIDs []string
			for i := range tc.nx {
				xIDs = append(xIDs, "x"+strconv.Itoa(i))
			}
			for dir, n := range map[string]int{x: tc.nx, y: tc.ny} {
				db, err := Open(dir, Options{})
				if err != nil {
					t.Fatal(err)
				}
				prefix := "x"
				if dir == y {
					prefix = "y"
				}
				for i := range n {
					commitLeases(t, db, prefix+strconv.Itoa(i))
				}
				if err := db.Close(); err != nil {
					t.Fatal(err)
				}
			}
			for i := range 2 {
				b, err := os.ReadFile(filepath.Join(y, segmentName(i)))
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(x, segmentName(i)), b, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			refused(t, x, foreignMsg(x, fmt.Sprintf("store id %x, keyd.db has %x", storeIDOf(t, y), storeIDOf(t, x))))

			moved := t.TempDir()
			for i := range 2 {
				if err := os.Rename(filepath.Join(x, segmentName(i)), filepath.Join(moved, segmentName(i))); err != nil {
					t.Fatal(err)
				}
			}
			db := openOpts(t, x, Options{})
			if g, w := leaseIDs(load(t, db, time.Time{})), strings.Join(xIDs, ","); g != w {
				t.Errorf("leases %s, want %s", g, w)
			}
			// The new log carries X's id: a crash now recovers.
			commitLeases(t, db, "xlater") // sorts after x0…x4 at the same grant time
			db2 := openOpts(t, crashImage(t, x), Options{})
			if g, w := leaseIDs(load(t, db2, time.Time{})), strings.Join(append(xIDs, "xlater"), ","); g != w {
				t.Errorf("after a crash: leases %s, want %s", g, w)
			}
		})
	}
}

// makeSchemaTwo turns dir's keyd.db (closed) into what keyd of schema 2
// wrote: no store id, schema version 2, every record up to applied in it;
// and its log into seqs, without ids.
func makeSchemaTwo(t *testing.T, dir string, applied uint64, seqs [2][]uint64) {
	t.Helper()
	bdb, err := bolt.Open(filepath.Join(dir, FileName), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = bdb.Update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if err := meta.Delete(keyStoreID); err != nil {
			return err
		}
		if err := putSeq(tx, applied); err != nil {
			return err
		}
		return meta.Put(keySchema, []byte("2"))
	})
	bdb.Close()
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if err := os.Remove(filepath.Join(dir, segmentName(i))); err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
	}
	writeLog(t, dir, nil, seqs)
}

// TestSchemaTwoUpgrades: a schema 2 state dir, whose log has records
// keyd.db lacks and no store ids, opens: the records are applied, the
// log is emptied and keyd.db gets an id and the current version. The
// records written after the upgrade carry the id, so a crash then
// recovers them.
func TestSchemaTwoUpgrades(t *testing.T) {
	dir := t.TempDir()
	db, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	commitLeases(t, db, "old")
	db.Close()
	// Record 1 ("old") is in keyd.db; 2 and 3 only in the log, and
	// segment 1 holds an older pass.
	makeSchemaTwo(t, dir, 1, [2][]uint64{{2, 3}, {1}})

	var upgraded bool
	db2, err := Open(dir, Options{Logf: func(f string, a ...any) {
		t.Logf(f, a...)
		upgraded = upgraded || strings.Contains(f, "upgraded")
	}})
	if err != nil {
		t.Fatalf("Open of a schema 2 dir: %v", err)
	}
	if !upgraded {
		t.Error("no log line says keyd.db was upgraded")
	}
	if g, w := leaseIDs(load(t, db2, time.Time{})), "old,s2,s3"; g != w {
		t.Errorf("leases %s, want %s", g, w)
	}
	if err := db2.Close(); err != nil {
		t.Fatal(err)
	}
	id := storeIDOf(t, dir)
	if len(id) != storeIDLen {
		t.Fatalf("store id %x after the upgrade", id)
	}
	bdb, err := bolt.Open(filepath.Join(dir, FileName), 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	bdb.View(func(tx *bolt.Tx) error {
		if v := string(tx.Bucket(bucketMeta).Get(keySchema)); v != strconv.Itoa(SchemaVersion) {
			t.Errorf("schema %q after the upgrade", v)
		}
		return nil
	})
	bdb.Close()
	// No record without an id is left.
	segs := mustSegments(t, dir)
	for i, s := range segs {
		if recs, after, err := readSegment(s, i); err != nil || len(recs) != 0 || after != 0 {
			t.Errorf("%s after the upgrade: %d records, %d after them, %v", segmentName(i), len(recs), after, err)
		}
	}
	closeSegments(segs)

	db3 := openOpts(t, dir, noCheckpoint)
	commitLeases(t, db3, "new")
	img := crashImage(t, dir)
	db4 := openOpts(t, img, Options{})
	if g, w := leaseIDs(load(t, db4, time.Time{})), "new,old,s2,s3"; g != w {
		t.Errorf("after a crash: leases %s, want %s", g, w)
	}
}

// TestLogIDMismatchSchemaTwo: the two mixes across the upgrade are
// refused too: a schema 2 keyd.db beside a log with an id, a keyd.db
// with an id beside a log without one.
func TestLogIDMismatchSchemaTwo(t *testing.T) {
	t.Run("schema 2 keyd.db, log with an id", func(t *testing.T) {
		dir := t.TempDir()
		db, err := Open(dir, Options{})
		if err != nil {
			t.Fatal(err)
		}
		commitLeases(t, db, "a")
		db.Close()
		logs := readLogFiles(t, dir)
		id := storeIDOf(t, dir)
		makeSchemaTwo(t, dir, 1, [2][]uint64{})
		for i, b := range logs {
			if err := os.WriteFile(filepath.Join(dir, segmentName(i)), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		refused(t, dir, foreignMsg(dir, fmt.Sprintf("store id %x, keyd.db has none: a keyd older than store ids wrote it", id)))
	})
	t.Run("keyd.db with an id, log without", func(t *testing.T) {
		dir := t.TempDir()
		db, err := Open(dir, Options{})
		if err != nil {
			t.Fatal(err)
		}
		db.Close()
		for i := range 2 {
			os.Remove(filepath.Join(dir, segmentName(i)))
		}
		writeLog(t, dir, nil, [2][]uint64{{1, 2}})
		refused(t, dir, foreignMsg(dir, fmt.Sprintf("it has no store id, so a keyd older than store ids wrote it; keyd.db has %x", storeIDOf(t, dir))))
	})
}

// TestFreshAndOldDirsOpen: a dir with keyd.db but no log (keyd before
// the log, or logs moved away) opens and keeps its store id.
func TestFreshAndOldDirsOpen(t *testing.T) {
	dir := t.TempDir()
	db := openOpts(t, dir, Options{})
	commitLeases(t, db, "a")
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	id := storeIDOf(t, dir)
	for i := range 2 {
		if err := os.Remove(filepath.Join(dir, segmentName(i))); err != nil {
			t.Fatal(err)
		}
	}
	db2 := openOpts(t, dir, Options{})
	if g := leaseIDs(load(t, db2, time.Time{})); g != "a" {
		t.Errorf("leases %q", g)
	}
	db2.Close()
	if got := storeIDOf(t, dir); !bytes.Equal(got, id) {
		t.Errorf("store id %x after reopening, was %x", got, id)
	}
}
