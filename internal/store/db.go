package store

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/keyd/keyd/api"
)

// DefaultLockTimeout is how long Open waits for the file lock when
// Options.Timeout is zero.
const DefaultLockTimeout = time.Second

// PIDFileName is the lock-holder file written beside the database once it
// is open. It holds the holder's pid and is removed by Close.
const PIDFileName = "keyd.pid"

// dayRetention is how many days of Day rows Prune keeps before the date of
// its before argument.
const dayRetention = 3

// maxGroup bounds the number of batches in one log record.
const maxGroup = 1024

// maxKeptBuf bounds the capacity hint for a log record's buffer.
const maxKeptBuf = 1 << 20

// Options configures Open. The zero value is ready to use.
type Options struct {
	// Timeout bounds the wait for the file lock when another process
	// holds it. Zero means DefaultLockTimeout.
	Timeout time.Duration
	// Logf receives rare diagnostics: a pid file that could not be written
	// or removed, a commit that took more than a second, log records
	// recovered at Open, a failed log write or checkpoint. Nil discards
	// them. It is called from the writer goroutine as well as from Open
	// and Close.
	Logf func(format string, args ...any)
	// OnCommit, when set, is called by the writer goroutine after each
	// log record, failed or not, with how long it took (fsync included):
	// keyd's commit-latency histogram. It must return quickly, as the next
	// record waits for it.
	OnCommit func(took time.Duration)

	// CheckpointBytes, CheckpointInterval and MaxSegmentBytes tune the
	// write-ahead log (see wal.go); zero means DefaultCheckpointBytes,
	// DefaultCheckpointInterval and DefaultMaxSegmentBytes.
	CheckpointBytes    int
	CheckpointInterval time.Duration
	MaxSegmentBytes    int64
}

// LockedError is returned by Open when another process holds the
// database. It wraps ErrLocked.
type LockedError struct {
	Dir string
	// PID is the holder's pid as read from the pid file, 0 if unknown.
	PID int
	// Running reports whether /proc/PID exists here. The pid file is
	// best effort: a holder in another pid namespace, or one that has not
	// written its pid yet, leaves it stale or missing.
	Running bool
}

func (e *LockedError) Error() string {
	switch {
	case e.PID > 0 && e.Running:
		return fmt.Sprintf("state dir %s is in use by another keyd (pid %d): stop it or use another --state-dir", e.Dir, e.PID)
	case e.PID > 0:
		return fmt.Sprintf("state dir %s is in use by another process (%s names pid %d, which is not running here): stop it or use another --state-dir", e.Dir, PIDFileName, e.PID)
	default:
		return fmt.Sprintf("state dir %s is in use by another process: stop it or use another --state-dir", e.Dir)
	}
}

func (e *LockedError) Unwrap() error { return ErrLocked }

// SchemaError is returned by Open for a file written by a newer keyd. It
// wraps ErrNewerSchema.
type SchemaError struct {
	Path    string
	Version int
}

func (e *SchemaError) Error() string {
	dir := filepath.Dir(e.Path)
	return fmt.Sprintf("%s has schema version %d, this keyd understands up to %d: upgrade keyd, or move %s, %s and %s out of %s to start with an empty state",
		e.Path, e.Version, SchemaVersion, FileName, segmentName(0), segmentName(1), dir)
}

func (e *SchemaError) Unwrap() error { return ErrNewerSchema }

// Stats counts the work of the group-commit writer since Open.
type Stats struct {
	Commits      uint64 // batches made durable
	Transactions uint64 // log records (one write and one fdatasync each) that carried them
	Failed       uint64 // batches whose record failed
	Checkpoints  uint64 // bbolt transactions that moved log records into keyd.db
}

// Bucket names and the schema key.
var (
	bucketMeta    = []byte("meta")
	bucketLeases  = []byte("leases")
	bucketBuckets = []byte("buckets")
	bucketKeys    = []byte("keys")
	bucketDays    = []byte("days")
	bucketUsage   = []byte("usage")
	keySchema     = []byte("schema")
	keyStoreID    = []byte("store_id") // the store id, storeIDLen bytes (wal.go)
	allBuckets    = [][]byte{bucketMeta, bucketLeases, bucketBuckets, bucketKeys, bucketDays, bucketUsage}
)

