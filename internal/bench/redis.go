package bench

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

// RedisServerBin is the redis-server binary, from Debian's redis-server
// package.
const RedisServerBin = "redis-server"

// HaveRedis reports whether redis-server is installed, and says how to
// install it when it is not.
func HaveRedis() (string, error) {
	p, err := exec.LookPath(RedisServerBin)
	if err != nil {
		return "", fmt.Errorf("redis-server is not installed (Debian: apt-get install redis-server): %v", err)
	}
	return p, nil
}

// RedisVersion returns `redis-server --version`'s version, e.g. "7.0.15".
func RedisVersion(bin string) string {
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		return "?"
	}
	for f := range strings.FieldsSeq(string(out)) {
		if v, ok := strings.CutPrefix(f, "v="); ok {
			return v
		}
	}
	return strings.TrimSpace(string(out))
}

// RedisServer is a redis-server process on a loopback port.
type RedisServer struct {
	Addr    string
	Dir     string
	Durable bool
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
	log     string
}

// StartRedis starts redis-server bin on 127.0.0.1 at a free port, with its
// working directory dir (which must exist). Durable: the append-only file
// fsynced before every reply (appendonly yes, appendfsync always), no RDB
// snapshots. Not durable: no AOF, no RDB. It returns once PING answers.
func StartRedis(ctx context.Context, bin, dir string, durable bool) (*RedisServer, error) {
	var lastErr error
	for range 3 { // a port found free can be taken before redis binds it
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		s, err := startRedis(ctx, bin, dir, port, durable)
		if err == nil {
			return s, nil
		}
		lastErr = err
	}
	return nil, lastErr
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func startRedis(ctx context.Context, bin, dir string, port int, durable bool) (*RedisServer, error) {
	args := []string{
		"--bind", "127.0.0.1", "--port", strconv.Itoa(port), "--dir", dir,
		"--daemonize", "no", "--protected-mode", "yes", "--databases", "1",
		"--save", "", "--logfile", "", "--loglevel", "warning",
	}
	if durable {
		args = append(args, "--appendonly", "yes", "--appendfsync", "always")
	} else {
		args = append(args, "--appendonly", "no")
	}
	log := filepath.Join(dir, "redis.log")
	logf, err := os.OpenFile(log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = childAttr()
	s := &RedisServer{Addr: fmt.Sprintf("127.0.0.1:%d", port), Dir: dir, Durable: durable,
		cmd: cmd, exited: make(chan struct{}), log: log}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting redis-server: %w", err)
	}
	go func() { s.waitErr = cmd.Wait(); close(s.exited) }()
	// Wait for the port with plain dials (go-redis would log each refusal),
	// then for PING (Redis answers LOADING while it reads its files).
	deadline := time.Now().Add(10 * time.Second)
	var c *redis.Client
	defer func() {
		if c != nil {
			c.Close()
		}
	}()
	for {
		var err error
		if c == nil {
			var conn net.Conn
			if conn, err = net.DialTimeout("tcp", s.Addr, time.Second); err == nil {
				conn.Close()
				c = redis.NewClient(redisOptions(s.Addr, 1))
			}
		}
		if c != nil {
			pctx, cancel := context.WithTimeout(ctx, time.Second)
			err = c.Ping(pctx).Err()
			cancel()
			if err == nil {
				return s, nil
			}
		}
		select {
		case <-s.exited:
			return nil, fmt.Errorf("redis-server exited at start (%v): %s", s.waitErr, tail(log))
		default:
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			s.kill()
			return nil, fmt.Errorf("redis-server did not answer PING on %s: %v", s.Addr, err)
		}
		time.Sleep(time.Millisecond)
	}
}

// PID is redis-server's process ID.
func (s *RedisServer) PID() int { return s.cmd.Process.Pid }

// Stop shuts redis-server down without saving and waits for it to exit
// (SIGKILL if it has not within 10 s).
func (s *RedisServer) Stop() error {
	select {
	case <-s.exited:
		return fmt.Errorf("redis-server had exited (%v): %s", s.waitErr, tail(s.log))
	default:
	}
	opts := redisOptions(s.Addr, 1)
	opts.MaxRetries = -1 // the answer to SHUTDOWN is a closed connection: do not redial
	c := redis.NewClient(opts)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	c.ShutdownNoSave(ctx) // its answer is the closed connection
	cancel()
	c.Close()
	select {
	case <-s.exited:
		return nil
	case <-time.After(10 * time.Second):
		s.kill()
		return fmt.Errorf("redis-server did not shut down within 10 s: killed")
	}
}

func (s *RedisServer) kill() {
	s.cmd.Process.Kill()
	<-s.exited
}

// redisOptions are the go-redis options of the benchmark: a pool large
// enough that no client ever waits for a connection, no identity or
// maintenance-notification handshakes (a plain local Redis has neither).
func redisOptions(addr string, pool int) *redis.Options {
	return &redis.Options{
		Addr:                     addr,
		PoolSize:                 pool,
		MinIdleConns:             0,
		DisableIdentity:          true,
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled},
	}
}

