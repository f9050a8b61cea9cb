package store

import (
	"bytes"
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

// maxGroup bounds the number of batches in one transaction.
const maxGroup = 1024

// maxKeptBuf bounds the value buffer the writer keeps between transactions.
const maxKeptBuf = 1 << 20

// Options configures Open. The zero value is ready to use.
type Options struct {
	// Timeout bounds the wait for the file lock when another process
	// holds it. Zero means DefaultLockTimeout.
	Timeout time.Duration
	// Logf receives rare diagnostics: a pid file that could not be written
	// or removed, a transaction that took more than a second. Nil
	// discards them. It is called from the writer goroutine as well as
	// from Open and Close.
	Logf func(format string, args ...any)
	// OnCommit, when set, is called by the writer goroutine after each
	// transaction, failed or not, with how long it took (fsync included):
	// keyd's commit-latency histogram. It must return quickly, as the next
	// transaction waits for it.
	OnCommit func(took time.Duration)
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
	return fmt.Sprintf("%s has schema version %d, this keyd understands up to %d: upgrade keyd or move the file away", e.Path, e.Version, SchemaVersion)
}

func (e *SchemaError) Unwrap() error { return ErrNewerSchema }

// Stats counts the work of the group-commit writer since Open.
type Stats struct {
	Commits      uint64 // batches made durable
	Transactions uint64 // transactions (fsyncs) that carried them
	Failed       uint64 // batches whose transaction failed
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

	commits, txs, failed atomic.Uint64

	// Owned by the writer goroutine, reused across transactions.
	key  []byte // scratch for building keys (bbolt copies keys)
	buf  []byte // values of the current transaction
	rows rows   // usage and day rows gathered over the current transaction
}

// request is one Commit waiting for the writer. done is buffered so the
// writer never blocks answering a caller that stopped waiting.
type request struct {
	b    *Batch
	done chan error
}

var requestPool = sync.Pool{New: func() any { return &request{done: make(chan error, 1)} }}

var _ Store = (*DB)(nil)

// Open opens or creates DIR/keyd.db (mode 0600, DIR created 0700) and
// starts its writer. It fails with an error wrapping ErrLocked (a
// *LockedError) when another process holds the file for longer than
// opts.Timeout, and with one wrapping ErrNewerSchema (a *SchemaError) when
// the file was written by a newer keyd. Once open, it writes the pid file
// DIR/keyd.pid. The caller must Close the DB.
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
	if err := initSchema(bdb, path); err != nil {
		bdb.Close()
		return nil, err
	}
	db := &DB{
		bolt:       bdb,
		dir:        dir,
		path:       path,
		logf:       logf,
		onCommit:   opts.OnCommit,
		reqs:       make(chan *request, 256),
		writerDone: make(chan struct{}),
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

// initSchema refuses a newer file, then creates the buckets and the schema
// version of a new one.
func initSchema(bdb *bolt.DB, path string) error {
	version := 0
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
		return nil
	})
	if err != nil {
		return err
	}
	if version > SchemaVersion {
		return &SchemaError{Path: path, Version: version}
	}
	// Future migrations from version to SchemaVersion go here.
	err = bdb.Update(func(tx *bolt.Tx) error {
		for _, name := range allBuckets {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		if version == 0 {
			return tx.Bucket(bucketMeta).Put(keySchema, []byte(strconv.Itoa(SchemaVersion)))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("initializing %s: %w", path, err)
	}
	return nil
}

// Commit makes b durable: it returns nil once a transaction carrying b
// has been committed and fsynced. Concurrent Commits share transactions
// (group commit); batches are applied in the order they were enqueued, so
// the Commits of one goroutine are applied in call order. Within one
// Batch, puts are applied before deletes, in the order of the Batch's
// fields (leases, buckets, keys, days, usage). The day counts and usage
// deltas of one transaction are merged per row (the last count wins, the
// deltas add up) and written once each at its end, which stores what
// writing them batch by batch would.
//
// If the transaction fails, every batch in it gets the error and none of
// them is applied. A batch that cannot be stored (an empty ID, a NUL in a
// name, a time outside years 0-9999) is refused with an error before it is
// enqueued, so it cannot fail the others.
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

// run is the writer goroutine: it takes every pending request, commits
// them in one transaction and answers them all. It returns once reqs is
// closed and drained.
func (db *DB) run() {
	defer close(db.writerDone)
	group := make([]*request, 0, 64)
	for {
		r, ok := <-db.reqs
		if !ok {
			return
		}
		group = append(group[:0], r)
	drain:
		for len(group) < maxGroup {
			select {
			case r, ok := <-db.reqs:
				if !ok {
					break drain
				}
				group = append(group, r)
			default:
				break drain
			}
		}
		err := db.commitGroup(group)
		if err != nil {
			err = fmt.Errorf("committing to %s: %w", db.path, err)
		}
		for i, r := range group {
			r.done <- err // r belongs to its caller from here on
			group[i] = nil
		}
	}
}

func (db *DB) commitGroup(group []*request) error {
	start := time.Now()
	err := db.bolt.Update(func(tx *bolt.Tx) error {
		w := writer{tx: tx, key: db.key, buf: db.buf[:0], rows: &db.rows}
		w.rows.reset()
		defer func() {
			db.key = w.key
			if cap(w.buf) <= maxKeptBuf {
				db.buf = w.buf[:0]
			} else {
				db.buf = nil
			}
		}()
		for _, r := range group {
			if err := w.apply(r.b); err != nil {
				return err
			}
		}
		return w.flush()
	})
	d := time.Since(start)
	if d > time.Second {
		db.logf("store: a commit of %d batches took %v", len(group), d.Round(time.Millisecond))
	}
	if db.onCommit != nil {
		db.onCommit(d)
	}
	db.txs.Add(1)
	if err != nil {
		db.failed.Add(uint64(len(group)))
		if errors.Is(err, berrors.ErrDatabaseNotOpen) {
			return ErrClosed
		}
		return err
	}
	db.commits.Add(uint64(len(group)))
	return nil
}

// writer applies batches inside one read-write transaction.
type writer struct {
	tx  *bolt.Tx
	key []byte // the key being built; bbolt copies keys
	// buf holds the values put in this transaction, which bbolt requires
	// to stay valid until it ends. Each value is a sub-slice; when append
	// moves buf, earlier values keep the old array alive.
	buf []byte
	// rows gathers the day counts and usage deltas of all the batches,
	// which flush writes once per row: a group of grants on one bucket
	// puts its day row and adds to its usage row once, not once each.
	rows *rows

	leases, buckets, keys, days, usageBkt *bolt.Bucket
}

// rows are the day counts (last one wins) and usage deltas (summed) of
// one transaction, by key, in first-seen order.
type rows struct {
	index map[string]int // 'd' or 'u', NUL, row key → position in days or usage
	days  []dayRow
	usage []usageRow
}

type dayRow struct {
	key string
	d   Day
}

type usageRow struct {
	key string
	c   counters
}

func (r *rows) reset() {
	if r.index == nil {
		r.index = map[string]int{}
	}
	clear(r.index)
	clear(r.days)
	clear(r.usage)
	r.days, r.usage = r.days[:0], r.usage[:0]
}

// put stores buf[start:] under w.key.
func (w *writer) put(bk *bolt.Bucket, start int) error {
	return bk.Put(w.key, w.buf[start:len(w.buf):len(w.buf)])
}

func (w *writer) bucket(p **bolt.Bucket, name []byte) (*bolt.Bucket, error) {
	if *p == nil {
		*p = w.tx.Bucket(name)
		if *p == nil {
			return nil, fmt.Errorf("bucket %q missing", name)
		}
	}
	return *p, nil
}

func (w *writer) apply(b *Batch) error {
	if len(b.Leases)+len(b.DeleteLeases) > 0 {
		bk, err := w.bucket(&w.leases, bucketLeases)
		if err != nil {
			return err
		}
		for i := range b.Leases {
			w.key = append(w.key[:0], b.Leases[i].ID...)
			start := len(w.buf)
			var err error
			if w.buf, err = appendLease(w.buf, &b.Leases[i]); err != nil {
				return fmt.Errorf("lease %q: %w", b.Leases[i].ID, err)
			}
			if err := w.put(bk, start); err != nil {
				return err
			}
		}
		for _, id := range b.DeleteLeases {
			w.key = append(w.key[:0], id...)
			if err := bk.Delete(w.key); err != nil {
				return err
			}
		}
	}
	if len(b.Buckets)+len(b.DeleteBuckets) > 0 {
		bk, err := w.bucket(&w.buckets, bucketBuckets)
		if err != nil {
			return err
		}
		for i := range b.Buckets {
			x := &b.Buckets[i]
			w.key = appendNames(w.key[:0], x.Project, x.Model)
			if err := putJSON(bk, w.key, x); err != nil {
				return err
			}
		}
		for _, x := range b.DeleteBuckets {
			w.key = appendNames(w.key[:0], x.Project, x.Model)
			if err := bk.Delete(w.key); err != nil {
				return err
			}
		}
	}
	if len(b.Keys)+len(b.DeleteKeys) > 0 {
		bk, err := w.bucket(&w.keys, bucketKeys)
		if err != nil {
			return err
		}
		for i := range b.Keys {
			w.key = append(w.key[:0], b.Keys[i].KeyID...)
			if err := putJSON(bk, w.key, &b.Keys[i]); err != nil {
				return err
			}
		}
		for _, id := range b.DeleteKeys {
			w.key = append(w.key[:0], id...)
			if err := bk.Delete(w.key); err != nil {
				return err
			}
		}
	}
	for i := range b.Days {
		x := &b.Days[i]
		w.key = append(w.key[:0], 'd', 0)
		w.key = appendNames(w.key, x.Project, x.Model, x.Day)
		if j, ok := w.rows.index[string(w.key)]; ok {
			w.rows.days[j].d = *x
		} else {
			k := string(w.key)
			w.rows.index[k] = len(w.rows.days)
			w.rows.days = append(w.rows.days, dayRow{key: k[2:], d: *x})
		}
	}
	for i := range b.Usage {
		d := &b.Usage[i]
		w.key = append(w.key[:0], 'u', 0)
		w.key = appendHour(w.key, d.Hour)
		w.key = appendNames(w.key, d.Project, d.Model, d.KeyID)
		j, ok := w.rows.index[string(w.key)]
		if !ok {
			k := string(w.key)
			j = len(w.rows.usage)
			w.rows.index[k] = j
			w.rows.usage = append(w.rows.usage, usageRow{key: k[2:]})
		}
		w.rows.usage[j].c.add(&counters{Requests: d.Requests, PromptTokens: d.PromptTokens,
			OutputTokens: d.OutputTokens, RateMinute: d.RateMinute, RateDay: d.RateDay,
			Other429: d.Other429, Errors: d.Errors, Unused: d.Unused})
	}
	return nil
}

// flush writes the day and usage rows gathered by apply.
func (w *writer) flush() error {
	if len(w.rows.days) > 0 {
		bk, err := w.bucket(&w.days, bucketDays)
		if err != nil {
			return err
		}
		for i := range w.rows.days {
			x := &w.rows.days[i]
			w.key = append(w.key[:0], x.key...)
			start := len(w.buf)
			w.buf = appendDay(w.buf, &x.d)
			if err := w.put(bk, start); err != nil {
				return err
			}
		}
	}
	if len(w.rows.usage) > 0 {
		bk, err := w.bucket(&w.usageBkt, bucketUsage)
		if err != nil {
			return err
		}
		for i := range w.rows.usage {
			if err := w.addUsage(bk, &w.rows.usage[i]); err != nil {
				return err
			}
		}
	}
	return nil
}

// putJSON stores v's JSON under key. json.Marshal returns a fresh slice,
// which bbolt requires to stay valid until the transaction ends.
func putJSON(bk *bolt.Bucket, key []byte, v any) error {
	val, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return bk.Put(key, val)
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

// addUsage adds the deltas summed in u to the stored row.
func (w *writer) addUsage(bk *bolt.Bucket, u *usageRow) error {
	w.key = append(w.key[:0], u.key...)
	var c counters
	if old := bk.Get(w.key); old != nil {
		if err := json.Unmarshal(old, &c); err != nil {
			return fmt.Errorf("usage row %q: %w", w.key, err)
		}
	}
	c.add(&u.c)
	start := len(w.buf)
	w.buf = appendCounters(w.buf, &c)
	return w.put(bk, start)
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

// Load returns the leases granted at or after since in grant order
// (GrantedAt, then ID), every bucket and key record in key order, and the
// Day rows whose Day is one of days. The result is a copy owned by the
// caller.
func (db *DB) Load(since time.Time, days []string) (*State, error) {
	st := &State{}
	err := db.view(func(tx *bolt.Tx) error {
		err := tx.Bucket(bucketLeases).ForEach(func(k, v []byte) error {
			var l Lease
			if err := json.Unmarshal(v, &l); err != nil {
				return fmt.Errorf("lease %q: %w", k, err)
			}
			if !l.GrantedAt.Before(since) {
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

// Prune deletes the leases granted before `before`, the usage rows of
// hours before usageBefore, and the Day rows dated more than three days
// before before's date (in before's location). It runs in its own
// transaction, serialized with the writer's by bbolt, and is safe to call
// alongside Commit. After Close it returns ErrClosed.
func (db *DB) Prune(before, usageBefore time.Time) error {
	dayCutoff := before.AddDate(0, 0, -dayRetention).Format(time.DateOnly)
	err := db.bolt.Update(func(tx *bolt.Tx) error {
		var del [][]byte
		err := tx.Bucket(bucketLeases).ForEach(func(k, v []byte) error {
			var l struct {
				GrantedAt time.Time `json:"granted"`
			}
			if err := json.Unmarshal(v, &l); err != nil {
				return fmt.Errorf("lease %q: %w", k, err)
			}
			if l.GrantedAt.Before(before) {
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
	})
	if errors.Is(err, berrors.ErrDatabaseNotOpen) {
		return ErrClosed
	}
	if err != nil {
		return fmt.Errorf("pruning %s: %w", db.path, err)
	}
	return nil
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
	return Stats{Commits: db.commits.Load(), Transactions: db.txs.Load(), Failed: db.failed.Load()}
}

// Path returns the database file's path.
func (db *DB) Path() string { return db.path }

// Close commits the batches already enqueued, stops the writer, removes
// the pid file and closes the file, releasing its lock. Commits that start
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
		db.closeErr = db.bolt.Close()
	})
	return db.closeErr
}