// DB is the bbolt implementation of Store. It holds an exclusive lock on
// DIR/keyd.db from Open to Close.
//
// All methods are safe for concurrent use. Values returned by Load and
// Usage are fresh copies owned by the caller; nothing returned refers to
// the database's memory. Commit does not retain its Batch after it
// returns, except when it returns a context error (see Commit).
type DB struct {
	bolt     *bolt.DB
	dir      string
	path     string
	pidPath  string // "" when the pid file was not written
	logf     func(string, ...any)
	onCommit func(time.Duration) // Options.OnCommit; nil for none

	reqs       chan *request
	writerDone chan struct{}

	// mu guards closed and the sending side of reqs: Commit sends under
	// RLock, Close closes reqs under Lock.
	mu     sync.RWMutex
	closed bool

	closeOnce sync.Once
	closeErr  error

	commits, txs, failed, checkpoints atomic.Uint64

	// Owned by the writer goroutine (and by Open before it starts).
	segs       [2]*segment
	id         []byte   // the store id, first in each segment pass
	active     int      // the segment appended to
	off        int64    // where the next record goes in it
	seq        uint64   // the last record written (or applied, after Open)
	cur        *pending // the records of the active segment's pass
	enc        encoder
	recCap     int   // capacity hint for the next record's buffer
	broken     error // set once a log write failed; see errLogBroken
	waiting    []*request
	ckptDone   chan *ckptJob
	ckptBytes  int
	ckptEvery  time.Duration
	maxSegment int64
	// ckptRunning: a job runs in the background; retry: the records of a
	// failed checkpoint, whose segment stays in use until they are in
	// keyd.db.
	ckptRunning bool
	retry       *pending
	retryErr    error
	retryAt     time.Time
	finishErr   error // what the last checkpoint at Close failed with

	// stallHook, set only by tests, runs in the writer before each group.
	stallHook atomic.Pointer[func()]
}

var requestPool = sync.Pool{New: func() any { return &request{done: make(chan error, 1)} }}

var _ Store = (*DB)(nil)

// Open opens or creates DIR/keyd.db (mode 0600, DIR created 0700) and
// starts its writer. It fails with an error wrapping ErrLocked (a
// *LockedError) when another process holds the file for longer than
// opts.Timeout, and with one wrapping ErrNewerSchema (a *SchemaError) when
// the file was written by a newer keyd. It refuses, leaving the log as it
// is, a write-ahead log whose store id is not keyd.db's (keyd.db deleted
// and recreated, or replaced by another store's), and a damaged log
// (wal.go).
// It upgrades a file of an older schema in place. Once open, it writes
// the pid file DIR/keyd.pid. The caller must Close the DB.
func Open(dir string, opts Options) (*DB, error) {
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	timeout := opts.Timeout
	if timeout <= 0 {
		timeout = DefaultLockTimeout
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating state dir: %w", err)
	}
	path := filepath.Join(dir, FileName)
	bdb, err := bolt.Open(path, 0o600, &bolt.Options{
		Timeout: timeout,
		// The freelist is rebuilt by scanning at open instead of being
		// written by every commit; FreelistMapType keeps allocation cheap.
		NoFreelistSync: true,
		FreelistType:   bolt.FreelistMapType,
	})
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, lockedError(dir)
	}
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", path, err)
	}
	info, err := initSchema(bdb, path)
	if err != nil {
		bdb.Close()
		return nil, err
	}
	segs, err := openSegments(dir)
	if err != nil {
		bdb.Close()
		return nil, err
	}
	seq, n, err := recoverLog(bdb, segs, info)
	if err != nil {
		closeSegments(segs)
		bdb.Close()
		if fe := (*foreignLogError)(nil); errors.As(err, &fe) {
			return nil, err // it names the state dir and both files
		}
		return nil, fmt.Errorf("recovering %s: %w", path, err)
	}
	if n > 0 {
		logf("store: applied %d write-ahead log records (up to %d) to %s", n, seq, path)
	}
	if info.id == nil {
		if info.id, err = upgradeLog(bdb, segs); err != nil {
			closeSegments(segs)
			bdb.Close()
			return nil, fmt.Errorf("upgrading %s to schema version %d: %w", path, SchemaVersion, err)
		}
		logf("store: upgraded %s to schema version %d (store id %x)", path, SchemaVersion, info.id)
	}
	db := &DB{
		bolt:       bdb,
		dir:        dir,
		path:       path,
		logf:       logf,
		onCommit:   opts.OnCommit,
		reqs:       make(chan *request, 256),
		writerDone: make(chan struct{}),
		segs:       segs,
		id:         info.id,
		seq:        seq,
		cur:        newPending(),
		recCap:     4 << 10,
		ckptDone:   make(chan *ckptJob, 1),
		ckptBytes:  cmp.Or(opts.CheckpointBytes, DefaultCheckpointBytes),
		ckptEvery:  cmp.Or(opts.CheckpointInterval, DefaultCheckpointInterval),
		maxSegment: cmp.Or(opts.MaxSegmentBytes, DefaultMaxSegmentBytes),
	}
	pidPath := filepath.Join(dir, PIDFileName)
	if err := writePIDFile(pidPath); err != nil {
		logf("store: writing pid file: %v", err)
	} else {
		db.pidPath = pidPath
	}
	go db.run()
	return db, nil
}

