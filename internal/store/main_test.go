package store

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	if dir := os.Getenv(crashHelperEnv); dir != "" {
		crashHelper(dir) // never returns
	}
	goleak.VerifyTestMain(m)
}

// openTest opens a DB in dir (a fresh t.TempDir() when dir is ""). On
// cleanup it closes the DB, reopens the file read-only and runs bbolt's
// consistency check.
func openTest(t testing.TB, dir string) (*DB, string) {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	db, err := Open(dir, Options{Logf: t.Logf})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := db.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		checkFile(t, dir)
	})
	return db, dir
}

// checkFile runs tx.Check on dir's database, which must not be open.
func checkFile(t testing.TB, dir string) {
	t.Helper()
	bdb, err := bolt.Open(filepath.Join(dir, FileName), 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Errorf("reopening read-only: %v", err)
		return
	}
	defer bdb.Close()
	err = bdb.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			t.Errorf("tx.Check: %v", err)
		}
		return nil
	})
	if err != nil {
		t.Errorf("View: %v", err)
	}
}
