package store

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// A log record's payload is a sequence of entries, one per row a batch
// changes, each naming its bbolt bucket, its key and its value:
//
//	kind byte | uvarint len(key) | key | uvarint len(val) | val
//
// The kinds are the upper-case letter of a bucket for a put (the value is
// the row as bbolt stores it), the lower-case letter for a delete (no
// value), and 'U' for a usage delta, whose value is the eight counters as
// varints, added to the stored row rather than replacing it. The same
// decoder, merge, serves the live writer and recovery at Open, so the two
// cannot disagree about what a record means.
//
// Kind 'S' (schema 3) names no bucket: its key is empty and its value is
// the store id (see wal.go), the first entry of the first record of each
// pass over a segment. merge skips it.
const (
	kindStoreID    = 'S'
	kindLease      = 'L'
	kindLeaseDel   = 'l'
	kindBucket     = 'B'
	kindBucketDel  = 'b'
	kindKey        = 'K'
	kindKeyDel     = 'k'
	kindDay        = 'D'
	kindUsageDelta = 'U'
)

// bucketOf maps an entry kind (put or delete) to its bbolt bucket.
func bucketOf(kind byte) []byte {
	switch kind | 0x20 { // lower case
	case 'l':
		return bucketLeases
	case 'b':
		return bucketBuckets
	case 'k':
		return bucketKeys
	case 'd':
		return bucketDays
	case 'u':
		return bucketUsage
	}
	return nil
}

func appendEntry(dst []byte, kind byte, key, val []byte) []byte {
	dst = append(dst, kind)
	dst = binary.AppendUvarint(dst, uint64(len(key)))
	dst = append(dst, key...)
	dst = binary.AppendUvarint(dst, uint64(len(val)))
	return append(dst, val...)
}

// encoder appends a batch's entries to a record payload.
type encoder struct {
	key []byte // scratch
	val []byte // scratch
}

// appendBatch appends b's entries in the order Commit documents: puts
// before deletes, leases, buckets, keys, days, usage.
func (e *encoder) appendBatch(dst []byte, b *Batch) ([]byte, error) {
	var err error
	for i := range b.Leases {
		l := &b.Leases[i]
		if e.val, err = appendLease(e.val[:0], l); err != nil {
			return dst, fmt.Errorf("lease %q: %w", l.ID, err)
		}
		dst = appendEntry(dst, kindLease, append(e.key[:0], l.ID...), e.val)
	}
	for _, id := range b.DeleteLeases {
		dst = appendEntry(dst, kindLeaseDel, append(e.key[:0], id...), nil)
	}
	for i := range b.Buckets {
		x := &b.Buckets[i]
		v, err := json.Marshal(x)
		if err != nil {
			return dst, err
		}
		dst = appendEntry(dst, kindBucket, appendNames(e.key[:0], x.Project, x.Model), v)
	}
	for _, x := range b.DeleteBuckets {
		dst = appendEntry(dst, kindBucketDel, appendNames(e.key[:0], x.Project, x.Model), nil)
	}
	for i := range b.Keys {
		v, err := json.Marshal(&b.Keys[i])
		if err != nil {
			return dst, err
		}
		dst = appendEntry(dst, kindKey, append(e.key[:0], b.Keys[i].KeyID...), v)
	}
	for _, id := range b.DeleteKeys {
		dst = appendEntry(dst, kindKeyDel, append(e.key[:0], id...), nil)
	}
	for i := range b.Days {
		x := &b.Days[i]
		e.val = appendDay(e.val[:0], x)
		dst = appendEntry(dst, kindDay, appendNames(e.key[:0], x.Project, x.Model, x.Day), e.val)
	}
	for i := range b.Usage {
		d := &b.Usage[i]
		e.key = appendHour(e.key[:0], d.Hour)
		e.key = appendNames(e.key, d.Project, d.Model, d.KeyID)
		e.val = e.val[:0]
		for _, n := range [...]int64{d.Requests, d.PromptTokens, d.OutputTokens, d.RateMinute,
			d.RateDay, d.Other429, d.Errors, d.Unused} {
			e.val = binary.AppendVarint(e.val, n)
		}
		dst = appendEntry(dst, kindUsageDelta, e.key, e.val)
	}
	return dst, nil
}

// pending is the net effect of the log records not yet checkpointed into
// bbolt: the last value (or delete) of every row they put, and the sum of
// their usage deltas. Applying it in one transaction stores what applying
// the records one by one would. Its values are sub-slices of the payloads
// merged into it, which must not be modified while it lives.
//
// A pending belongs to one goroutine at a time: the writer while it
// merges, the checkpoint after it is handed over.
type pending struct {
	rows  map[string][]byte   // kind letter (upper case) + key → value; nil = delete
	usage map[string]counters // usage key → summed deltas
	seq   uint64              // the last record merged
	bytes int                 // payload bytes merged
	first time.Time           // when the first record was merged
}