// lockedError describes the holder of dir's lock from its pid file.
func lockedError(dir string) error {
	e := &LockedError{Dir: dir}
	b, err := os.ReadFile(filepath.Join(dir, PIDFileName))
	if err != nil {
		return e
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return e
	}
	e.PID = pid
	_, err = os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	e.Running = err == nil
	return e
}

// writePIDFile replaces path atomically so that a reader never sees a
// partial pid.
func writePIDFile(path string) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// initSchema refuses a newer file, then creates the buckets, the store id
// and the schema version of a new one. It returns keyd.db's identity:
// for a schema 2 file no id yet, as its log has none (Open gives it one
// with upgradeLog once the log is recovered).
func initSchema(bdb *bolt.DB, path string) (storeInfo, error) {
	version := 0
	var id []byte
	err := bdb.View(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if meta == nil {
			return nil
		}
		v := meta.Get(keySchema)
		if v == nil {
			return nil
		}
		n, err := strconv.Atoi(string(v))
		if err != nil || n < 1 {
			return fmt.Errorf("%s has an invalid schema version %q", path, v)
		}
		version = n
		id = bytes.Clone(meta.Get(keyStoreID))
		return nil
	})
	if err != nil {
		return storeInfo{}, err
	}
	if version > SchemaVersion {
		return storeInfo{}, &SchemaError{Path: path, Version: version}
	}
	if version == SchemaVersion && len(id) != storeIDLen {
		dir := filepath.Dir(path)
		return storeInfo{}, fmt.Errorf("%s is damaged: its store id (meta/%s) is %d bytes, want %d; restore it from a backup, or move %s, %s and %s out of %s to start with an empty state",
			path, keyStoreID, len(id), storeIDLen, FileName, segmentName(0), segmentName(1), dir)
	}
	info := storeInfo{id: id, created: version == 0}
	switch version {
	case 0, 1:
		// Version 1 had no write-ahead log: its meta/log_seq is absent,
		// read as 0, and no log can belong to it; like a new file it
		// gets its id at once.
		info.id = newStoreID()
	case 2:
		info.id = nil
	}
	// Future migrations go here.
	err = bdb.Update(func(tx *bolt.Tx) error {
		for _, name := range allBuckets {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		if version < 2 {
			meta := tx.Bucket(bucketMeta)
			if err := meta.Put(keyStoreID, info.id); err != nil {
				return err
			}
			return meta.Put(keySchema, []byte(strconv.Itoa(SchemaVersion)))
		}
		return nil
	})
	if err != nil {
		return storeInfo{}, fmt.Errorf("initializing %s: %w", path, err)
	}
	return info, nil
}