// leaseScript is the Redis-side selection and grant, one script call per
// lease, doing per lease what keyd does: for each candidate key of the
// model, check its (project, model) bucket once (sliding 60 s window of
// requests and of input tokens, and the day's count), pick the best key
// (priority, then the bucket's tightest remaining share, then the key
// used least recently), then record the grant: the window, the token sum,
// the day count, the key's last use, the lease record (expiring an hour
// after its TTL) and the hour's usage row.
//
// Per bucket B = "b:<project>:<model>":
//
//	B:w       ZSET lease id -> grant time (ms): the sliding window
//	B:t       HASH lease id -> input tokens of each grant in the window
//	B:s       the sum of B:t
//	B:d:<day> the day's grant count (expires after 2 days)
//
// and lru:<model> HASH key -> last grant (ms), l:<id> HASH the lease,
// u:<hour>:<project>:<model>:<key> HASH the hour's usage.
//
// KEYS: none (a single local Redis; the keys are derived as above).
// ARGV: now_ms, tokens, lease_id, model, day, lease_ttl_ms, client, then
// per candidate key: id, project, priority, rpm, tpm, rpd (the client's
// copy of keys.json, as the seed's KeyManager held it in memory).
//
// Returns {key, project, day_count} or {"", reason}.
const leaseScript = `
local now = tonumber(ARGV[1])
local tokens = tonumber(ARGV[2])
local id, model, day = ARGV[3], ARGV[4], ARGV[5]
local ttl = tonumber(ARGV[6])
local client = ARGV[7]
local cut = now - 60000

local function trim(b)
  local w = b .. ':w'
  local old = redis.call('ZRANGEBYSCORE', w, '-inf', cut)
  if #old == 0 then return end
  local sum = 0
  for i = 1, #old, 1000 do
    local chunk = {}
    for j = i, math.min(i + 999, #old) do chunk[#chunk + 1] = old[j] end
    local toks = redis.call('HMGET', b .. ':t', unpack(chunk))
    for _, v in ipairs(toks) do sum = sum + (tonumber(v) or 0) end
    redis.call('HDEL', b .. ':t', unpack(chunk))
  end
  redis.call('DECRBY', b .. ':s', sum)
  redis.call('ZREMRANGEBYSCORE', w, '-inf', cut)
end

local checked = {}
local best, why = nil, {}
local lru = 'lru:' .. model
for i = 8, #ARGV, 6 do
  local key, project = ARGV[i], ARGV[i + 1]
  local prio = tonumber(ARGV[i + 2])
  local rpm, tpm, rpd = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
  local b = 'b:' .. project .. ':' .. model
  local c = checked[b]
  if c == nil then
    trim(b)
    local n = redis.call('ZCARD', b .. ':w')
    local used = tonumber(redis.call('GET', b .. ':s') or '0')
    local d = tonumber(redis.call('GET', b .. ':d:' .. day) or '0')
    c = {ok = true, remain = 1}
    if n >= rpm then c.ok = false; c.why = 'rpm ' .. n .. '/' .. rpm end
    if used + tokens > tpm then c.ok = false; c.why = 'tpm ' .. used .. '+' .. tokens .. '/' .. tpm end
    if rpd > 0 and d >= rpd then c.ok = false; c.why = 'rpd ' .. d .. '/' .. rpd end
    c.remain = math.min(1 - n / rpm, 1 - used / tpm)
    if rpd > 0 then c.remain = math.min(c.remain, 1 - d / rpd) end
    checked[b] = c
  end
  if not c.ok then
    why[#why + 1] = key .. ': ' .. c.why
  else
    local last = tonumber(redis.call('HGET', lru, key) or '0')
    if best == nil or prio > best.prio or (prio == best.prio and (c.remain > best.remain or
        (c.remain == best.remain and last < best.last))) then
      best = {key = key, project = project, b = b, prio = prio, remain = c.remain, last = last}
    end
  end
end
if best == nil then
  return {'', table.concat(why, '; ')}
end

local b = best.b
redis.call('ZADD', b .. ':w', now, id)
redis.call('HSET', b .. ':t', id, tokens)
redis.call('INCRBY', b .. ':s', tokens)
local dk = b .. ':d:' .. day
local dc = redis.call('INCR', dk)
redis.call('EXPIRE', dk, 172800)
redis.call('HSET', lru, best.key, now)
local l = 'l:' .. id
redis.call('HSET', l, 'key', best.key, 'project', best.project, 'model', model, 'tokens', tokens,
  'granted', now, 'expires', now + ttl, 'day', day, 'client', client)
redis.call('PEXPIRE', l, ttl + 3600000)
local u = 'u:' .. math.floor(now / 3600000) .. ':' .. best.project .. ':' .. model .. ':' .. best.key
redis.call('HINCRBY', u, 'requests', 1)
redis.call('HINCRBY', u, 'prompt', tokens)
redis.call('EXPIRE', u, 3024000)
return {best.key, best.project, dc}
`