func newPending() *pending {
	return &pending{rows: map[string][]byte{}, usage: map[string]counters{}}
}

func (p *pending) empty() bool { return p.bytes == 0 }

var errBadEntry = errors.New("malformed entry")

// merge folds the entries of one record's payload into p. It fails on a
// payload it cannot parse, leaving p partly merged.
func (p *pending) merge(seq uint64, payload []byte) error {
	rest := payload
	for len(rest) > 0 {
		kind := rest[0]
		key, r, ok := cut(rest[1:])
		if !ok {
			return errBadEntry
		}
		val, r, ok := cut(r)
		if !ok {
			return errBadEntry
		}
		rest = r
		switch kind {
		case kindStoreID:
			if len(key) != 0 || len(val) != storeIDLen {
				return errBadEntry
			}
		case kindLease, kindBucket, kindKey, kindDay:
			p.rows[string(kind)+string(key)] = val[:len(val):len(val)]
		case kindLeaseDel, kindBucketDel, kindKeyDel:
			p.rows[string(kind-0x20)+string(key)] = nil
		case kindUsageDelta:
			var d counters
			for _, f := range []*int64{&d.Requests, &d.PromptTokens, &d.OutputTokens, &d.RateMinute,
				&d.RateDay, &d.Other429, &d.Errors, &d.Unused} {
				n, k := binary.Varint(val)
				if k <= 0 {
					return errBadEntry
				}
				*f, val = n, val[k:]
			}
			if len(val) != 0 {
				return errBadEntry
			}
			c := p.usage[string(key)]
			c.add(&d)
			p.usage[string(key)] = c
		default:
			return fmt.Errorf("%w: kind %q", errBadEntry, kind)
		}
	}
	if p.bytes == 0 {
		p.first = time.Now()
	}
	p.bytes += len(payload)
	p.seq = seq
	return nil
}

// cut splits a uvarint-length-prefixed field off b.
func cut(b []byte) (field, rest []byte, ok bool) {
	n, k := binary.Uvarint(b)
	if k <= 0 || n > uint64(len(b)-k) {
		return nil, nil, false
	}
	return b[k : k+int(n)], b[k+int(n):], true
}

// apply writes p into tx and records p.seq as the last record applied.
func (p *pending) apply(tx *bolt.Tx) error {
	var bks [256]*bolt.Bucket
	bucket := func(kind byte) (*bolt.Bucket, error) {
		if bks[kind] == nil {
			bks[kind] = tx.Bucket(bucketOf(kind))
			if bks[kind] == nil {
				return nil, fmt.Errorf("bucket %q missing", bucketOf(kind))
			}
			// Lease IDs and usage keys start with their time, so most
			// puts append at the right edge: pages split full rather than
			// half full (bbolt's default for random keys).
			bks[kind].FillPercent = 0.9
		}
		return bks[kind], nil
	}
	for k, v := range p.rows {
		bk, err := bucket(k[0])
		if err != nil {
			return err
		}
		if v == nil {
			err = bk.Delete([]byte(k[1:]))
		} else {
			err = bk.Put([]byte(k[1:]), v)
		}
		if err != nil {
			return err
		}
	}
	if len(p.usage) > 0 {
		bk, err := bucket(kindUsageDelta)
		if err != nil {
			return err
		}
		for k, d := range p.usage {
			var c counters
			if old := bk.Get([]byte(k)); old != nil {
				if err := json.Unmarshal(old, &c); err != nil {
					return fmt.Errorf("usage row %q: %w", k, err)
				}
			}
			c.add(&d)
			if err := bk.Put([]byte(k), appendCounters(nil, &c)); err != nil {
				return err
			}
		}
	}
	return putSeq(tx, p.seq)
}

// keyLogSeq holds the sequence number of the last log record applied to
// the file, 8 bytes big-endian.
var keyLogSeq = []byte("log_seq")

func putSeq(tx *bolt.Tx, seq uint64) error {
	return tx.Bucket(bucketMeta).Put(keyLogSeq, binary.BigEndian.AppendUint64(nil, seq))
}

func getSeq(tx *bolt.Tx) (uint64, error) {
	v := tx.Bucket(bucketMeta).Get(keyLogSeq)
	switch len(v) {
	case 0:
		return 0, nil
	case 8:
		return binary.BigEndian.Uint64(v), nil
	}
	return 0, fmt.Errorf("meta %q is %d bytes, want 8", keyLogSeq, len(v))
}