// Commit makes b durable: it returns nil once the log record carrying b
// has been written and fdatasynced. Concurrent Commits share records
// (group commit); batches are applied in the order they were enqueued, so
// the Commits of one goroutine are applied in call order. Within one
// Batch, puts are applied before deletes, in the order of the Batch's
// fields (leases, buckets, keys, days, usage). What reaches keyd.db is the
// net effect: the last value of each row, usage deltas added up.
//
// If the record cannot be written, every batch in it gets the error and
// the log stops: every later Commit fails too (errLogBroken), because
// after a failed write or fsync the file's contents are unknown; keyd
// must restart, and recovers what is on disk. A batch that cannot be
// stored (an empty ID, a NUL in a name, a time outside years 0-9999) is
// refused with an error before it is enqueued, so it cannot fail the
// others.
//
// ctx only bounds the wait. If ctx is done before b is enqueued, Commit
// returns ctx.Err() and b is not applied. If ctx ends while b is queued
// or being written, Commit returns ctx.Err() at once but b may still be
// applied, by the writer or by Close; the store may read b until then, so
// the caller must not modify b after such a return.
//
// Commit after Close returns ErrClosed.
func (db *DB) Commit(ctx context.Context, b *Batch) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return db.Submit(b).Wait(ctx)
}

// Pending is a batch handed to the writer, not yet known to be durable.
// Wait must be called exactly once.
type Pending struct {
	r   *request
	err error // set when the batch was refused before it was queued
}

// Done returns a Pending whose Wait returns err at once, for backends
// that commit synchronously and for tests.
func Done(err error) *Pending { return &Pending{err: err} }

// Submit queues b for the next group commit and returns without waiting
// for it: batches submitted one after another are applied in that order,
// so a caller that submits while holding its own lock keeps its state
// changes and their records in the same order. It blocks only while the
// writer's queue is full.
func (db *DB) Submit(b *Batch) *Pending {
	if err := validate(b); err != nil {
		return &Pending{err: err}
	}
	r := requestPool.Get().(*request)
	r.b = b
	db.mu.RLock()
	defer db.mu.RUnlock()
	if db.closed {
		r.b = nil
		requestPool.Put(r)
		return &Pending{err: ErrClosed}
	}
	db.reqs <- r
	return &Pending{r: r}
}

// Wait returns once the batch is durable (nil) or failed. If ctx ends
// first it returns ctx.Err() at once, and the batch may still be applied.
func (p *Pending) Wait(ctx context.Context) error {
	if p.r == nil {
		return p.err
	}
	r := p.r
	select {
	case err := <-r.done:
		r.b = nil
		requestPool.Put(r)
		return err
	case <-ctx.Done():
		// The writer still owns r and will answer into its buffered
		// channel; r is left to the garbage collector.
		return ctx.Err()
	}
}

// validate rejects what bbolt or the key encoding cannot store, so that
// one bad batch cannot fail a whole group.
func validate(b *Batch) error {
	if b == nil {
		return errors.New("store: nil batch")
	}
	for i := range b.Leases {
		l := &b.Leases[i]
		if l.ID == "" {
			return errors.New("store: lease with an empty ID")
		}
		if !validTime(l.GrantedAt) || !validTime(l.ExpiresAt) || !validTime(l.ReportedAt) {
			return fmt.Errorf("store: lease %q has a time outside years 0-9999", l.ID)
		}
	}
	for _, id := range b.DeleteLeases {
		if id == "" {
			return errors.New("store: delete of an empty lease ID")
		}
	}
	for i := range b.Buckets {
		if err := checkNames(b.Buckets[i].Project, b.Buckets[i].Model); err != nil {
			return err
		}
		if !validTime(b.Buckets[i].Until) {
			return errors.New("store: bucket time outside years 0-9999")
		}
	}
	for _, k := range b.DeleteBuckets {
		if err := checkNames(k.Project, k.Model); err != nil {
			return err
		}
	}
	for i := range b.Keys {
		if b.Keys[i].KeyID == "" {
			return errors.New("store: key with an empty ID")
		}
		if !validTime(b.Keys[i].At) {
			return errors.New("store: key time outside years 0-9999")
		}
	}
	for _, id := range b.DeleteKeys {
		if id == "" {
			return errors.New("store: delete of an empty key ID")
		}
	}
	for i := range b.Days {
		d := &b.Days[i]
		if err := checkNames(d.Project, d.Model, d.Day); err != nil {
			return err
		}
	}
	for i := range b.Usage {
		u := &b.Usage[i]
		if err := checkNames(u.Project, u.Model, u.KeyID); err != nil {
			return err
		}
	}
	return nil
}

