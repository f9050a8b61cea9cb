package store

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
)

// The write-ahead log makes a group of batches durable with one write and
// one fdatasync, where a bbolt commit needs two (its pages, then its meta
// page). It is two segment files beside the database, keyd.0.wal and
// keyd.1.wal. The writer appends to one segment while the other is either
// clean (every record in it is also in keyd.db) or being checkpointed
// into keyd.db by one bbolt transaction in the background. A segment is
// overwritten from its start only when clean, and its file only grows, in
// zeroed steps, so that the fdatasync of an append flushes data blocks and
// no file metadata: about half of a bbolt commit's time on ext4.
//
// A record is a 16-byte header and a payload:
//
//	uint32 len(payload) | uint32 CRC-32C of seq and payload | uint64 seq | payload
//
// little-endian. Sequence numbers increase by one per record across both
// segments and restarts; keyd.db stores the last one applied to it under
// meta/log_seq. A segment's valid records are those from its start whose
// lengths and checksums hold and whose numbers follow each other; the
// first that does not is its end (a zeroed tail, a record torn by a crash,
// or a record of an older pass).
//
// The store id is 16 random bytes that Open stores in keyd.db
// (meta/store_id) when it creates the file. The writer puts it as the
// first entry of the first record of each pass over a segment (the record
// at offset 0), so that every segment holding valid records names the
// keyd.db it belongs to, and Open refuses a log whose id is not keyd.db's
// instead of replaying it into the wrong file. Logs of schema 2 carry no
// id; Open applies them to their (schema 2) keyd.db, then empties them
// before giving keyd.db its id (upgradeLog).

const (
	recHeader = 16

	// storeIDLen is the length of the store id.
	storeIDLen = 16

	// growStep bounds how much a segment grows at once.
	growStep = 1 << 20
	minGrow  = 64 << 10

	// DefaultCheckpointBytes is the log volume after which the writer
	// switches segments and checkpoints the full one into keyd.db.
	DefaultCheckpointBytes = 4 << 20
	// DefaultCheckpointInterval is the longest a record waits in the log
	// before a checkpoint starts.
	DefaultCheckpointInterval = time.Second
	// DefaultMaxSegmentBytes bounds a segment's file. A writer that would
	// exceed it while the other segment is still being checkpointed fails
	// the batches with errLogFull instead.
	DefaultMaxSegmentBytes = 64 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// segment is one log file.
type segment struct {
	f    *os.File
	path string
	size int64 // the file's size; it never shrinks
}

func segmentName(i int) string { return fmt.Sprintf("keyd.%d.wal", i) }

// openSegments opens or creates both segment files in dir and makes
// their directory entries durable.
func openSegments(dir string) ([2]*segment, error) {
	var segs [2]*segment
	created := false
	for i := range segs {
		path := filepath.Join(dir, segmentName(i))
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			closeSegments(segs)
			return segs, fmt.Errorf("opening write-ahead log: %w", err)
		}
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			closeSegments(segs)
			return segs, fmt.Errorf("opening write-ahead log: %w", err)
		}
		segs[i] = &segment{f: f, path: path, size: fi.Size()}
		created = created || fi.Size() == 0
	}
	if created {
		if err := syncDir(dir); err != nil {
			closeSegments(segs)
			return segs, fmt.Errorf("syncing %s: %w", dir, err)
		}
	}
	return segs, nil
}

