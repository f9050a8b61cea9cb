package store

import (
	"errors"
	"fmt"
	"slices"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// request is one Commit (b set) or one control request (ctl set) waiting
// for the writer. done is buffered so the writer never blocks answering a
// caller that stopped waiting.
type request struct {
	b    *Batch
	ctl  *control
	done chan error
}

// control asks the writer to checkpoint everything logged before it into
// keyd.db, then to prune if prune is set. Usage, Load and Prune use it so
// that they read and delete what bbolt holds after every Commit that
// returned before them.
type control struct {
	prune *pruneArgs
}

type pruneArgs struct{ before, reportedBefore, usageBefore time.Time }

// ckptJob is one checkpoint: the net effect of one segment's records (nil
// for none), and the control requests to answer once it is in keyd.db.
type ckptJob struct {
	pend *pending
	ctls []*request
	err  error
}

// run is the writer goroutine. It takes every request pending, appends
// the group's batches to the log as one record, fdatasyncs it and answers
// them; it starts checkpoints and answers control requests when they are
// done. It returns once reqs is closed and everything logged is in
// keyd.db (or failed to get there).
func (db *DB) run() {
	defer close(db.writerDone)
	group := make([]*request, 0, 64)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	var wake time.Time // when timer fires; zero when stopped
	for {
		select {
		case r, ok := <-db.reqs:
			if !ok {
				timer.Stop()
				db.finish()
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
			db.commitGroup(group)
			clear(group)
		case j := <-db.ckptDone:
			db.checkpointDone(j)
		case <-timer.C:
			wake = time.Time{}
		}
		if next := db.maybeCheckpoint(time.Now()); !next.Equal(wake) {
			wake = next
			if next.IsZero() {
				timer.Stop()
			} else {
				timer.Reset(time.Until(next))
			}
		}
	}
}

// commitGroup logs the batches of group as one record and answers them;
// it sets the control requests aside for the next checkpoint.
func (db *DB) commitGroup(group []*request) {
	if h := db.stallHook.Load(); h != nil {
		(*h)()
	}
	start := time.Now()
	rec := make([]byte, recHeader, db.recCap)
	n := 0
	var err error
	for _, r := range group {
		if r.ctl != nil {
			db.waiting = append(db.waiting, r)
			continue
		}
		n++
		if err == nil {
			rec, err = db.enc.appendBatch(rec, r.b)
		}
	}
	if n == 0 {
		return
	}
	if err == nil && len(rec) == recHeader {
		// A group of empty batches has nothing to log; every group before
		// it is already durable, so it is answered at once, and is not a
		// commit in the stats.
		for _, r := range group {
			if r.ctl == nil {
				r.done <- nil
			}
		}
		return
	}
	if err == nil {
		err = db.writeRecord(rec)
	}
	db.recCap = max(db.recCap/2, min(len(rec), maxKeptBuf))
	d := time.Since(start)
	if d > time.Second {
		db.logf("store: a commit of %d batches took %v", n, d.Round(time.Millisecond))
	}
	if db.onCommit != nil {
		db.onCommit(d)
	}
	db.txs.Add(1)
	if err != nil {
		db.failed.Add(uint64(n))
	} else {
		db.commits.Add(uint64(n))
	}
	for _, r := range group {
		if r.ctl == nil {
			r.done <- err // r belongs to its caller from here on
		}
	}
}

// errLogBroken wraps the error that stopped the log: after a failed write
// or fdatasync the file's contents are unknown, so every later commit
// fails until keyd restarts and recovers from what is on disk.
var errLogBroken = errors.New("the write-ahead log stopped after an error: restart keyd")

// writeRecord appends rec (header placeholder and payload) to the active
// segment as the next record, and merges it into cur once durable.
func (db *DB) writeRecord(rec []byte) error {
	if db.broken != nil {
		return db.broken
	}
	if db.off > 0 && db.off+int64(len(rec)) > db.maxSegment {
		// The active segment is full: switch, after waiting for the
		// checkpoint of the other one if it is still running.
		if db.ckptRunning {
			db.checkpointDone(<-db.ckptDone)
		}
		if db.retry != nil && !time.Now().Before(db.retryAt) {
			db.runJob(&ckptJob{pend: db.retry})
		}
		if db.retry != nil {
			return fmt.Errorf("write-ahead log %s is full, and %w; keyd retries every %v: free space in %s or fix what the error names",
				db.segs[db.active].path, db.retryErr, retryDelay, db.dir)
		}
		db.startCheckpoint()
	}
	if db.off == 0 {
		// The first record of a pass over a segment names the store.
		rec = slices.Insert(rec, recHeader, appendStoreID(nil, db.id)...)
	}
	seq := db.seq + 1
	if err := db.segs[db.active].appendRecord(rec, db.off, seq); err != nil {
		var ge *growError
		if errors.As(err, &ge) {
			// Nothing of the record was written: only this group fails.
			return fmt.Errorf("%w: free space in %s", err, db.dir)
		}
		db.broken = fmt.Errorf("%w: %w", errLogBroken, err)
		db.logf("store: %v", db.broken)
		return db.broken
	}
	db.seq = seq
	db.off += int64(len(rec))
	if err := db.cur.merge(seq, rec[recHeader:]); err != nil {
		// Unreachable unless the encoder and the decoder disagree.
		db.broken = fmt.Errorf("%w: record %d does not decode: %w", errLogBroken, seq, err)
		db.logf("store: %v", db.broken)
		return db.broken
	}
	return nil
}

// maybeCheckpoint starts a checkpoint if one is due and none is running.
// It returns when it wants to be called again, zero for "not before the
// next request or checkpoint result".
func (db *DB) maybeCheckpoint(now time.Time) time.Time {
	if db.ckptRunning {
		return time.Time{}
	}
	if db.retry != nil {
		// The other segment's checkpoint failed: nothing can switch
		// until it is in keyd.db, so no control request can be served.
		for _, r := range db.waiting {
			r.done <- db.retryErr
		}
		db.waiting = nil
		if now.Before(db.retryAt) {
			return db.retryAt
		}
		db.ckptRunning = true
		go db.runAsync(&ckptJob{pend: db.retry})
		return time.Time{}
	}
	if !db.cur.empty() {
		due := db.cur.first.Add(db.ckptEvery)
		if db.cur.bytes < db.ckptBytes && len(db.waiting) == 0 && now.Before(due) {
			return due
		}
	} else if len(db.waiting) == 0 {
		return time.Time{}
	}
	db.startCheckpoint()
	return time.Time{}
}

// startCheckpoint hands cur and the waiting control requests to a
// background checkpoint and switches the log to the other segment, which
// must be clean (no checkpoint running, none failed).
func (db *DB) startCheckpoint() {
	j := db.takeJob()
	db.ckptRunning = true
	go db.runAsync(j)
}

// takeJob hands cur, if it holds records, and the waiting control
// requests to a new job, and switches the log to the other segment.
func (db *DB) takeJob() *ckptJob {
	j := &ckptJob{ctls: db.waiting}
	db.waiting = nil
	if !db.cur.empty() {
		j.pend = db.cur
		db.cur = newPending()
		db.active = 1 - db.active
		db.off = 0
	}
	return j
}

func (db *DB) runAsync(j *ckptJob) {
	j.err = db.apply(j)
	db.ckptDone <- j
}

// runJob runs j in the writer goroutine; no checkpoint may be running.
func (db *DB) runJob(j *ckptJob) {
	j.err = db.apply(j)
	db.checkpointDone(j)
}

// apply writes a job into keyd.db in one bbolt transaction, or in none
// when it has nothing to write.
func (db *DB) apply(j *ckptJob) error {
	if j.pend == nil && !slices.ContainsFunc(j.ctls, func(r *request) bool { return r.ctl.prune != nil }) {
		return nil
	}
	err := db.bolt.Update(func(tx *bolt.Tx) error {
		if j.pend != nil {
			if err := j.pend.apply(tx); err != nil {
				return err
			}
		}
		for _, c := range j.ctls {
			if c.ctl.prune != nil {
				if err := prune(tx, c.ctl.prune); err != nil {
					return fmt.Errorf("pruning: %w", err)
				}
			}
		}
		return nil
	})
	if errors.Is(err, berrors.ErrDatabaseNotOpen) {
		return ErrClosed
	}
	if err != nil {
		return fmt.Errorf("checkpointing into %s: %w", db.path, err)
	}
	return nil
}

// checkpointDone records the outcome of a job and answers its control
// requests.
func (db *DB) checkpointDone(j *ckptJob) {
	db.ckptRunning = false
	if j.err != nil {
		if j.pend != nil {
			db.retry, db.retryErr = j.pend, j.err
			db.retryAt = time.Now().Add(retryDelay)
			db.logf("store: %v (retrying in %v; the log keeps the records meanwhile)", j.err, retryDelay)
		}
	} else {
		if j.pend != nil {
			db.checkpoints.Add(1)
			if j.pend == db.retry {
				db.retry, db.retryErr = nil, nil
			}
		}
	}
	for _, r := range j.ctls {
		r.done <- j.err
	}
}

// retryDelay is the pause between attempts of a failed checkpoint.
const retryDelay = time.Second

// finish runs once reqs is closed: it applies everything logged and
// answers the control requests left.
func (db *DB) finish() {
	if db.ckptRunning {
		db.checkpointDone(<-db.ckptDone)
	}
	if db.retry != nil {
		db.runJob(&ckptJob{pend: db.retry})
	}
	if db.retry == nil && (!db.cur.empty() || len(db.waiting) > 0) {
		j := db.takeJob()
		db.runJob(j)
		if j.err != nil {
			db.finishErr = j.err
		}
	}
	if db.retry != nil {
		db.finishErr = fmt.Errorf("%w (the records stay in the write-ahead log and are applied at the next start)", db.retryErr)
	}
	for _, r := range db.waiting {
		r.done <- ErrClosed
	}
	db.waiting = nil
}