func checkNames(names ...string) error {
	n := 0
	for _, s := range names {
		if strings.IndexByte(s, 0) >= 0 {
			return fmt.Errorf("store: name %q contains NUL", s)
		}
		n += len(s) + 1
	}
	if n > bolt.MaxKeySize-16 {
		return errors.New("store: names too long")
	}
	return nil
}

// counters is the value of a usage row; its key holds hour and names.
type counters struct {
	Requests     int64 `json:"requests,omitempty"`
	PromptTokens int64 `json:"prompt_tokens,omitempty"`
	OutputTokens int64 `json:"output_tokens,omitempty"`
	RateMinute   int64 `json:"rate_minute,omitempty"`
	RateDay      int64 `json:"rate_day,omitempty"`
	Other429     int64 `json:"other_429,omitempty"`
	Errors       int64 `json:"errors,omitempty"`
	Unused       int64 `json:"unused,omitempty"`
}

// add adds d to c.
func (c *counters) add(d *counters) {
	c.Requests += d.Requests
	c.PromptTokens += d.PromptTokens
	c.OutputTokens += d.OutputTokens
	c.RateMinute += d.RateMinute
	c.RateDay += d.RateDay
	c.Other429 += d.Other429
	c.Errors += d.Errors
	c.Unused += d.Unused
}

// appendNames appends names joined by NUL (validate rejects NUL in names,
// so the encoding is unambiguous and sorts like the tuple).
func appendNames(dst []byte, names ...string) []byte {
	for i, s := range names {
		if i > 0 {
			dst = append(dst, 0)
		}
		dst = append(dst, s...)
	}
	return dst
}

// appendHour appends t truncated to the hour as 8 big-endian bytes of Unix
// seconds with the sign bit flipped, so that byte order is time order.
func appendHour(dst []byte, t time.Time) []byte {
	return binary.BigEndian.AppendUint64(dst, uint64(t.Truncate(time.Hour).Unix())^(1<<63))
}

func appendUnix(dst []byte, sec int64) []byte {
	return binary.BigEndian.AppendUint64(dst, uint64(sec)^(1<<63))
}

func parseHour(k []byte) time.Time {
	return time.Unix(int64(binary.BigEndian.Uint64(k)^(1<<63)), 0).UTC()
}

// view runs fn in a read-only transaction, mapping a closed bbolt DB to
// ErrClosed.
func (db *DB) view(fn func(*bolt.Tx) error) error {
	err := db.bolt.View(fn)
	if errors.Is(err, berrors.ErrDatabaseNotOpen) {
		return ErrClosed
	}
	return err
}