// reportScript records a lease's report, as keyd's report does for a
// success or an error without penalty: the lease record is marked
// reported with its class and token counts; on a success with usage the
// grant's estimate in the window (if still there) and the token sum are
// replaced by the real prompt tokens; the hour's usage row gets the
// difference. A repeated report changes nothing.
//
// ARGV: lease_id, now_ms, status, prompt_tokens (-1: none), output_tokens.
// Returns {class, key} or {"not_found"} / {"duplicate", key}.
const reportScript = `
local id = ARGV[1]
local now = tonumber(ARGV[2])
local status = tonumber(ARGV[3])
local prompt, output = tonumber(ARGV[4]), tonumber(ARGV[5])
local l = 'l:' .. id
local f = redis.call('HMGET', l, 'key', 'project', 'model', 'tokens', 'granted', 'reported')
if not f[1] then return {'not_found'} end
if f[6] then return {'duplicate', f[1]} end
local key, project, model = f[1], f[2], f[3]
local est, granted = tonumber(f[4]), tonumber(f[5])
local u = 'u:' .. math.floor(granted / 3600000) .. ':' .. project .. ':' .. model .. ':' .. key
local class = 'success'
if status ~= 200 then
  class = 'error'
  redis.call('HINCRBY', u, 'errors', 1)
elseif prompt >= 0 then
  local b = 'b:' .. project .. ':' .. model
  if redis.call('ZSCORE', b .. ':w', id) then
    redis.call('HSET', b .. ':t', id, prompt)
    redis.call('INCRBY', b .. ':s', prompt - est)
  end
  redis.call('HINCRBY', u, 'prompt', prompt - est)
  redis.call('HINCRBY', u, 'output', output)
end
redis.call('HSET', l, 'reported', 1, 'reported_at', now, 'class', class,
  'prompt_tokens', prompt, 'output_tokens', output)
return {class, key}
`

// ErrNoCapacity is the Redis limiter's refusal of a lease.
var ErrNoCapacity = errors.New("no capacity")

// RedisLimiter is the Redis-backed limiter the benchmark compares keyd
// with: the seed's design (go-redis clients calling Redis directly),
// doing keyd's bookkeeping per (project, model) bucket in one Lua script
// per lease and one per report.
type RedisLimiter struct {
	rdb           *redis.Client
	lease, report *redis.Script
	args          map[string][]any // per model: the candidate keys' ARGV tail
	secrets       map[string]string
	loc           *time.Location
	ttl           time.Duration

	dayMu  sync.Mutex
	day    string
	dayEnd time.Time
}

// RedisLease is a granted lease.
type RedisLease struct {
	ID, KeyID, Project, Secret string
	DayCount                   int64
}

