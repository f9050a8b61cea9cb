// Package store persists keyd's state so that a restart, kill -9
// included, loses nothing that keyd acknowledged: every granted lease
// (with its report once it has one), each bucket's day count, cooldowns
// and disabled states, and an hourly usage history.
//
// Writes go through Commit (or Submit and Wait), which returns only once
// its Batch is durable. A single writer goroutine gathers every Batch
// pending when it starts a write and appends them to a write-ahead log as
// one record with one fdatasync (group commit), so N concurrent callers
// cost one fsync, not N, and a lone one costs one, not bbolt's two. In the
// background it moves the log's records into the bbolt file keyd.db, a
// segment at a time (a checkpoint); reads (Load, Usage) and Prune wait
// for the checkpoint of everything committed before them. Batches are
// applied in the order they were submitted. wal.go describes the log.
package store

import (
	"context"
	"errors"
	"time"

	"github.com/keyd/keyd/api"
)

// SchemaVersion is the version of the on-disk layout this build writes.
// A file with a higher version is refused with ErrNewerSchema. Version 2
// added the write-ahead log: a keyd that knows only version 1 would
// ignore records not yet checkpointed into keyd.db, so it must refuse the
// file. Version 3 added the store id (meta/store_id), which the first
// record of each pass over a log segment repeats so that Open can tell a
// log from another keyd.db; a keyd that knows only version 2 cannot
// decode that entry. Open upgrades versions 1 and 2 in place.
const SchemaVersion = 3

// FileName is the database's name inside the state directory.
const FileName = "keyd.db"

var (
	// ErrNewerSchema: the file was written by a newer keyd.
	ErrNewerSchema = errors.New("store written by a newer keyd")
	// ErrLocked: another process holds the file.
	ErrLocked = errors.New("store is locked by another process")
	// ErrClosed: Commit after Close.
	ErrClosed = errors.New("store is closed")
)

// Lease is the durable record of one grant. It holds no secret.
type Lease struct {
	ID        string    `json:"id"`
	KeyID     string    `json:"key"`
	Project   string    `json:"project"`
	Model     string    `json:"model"`
	Client    string    `json:"client,omitempty"`
	Tokens    int64     `json:"tokens"` // the estimate reserved at grant
	GrantedAt time.Time `json:"granted"`
	ExpiresAt time.Time `json:"expires"`
	// Day is the grant's day in the day-reset timezone, "2006-01-02".
	Day string `json:"day"`

	// Set once the lease is reported.
	Reported       bool      `json:"reported,omitempty"`
	ReportedAt     time.Time `json:"reported_at,omitzero"`
	Classification string    `json:"class,omitempty"`
	Action         string    `json:"action,omitempty"`
	// PromptTokens is the real input token count from the report's usage;
	// -1 when the report carried none (the estimate then stands).
	PromptTokens int64 `json:"prompt_tokens,omitempty"`
	OutputTokens int64 `json:"output_tokens,omitempty"`
}

// Bucket is the durable penalty state of one (project, model) bucket.
// State is api.StateCooling, api.StateExhausted or api.StateDisabled; a
// bucket back to ready is deleted.
type Bucket struct {
	Project string    `json:"project"`
	Model   string    `json:"model"`
	State   string    `json:"state"`
	Until   time.Time `json:"until,omitzero"` // zero for disabled
	Reason  string    `json:"reason"`
	Streak  int       `json:"streak,omitempty"` // consecutive per-minute 429s
	// Learned are the limits Gemini reported lower than keys.json's (see
	// the daemon's learned.go); a record may hold them alone, with State
	// "ready". A keyd that does not know the field ignores it.
	Learned []LearnedLimit `json:"learned,omitempty"`
}

// LearnedLimit is one limit a 429's quota value set below keys.json's.
type LearnedLimit struct {
	Limit string `json:"limit"` // "rpm", "tpm" or "rpd"
	Quota string `json:"quota,omitempty"`
	Value int64  `json:"value"`
	// Configured is keys.json's limit when it was learned (rpd 0: none):
	// a restart under another value forgets it, as a reload does.
	Configured int64 `json:"configured"`
}

// Key is the durable state of one key that is not ready: disabled by an
// admin or by an upstream verdict (invalid, denied). A re-enabled key is deleted.
type Key struct {
	KeyID  string    `json:"key"`
	Reason string    `json:"reason"`
	By     string    `json:"by"` // "admin" or "upstream"
	At     time.Time `json:"at"`
	// SecretHash is a SHA-256 prefix of the secret the verdict was about,
	// so that a changed secret can re-enable the key. Never the secret.
	SecretHash string `json:"secret_hash,omitempty"`
}

// Day is the absolute count of grants of one bucket on one day.
type Day struct {
	Project string `json:"project"`
	Model   string `json:"model"`
	Day     string `json:"day"` // "2006-01-02" in the day-reset timezone
	Count   int64  `json:"count"`
}

// UsageDelta adds to one hour of one (bucket, key)'s usage history.
type UsageDelta struct {
	Hour         time.Time // truncated to the hour, UTC
	Project      string
	Model        string
	KeyID        string
	Requests     int64
	PromptTokens int64
	OutputTokens int64
	RateMinute   int64
	RateDay      int64
	Other429     int64
	Errors       int64
	Unused       int64
}

// Batch is one atomic unit of change. All of it is durable when Commit
// returns nil, none of it when the process dies before.
type Batch struct {
	Leases        []Lease // put (insert or replace) by ID
	DeleteLeases  []string
	Buckets       []Bucket // put by (project, model)
	DeleteBuckets []BucketKey
	Keys          []Key // put by KeyID
	DeleteKeys    []string
	Days          []Day // put by (project, model, day)
	Usage         []UsageDelta
}

// BucketKey names a bucket in DeleteBuckets.
type BucketKey struct{ Project, Model string }

// State is everything Load returns to rebuild the daemon after a restart.
type State struct {
	// Leases granted or reported at or after the Load's since argument, in
	// grant order.
	Leases  []Lease
	Buckets []Bucket
	Keys    []Key
	// Days holds the counts of the day given to Load and of the day before
	// (so that a restart just after midnight in another zone is exact).
	Days []Day
}

// Store is the persistence interface the daemon uses. *DB implements it
// with bbolt; a second backend implements the same methods.
type Store interface {
	// Commit makes b durable, waiting for the group commit that carries
	// it. ctx only bounds the wait; the batch may still commit.
	Commit(ctx context.Context, b *Batch) error
	// Submit queues b behind every batch submitted before it and returns
	// without waiting; Pending.Wait waits for durability.
	Submit(b *Batch) *Pending
	// Load reads the state needed at start: leases granted or reported
	// since `since`,
	// all bucket and key penalty records, and day counts for `days`.
	Load(since time.Time, days []string) (*State, error)
	// Usage returns hourly rows since the given hour, optionally for one key.
	Usage(since time.Time, keyID string) ([]api.UsageRow, error)
	// Prune deletes unreported leases granted before `before`, reported
	// leases reported before `reportedBefore` (whenever granted), usage
	// rows older than `usageBefore`, and old day counts.
	Prune(before, reportedBefore, usageBefore time.Time) error
	Close() error
}