// Load returns the leases granted or reported at or after since in grant
// order (GrantedAt, then ID), every bucket and key record in key order, and the
// Day rows whose Day is one of days. The result is a copy owned by the
// caller.
func (db *DB) Load(since time.Time, days []string) (*State, error) {
	if err := db.control(&control{}); err != nil {
		return nil, err
	}
	st := &State{}
	err := db.view(func(tx *bolt.Tx) error {
		err := tx.Bucket(bucketLeases).ForEach(func(k, v []byte) error {
			var l Lease
			if err := json.Unmarshal(v, &l); err != nil {
				return fmt.Errorf("lease %q: %w", k, err)
			}
			if !l.GrantedAt.Before(since) || l.Reported && !l.ReportedAt.Before(since) {
				st.Leases = append(st.Leases, l)
			}
			return nil
		})
		if err != nil {
			return err
		}
		err = tx.Bucket(bucketBuckets).ForEach(func(k, v []byte) error {
			var b Bucket
			if err := json.Unmarshal(v, &b); err != nil {
				return fmt.Errorf("bucket %q: %w", k, err)
			}
			st.Buckets = append(st.Buckets, b)
			return nil
		})
		if err != nil {
			return err
		}
		err = tx.Bucket(bucketKeys).ForEach(func(k, v []byte) error {
			var x Key
			if err := json.Unmarshal(v, &x); err != nil {
				return fmt.Errorf("key %q: %w", k, err)
			}
			st.Keys = append(st.Keys, x)
			return nil
		})
		if err != nil {
			return err
		}
		if len(days) == 0 {
			return nil
		}
		return tx.Bucket(bucketDays).ForEach(func(k, v []byte) error {
			// The day is the key's last field.
			day := k[bytes.LastIndexByte(k, 0)+1:]
			if !slices.Contains(days, string(day)) {
				return nil
			}
			var d Day
			if err := json.Unmarshal(v, &d); err != nil {
				return fmt.Errorf("day %q: %w", k, err)
			}
			st.Days = append(st.Days, d)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	slices.SortStableFunc(st.Leases, func(a, b Lease) int {
		if c := a.GrantedAt.Compare(b.GrantedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return st, nil
}

// Usage returns the hourly rows with Hour >= since, only those of keyID
// when it is not empty, sorted by hour, project, model and key. Hours are
// in UTC. The result is a copy owned by the caller.
func (db *DB) Usage(since time.Time, keyID string) ([]api.UsageRow, error) {
	if err := db.control(&control{}); err != nil {
		return nil, err
	}
	var rows []api.UsageRow
	err := db.view(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketUsage).Cursor()
		for k, v := c.Seek(appendUnix(nil, since.Unix())); k != nil; k, v = c.Next() {
			if len(k) < 8 {
				return fmt.Errorf("usage key %q too short", k)
			}
			hour := parseHour(k)
			if hour.Before(since) {
				continue
			}
			names := strings.Split(string(k[8:]), "\x00")
			if len(names) != 3 {
				return fmt.Errorf("usage key %q malformed", k)
			}
			if keyID != "" && names[2] != keyID {
				continue
			}
			var cn counters
			if err := json.Unmarshal(v, &cn); err != nil {
				return fmt.Errorf("usage row %q: %w", k, err)
			}
			rows = append(rows, api.UsageRow{
				Hour:         hour,
				Project:      names[0],
				Model:        names[1],
				KeyID:        names[2],
				Requests:     cn.Requests,
				PromptTokens: cn.PromptTokens,
				OutputTokens: cn.OutputTokens,
				RateMinute:   cn.RateMinute,
				RateDay:      cn.RateDay,
				Other429:     cn.Other429,
				Errors:       cn.Errors,
				Unused:       cn.Unused,
			})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	// Key order is already this order; sorting keeps the promise
	// independent of the encoding.
	slices.SortStableFunc(rows, func(a, b api.UsageRow) int {
		if c := a.Hour.Compare(b.Hour); c != 0 {
			return c
		}
		if c := strings.Compare(a.Project, b.Project); c != 0 {
			return c
		}
		if c := strings.Compare(a.Model, b.Model); c != 0 {
			return c
		}
		return strings.Compare(a.KeyID, b.KeyID)
	})
	return rows, nil
}

// Prune deletes the unreported leases granted before `before` and the
// reported leases reported before reportedBefore, the usage rows of hours before usageBefore, and
// the Day rows dated more than three days before before's date (in
// before's location). The writer runs it in the checkpoint that moves
// every batch committed before Prune was called into keyd.db, so it is
// ordered after them; Commit goes on meanwhile. After Close it returns
// ErrClosed.
func (db *DB) Prune(before, reportedBefore, usageBefore time.Time) error {
	// The error names keyd.db already (see apply).
	return db.control(&control{prune: &pruneArgs{before: before, reportedBefore: reportedBefore, usageBefore: usageBefore}})
}

// control sends c to the writer and waits for its answer: nil once every
// batch committed before the call is in keyd.db (and the prune, if any,
// is done).
func (db *DB) control(c *control) error {
	r := &request{ctl: c, done: make(chan error, 1)}
	db.mu.RLock()
	if db.closed {
		db.mu.RUnlock()
		return ErrClosed
	}
	db.reqs <- r
	db.mu.RUnlock()
	return <-r.done
}

func prune(tx *bolt.Tx, a *pruneArgs) error {
	before, usageBefore := a.before, a.usageBefore
	dayCutoff := before.AddDate(0, 0, -dayRetention).Format(time.DateOnly)
	var del [][]byte
	err := tx.Bucket(bucketLeases).ForEach(func(k, v []byte) error {
		var l struct {
			GrantedAt  time.Time `json:"granted"`
			ReportedAt time.Time `json:"reported_at"` // zero while unreported
		}
		if err := json.Unmarshal(v, &l); err != nil {
			return fmt.Errorf("lease %q: %w", k, err)
		}
		// A reported lease is kept for its answer, from its report; an
		// unreported one for a late report, from its grant.
		if l.ReportedAt.IsZero() && l.GrantedAt.Before(before) || !l.ReportedAt.IsZero() && l.ReportedAt.Before(a.reportedBefore) {
			del = append(del, bytes.Clone(k))
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := deleteKeys(tx.Bucket(bucketLeases), del); err != nil {
		return err
	}

	del = del[:0]
	c := tx.Bucket(bucketUsage).Cursor()
	for k, _ := c.First(); k != nil && len(k) >= 8 && parseHour(k).Before(usageBefore); k, _ = c.Next() {
		del = append(del, bytes.Clone(k))
	}
	if err := deleteKeys(tx.Bucket(bucketUsage), del); err != nil {
		return err
	}

	del = del[:0]
	err = tx.Bucket(bucketDays).ForEach(func(k, _ []byte) error {
		if string(k[bytes.LastIndexByte(k, 0)+1:]) < dayCutoff {
			del = append(del, bytes.Clone(k))
		}
		return nil
	})
	if err != nil {
		return err
	}
	return deleteKeys(tx.Bucket(bucketDays), del)
}

func deleteKeys(bk *bolt.Bucket, keys [][]byte) error {
	for _, k := range keys {
		if err := bk.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

// Stats returns the writer's counters.
func (db *DB) Stats() Stats {
	return Stats{Commits: db.commits.Load(), Transactions: db.txs.Load(), Failed: db.failed.Load(),
		Checkpoints: db.checkpoints.Load()}
}

// Path returns the database file's path.
func (db *DB) Path() string { return db.path }

// Close commits the batches already enqueued, stops the writer, moves
// every logged record into keyd.db, removes the pid file and closes the
// files, releasing the lock. If that last checkpoint fails, Close says so
// and the records stay in the log for the next Open. Commits that start
// after Close has begun return ErrClosed, as do Load, Usage and Prune once
// it has. Close is idempotent and safe to call concurrently; every call
// returns the first call's result once the DB is closed.
func (db *DB) Close() error {
	db.closeOnce.Do(func() {
		db.mu.Lock()
		db.closed = true
		close(db.reqs)
		db.mu.Unlock()
		<-db.writerDone
		// Remove the pid file while the lock is still held, so as not to
		// remove the next holder's.
		if db.pidPath != "" {
			if err := os.Remove(db.pidPath); err != nil && !errors.Is(err, os.ErrNotExist) {
				db.logf("store: removing pid file: %v", err)
			}
		}
		db.closeErr = errors.Join(db.finishErr, closeSegments(db.segs), db.bolt.Close())
	})
	return db.closeErr
}