func closeSegments(segs [2]*segment) error {
	var errs []error
	for _, s := range segs {
		if s != nil {
			errs = append(errs, s.f.Close())
		}
	}
	return errors.Join(errs...)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// record is one valid record read back from a segment.
type record struct {
	seq     uint64
	payload []byte
	seg     int
}

// newStoreID returns a random store id.
func newStoreID() []byte {
	id := make([]byte, storeIDLen)
	rand.Read(id) // never fails (it crashes the program instead)
	return id
}

// appendStoreID appends the store id entry to a record payload.
func appendStoreID(dst, id []byte) []byte {
	return appendEntry(dst, kindStoreID, nil, id)
}

// payloadStoreID returns the store id that a record's payload starts
// with, nil if it starts with none.
func payloadStoreID(payload []byte) []byte {
	if len(payload) == 0 || payload[0] != kindStoreID {
		return nil
	}
	key, rest, ok := cut(payload[1:])
	if !ok || len(key) != 0 {
		return nil
	}
	id, _, ok := cut(rest)
	if !ok || len(id) != storeIDLen {
		return nil
	}
	return id
}

// storeInfo is keyd.db's identity as Open found it.
type storeInfo struct {
	// id is keyd.db's store id; nil for a schema 2 file, whose log has
	// no ids and which gets one after its log is recovered.
	id []byte
	// created: this Open created keyd.db.
	created bool
}

// foreignLogError: a segment holds valid records of another keyd.db than
// the one in its state dir. Open returns it as is.
type foreignLogError struct {
	dir   string // the state dir
	seg   string // the segment's file name
	logID []byte // the segment's store id; nil when it has none (schema 2)
	info  storeInfo
}

func (e *foreignLogError) Error() string {
	var ids string
	switch {
	case e.logID == nil:
		ids = fmt.Sprintf("it has no store id, so a keyd older than store ids wrote it; %s has %x", FileName, e.info.id)
	case e.info.id == nil:
		ids = fmt.Sprintf("store id %x, %s has none: a keyd older than store ids wrote it", e.logID, FileName)
	default:
		ids = fmt.Sprintf("store id %x, %s has %x", e.logID, FileName, e.info.id)
	}
	if e.info.created {
		ids += " and was created just now"
	}
	return fmt.Sprintf("state dir %s: %s belongs to another %s (%s): restore the %s that belongs with it, or move %s and %s out of %s to start from %s alone",
		e.dir, e.seg, FileName, ids, FileName, segmentName(0), segmentName(1), e.dir, FileName)
}

// readSegment returns the valid records at the start of s, and the
// highest number of a valid record found after them (0 if none), going on
// by the length fields past the record that ended them. A crash can tear
// only the last record written, so a valid record after the end with a
// number above both the last valid one and keyd.db's means damage, not a
// tail; unapplied decides, knowing keyd.db's number.
func readSegment(s *segment, i int) (recs []record, after uint64, err error) {
	data := make([]byte, s.size)
	if _, err := s.f.ReadAt(data, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, 0, fmt.Errorf("reading %s: %w", s.path, err)
	}
	off := 0
	for {
		seq, payload, n, ok := parseRecord(data[off:])
		if !ok || len(recs) > 0 && seq != recs[len(recs)-1].seq+1 {
			break
		}
		recs = append(recs, record{seq: seq, payload: payload, seg: i})
		off += n
	}
	for len(data)-off >= recHeader {
		n := int(binary.LittleEndian.Uint32(data[off:]))
		if n == 0 || n > len(data)-off-recHeader {
			break
		}
		if seq, _, _, ok := parseRecord(data[off:]); ok {
			after = max(after, seq)
		}
		off += recHeader + n
	}
	return recs, after, nil
}

// parseRecord reads the record at the start of b: its number, payload and
// length with the header, and whether its length and checksum hold.
func parseRecord(b []byte) (seq uint64, payload []byte, size int, ok bool) {
	if len(b) < recHeader {
		return 0, nil, 0, false
	}
	n := int(binary.LittleEndian.Uint32(b[0:]))
	sum := binary.LittleEndian.Uint32(b[4:])
	seq = binary.LittleEndian.Uint64(b[8:])
	if n == 0 || n > len(b)-recHeader {
		return 0, nil, 0, false
	}
	body := b[8 : recHeader+n]
	if crc32.Checksum(body, castagnoli) != sum {
		return 0, nil, 0, false
	}
	return seq, body[8:], recHeader + n, true
}

// unapplied returns the records of both segments numbered after applied,
// in order. Every segment holding valid records must carry info's store
// id (none for schema 2), whether or not keyd.db has its records: a log
// of another keyd.db is refused, not replayed into this one. The records
// must follow applied without a gap: a gap means a segment was damaged,
// and starting without its records would forget acknowledged grants.
func unapplied(segs [2]*segment, applied uint64, info storeInfo) ([]record, error) {
	var recs []record
	dir := filepath.Dir(segs[0].path)
	var read [2][]record
	var beyond [2]uint64 // readSegment's after
	for i, s := range segs {
		var err error
		if read[i], beyond[i], err = readSegment(s, i); err != nil {
			return nil, err
		}
	}
	for i, rs := range read {
		if len(rs) == 0 {
			continue
		}
		if id := payloadStoreID(rs[0].payload); !bytes.Equal(id, info.id) {
			return nil, &foreignLogError{dir: dir, seg: segmentName(i), logID: id, info: info}
		}
	}
	// Without the log, keyd starts from keyd.db alone.
	moveAway := fmt.Sprintf("to start anyway, losing every record after %d, move %s and %s out of %s",
		applied, segmentName(0), segmentName(1), dir)
	for i, s := range segs {
		rs, after := read[i], beyond[i]
		last := applied
		for _, r := range rs {
			if r.seq > applied {
				recs = append(recs, r)
			}
			last = max(last, r.seq)
		}
		if after > last {
			return nil, fmt.Errorf("write-ahead log is damaged: %s has a bad record after record %d and valid ones up to %d after it, so acknowledged grants would be lost; %s",
				s.path, last, after, moveAway)
		}
	}
	slices.SortFunc(recs, func(a, b record) int {
		switch {
		case a.seq < b.seq:
			return -1
		case a.seq > b.seq:
			return 1
		}
		return 0
	})
	next := applied + 1
	for _, r := range recs {
		if r.seq != next {
			if applied == 0 && next == 1 {
				return nil, fmt.Errorf("the write-ahead log in %s starts at record %d, but %s has none of it: %s is new or was replaced; "+
					"put back the %s these logs belong to, or move %s and %s out of %s to start from %s alone",
					dir, r.seq, FileName, FileName, FileName, segmentName(0), segmentName(1), dir, FileName)
			}
			return nil, fmt.Errorf("write-ahead log is damaged: record %d follows %d in %s (%s has every record up to %d); %s",
				r.seq, next-1, segs[r.seg].path, FileName, applied, moveAway)
		}
		next++
	}
	return recs, nil
}

// appendRecord writes rec (a header placeholder and a payload) at off in
// s as record seq, growing the file first if needed, and fdatasyncs it.
func (s *segment) appendRecord(rec []byte, off int64, seq uint64) error {
	binary.LittleEndian.PutUint32(rec[0:], uint32(len(rec)-recHeader))
	binary.LittleEndian.PutUint64(rec[8:], seq)
	binary.LittleEndian.PutUint32(rec[4:], crc32.Checksum(rec[8:], castagnoli))
	if end := off + int64(len(rec)); end > s.size {
		if err := s.grow(end); err != nil {
			return err
		}
	}
	if _, err := s.f.WriteAt(rec, off); err != nil {
		return fmt.Errorf("writing %s: %w", s.path, err)
	}
	if err := fdatasync(s.f); err != nil {
		return fmt.Errorf("syncing %s: %w", s.path, err)
	}
	return nil
}

// zeros is what grow writes.
var zeros [growStep]byte

// growWriteAt writes grow's zeros. It is a variable only so that a test
// can make a segment fail to grow as on a full disk (TestGrowFails);
// nothing else sets it, and a test that does must not run in parallel.
var growWriteAt = (*os.File).WriteAt

// growError is a failure to grow a segment, before any of the record was
// written: it fails the record's group, not the log.
type growError struct{ err error }

func (e *growError) Error() string { return e.err.Error() }
func (e *growError) Unwrap() error { return e.err }

// grow extends the file with zeros to at least end. Zeros, not a hole or
// fallocate: writing into either later changes the file's block map, which
// the next fdatasync would have to flush too. On failure the size stays
// what it was; zeros written past it are harmless.
func (s *segment) grow(end int64) error {
	step := min(max(s.size, minGrow), growStep)
	size := s.size + step
	for size < end {
		size += step
	}
	for off := s.size; off < size; {
		n, err := growWriteAt(s.f, zeros[:min(int64(len(zeros)), size-off)], off)
		if err != nil {
			return &growError{fmt.Errorf("growing %s: %w", s.path, err)}
		}
		off += int64(n)
	}
	s.size = size
	return nil
}

func fdatasync(f *os.File) error {
	for {
		err := syscall.Fdatasync(int(f.Fd()))
		if err != syscall.EINTR {
			return err
		}
	}
}

// recoverLog applies to bdb the records of the log it does not have yet,
// in one transaction, and returns the last record's sequence number and
// how many records it applied. It refuses a log of another keyd.db
// (a *foreignLogError) without changing anything.
func recoverLog(bdb *bolt.DB, segs [2]*segment, info storeInfo) (seq uint64, n int, err error) {
	if err := bdb.View(func(tx *bolt.Tx) (err error) {
		seq, err = getSeq(tx)
		return err
	}); err != nil {
		return 0, 0, err
	}
	recs, err := unapplied(segs, seq, info)
	if err != nil || len(recs) == 0 {
		return seq, 0, err
	}
	p := newPending()
	for _, r := range recs {
		if err := p.merge(r.seq, r.payload); err != nil {
			return 0, 0, fmt.Errorf("write-ahead log record %d in %s does not decode (%w): was it written by another keyd? "+
				"To start from %s alone, losing the records from %d on, move %s and %s out of %s",
				r.seq, segs[r.seg].path, err, FileName, r.seq, segmentName(0), segmentName(1), filepath.Dir(segs[r.seg].path))
		}
	}
	if err := bdb.Update(p.apply); err != nil {
		return 0, 0, err
	}
	return p.seq, len(recs), nil
}

// upgradeLog finishes the upgrade of a schema 2 keyd.db, once recoverLog
// has applied its log: it empties the log (zeroes the first record header
// of each segment, so that no id-less record is left) and makes it
// durable, then gives keyd.db a store id and schema version 3 in one
// transaction. A crash in between leaves a schema 2 keyd.db beside an
// empty log, which the next Open upgrades again. It returns the id.
func upgradeLog(bdb *bolt.DB, segs [2]*segment) ([]byte, error) {
	var hdr [recHeader]byte
	for _, s := range segs {
		if s.size < recHeader {
			continue
		}
		if _, err := s.f.WriteAt(hdr[:], 0); err != nil {
			return nil, fmt.Errorf("emptying %s: %w", s.path, err)
		}
		if err := fdatasync(s.f); err != nil {
			return nil, fmt.Errorf("syncing %s: %w", s.path, err)
		}
	}
	id := newStoreID()
	err := bdb.Update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if err := meta.Put(keyStoreID, id); err != nil {
			return err
		}
		return meta.Put(keySchema, []byte(strconv.Itoa(SchemaVersion)))
	})
	if err != nil {
		return nil, err
	}
	return id, nil
}