// NewRedisLimiter connects to the Redis at addr with a pool of pool
// connections and loads the scripts. keys is the limiter's copy of
// keys.json; days reset at midnight America/Los_Angeles, as keyd's do.
func NewRedisLimiter(ctx context.Context, addr string, keys []Key, pool int) (*RedisLimiter, error) {
	loc, err := time.LoadLocation("America/Los_Angeles")
	if err != nil {
		return nil, err
	}
	l := &RedisLimiter{
		rdb:   redis.NewClient(redisOptions(addr, pool)),
		lease: redis.NewScript(leaseScript), report: redis.NewScript(reportScript),
		args: map[string][]any{}, secrets: map[string]string{}, loc: loc, ttl: 10 * time.Minute,
	}
	for _, k := range keys {
		l.args[k.Model] = append(l.args[k.Model], k.ID, k.Project, k.Priority, k.RPM, k.TPM, k.RPD)
		l.secrets[k.ID] = k.Secret
	}
	for _, s := range []*redis.Script{l.lease, l.report} {
		if err := s.Load(ctx, l.rdb).Err(); err != nil {
			l.Close()
			return nil, fmt.Errorf("loading a Lua script: %w", err)
		}
	}
	return l, nil
}

// Close closes the connections.
func (l *RedisLimiter) Close() error { return l.rdb.Close() }

// Client is the go-redis client (for tests).
func (l *RedisLimiter) Client() *redis.Client { return l.rdb }

// dayOf returns the day of now in the day-reset zone, cached until it ends.
func (l *RedisLimiter) dayOf(now time.Time) string {
	l.dayMu.Lock()
	defer l.dayMu.Unlock()
	if l.day == "" || !now.Before(l.dayEnd) {
		t := now.In(l.loc)
		l.day = t.Format(time.DateOnly)
		l.dayEnd = time.Date(t.Year(), t.Month(), t.Day()+1, 0, 0, 0, 0, l.loc)
	}
	return l.day
}

// newLeaseID is keyd's lease ID form: "l", the grant's Unix nanoseconds
// as 16 hex digits, then 16 random hex digits.
func newLeaseID(now time.Time) string {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], uint64(now.UnixNano()))
	rand.Read(b[8:])
	var id [33]byte
	id[0] = 'l'
	hex.Encode(id[1:], b[:])
	return string(id[:])
}

// Lease selects a key for model and records the grant at now, in one
// script call (one round trip).
func (l *RedisLimiter) Lease(ctx context.Context, now time.Time, model string, tokens int64, client string) (*RedisLease, error) {
	cands, ok := l.args[model]
	if !ok {
		return nil, fmt.Errorf("model %s is not configured", model)
	}
	id := newLeaseID(now)
	args := make([]any, 0, 7+len(cands))
	args = append(args, now.UnixMilli(), tokens, id, model, l.dayOf(now), l.ttl.Milliseconds(), client)
	args = append(args, cands...)
	res, err := l.lease.Run(ctx, l.rdb, nil, args...).Slice()
	if err != nil {
		return nil, err
	}
	key, _ := res[0].(string)
	if key == "" {
		why := ""
		if len(res) > 1 {
			why, _ = res[1].(string)
		}
		return nil, fmt.Errorf("%w for %s: %s", ErrNoCapacity, model, why)
	}
	project, _ := res[1].(string)
	dc, _ := res[2].(int64)
	return &RedisLease{ID: id, KeyID: key, Project: project, Secret: l.secrets[key], DayCount: dc}, nil
}

// Report records the outcome of lease id at now: status 200 with the real
// prompt tokens (-1: none) and output tokens, or an error status. It
// returns the class ("success", "error" or "duplicate").
func (l *RedisLimiter) Report(ctx context.Context, now time.Time, id string, status int, prompt, output int64) (string, error) {
	res, err := l.report.Run(ctx, l.rdb, nil, id, now.UnixMilli(), status, prompt, output).Slice()
	if err != nil {
		return "", err
	}
	class, _ := res[0].(string)
	if class == "not_found" {
		return "", fmt.Errorf("lease %s is unknown", id)
	}
	return class, nil
}

// redisPair returns a PairFunc doing one lease and its report through l.
func redisPair(l *RedisLimiter, model string) PairFunc {
	return func(ctx context.Context) (time.Duration, time.Duration, error) {
		t0 := time.Now()
		ls, err := l.Lease(ctx, t0, model, 1000, "bench")
		if err != nil {
			return 0, 0, err
		}
		t1 := time.Now()
		if _, err := l.Report(ctx, t1, ls.ID, 200, 900, 100); err != nil {
			return 0, 0, err
		}
		return t1.Sub(t0), time.Since(t1), nil
	}
}
