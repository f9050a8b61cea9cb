package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
	_ "time/tzdata" // day_reset_timezone works without system zoneinfo
)

// ErrNotFound is wrapped by the error Load returns when keys.json does not
// exist.
var ErrNotFound = errors.New("config file does not exist")

type notFoundError struct{ path string }

func (e notFoundError) Error() string {
	return fmt.Sprintf("config file %s does not exist: create it (see the example keys.json) or pass --config", e.path)
}

func (notFoundError) Unwrap() error { return ErrNotFound }

const (
	defaultTimezone = "America/Los_Angeles"
	defaultLeaseTTL = 10 * time.Minute
	// defaultWindowMargin covers the time from keyd's grant to the
	// request's arrival at Gemini: measured 22-64 ms median, up to 164 ms,
	// on a loaded 2-core machine (internal/e2e TestPool).
	defaultWindowMargin = time.Second
	defaultTokens       = 1000
)

var (
	topFields   = []string{"keys", "day_reset_timezone", "lease_ttl", "default_tokens", "window_margin", "access"}
	keyFields   = []string{"key_id", "model_name", "rpm", "tpm", "rpd", "burst_capacity", "models", "project", "secret_env", "enabled", "max_in_flight", "priority", "workload_type"}
	limitFields = []string{"rpm", "tpm", "rpd", "burst_capacity"}

	// A key ID names a file in $CREDENTIALS_DIRECTORY: no '/', no "..".
	validID  = regexp.MustCompile(`^[A-Za-z0-9_-][A-Za-z0-9_.-]*$`)
	validEnv = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
)

// Load reads keys.json at path and returns Parse's result. When the file
// does not exist, the error wraps ErrNotFound.
func Load(path string, opts Options) (*Config, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, notFoundError{path}
	}
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	return Parse(path, data, opts)
}

// Parse decodes and validates data, the contents of keys.json at path,
// then looks up each key's secret (see Options): the process environment,
// then the .env file, then the key's systemd credential; surrounding white
// space is trimmed and a blank value counts as missing.
//
// It returns either a Config or an error, never both. The error joins
// every problem found, one per line in file order, each as
// "PATH:LINE:COLUMN: what is wrong: the fix" (problems outside keys.json,
// such as an unreadable .env file, name their file instead). Anything
// usable but suspicious is a Key.SecretError or one of Config.Warnings:
// those about the file in file order, then those about secrets (keys of
// different projects sharing one). No message ever contains a secret.
func Parse(path string, data []byte, opts Options) (*Config, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("config file %s: %w", path, err)
	}
	getenv := opts.Getenv
	if getenv == nil {
		getenv = os.Getenv
	}
	src := secretSources{getenv: getenv, envFile: opts.EnvFile, credDir: opts.CredentialsDir}
	if src.envFile == "" {
		src.envFile = filepath.Join(filepath.Dir(abs), ".env")
	}
	if src.credDir == "" {
		src.credDir = getenv("CREDENTIALS_DIRECTORY")
	}
	for _, dst := range []*string{&src.envFile, &src.credDir} {
		if *dst != "" {
			if *dst, err = filepath.Abs(*dst); err != nil {
				return nil, err
			}
		}
	}
	loc, _ := time.LoadLocation(defaultTimezone)
	c := &Config{
		Path:             abs,
		EnvFile:          src.envFile,
		Buckets:          map[BucketID]Limits{},
		DayResetLocation: loc,
		LeaseTTL:         defaultLeaseTTL,
		WindowMargin:     defaultWindowMargin,
		DefaultTokens:    defaultTokens,
		Raw:              bytes.Clone(data),
	}

	p := newParser(path, data)
	if root := p.decode(); root != nil {
		kp := keysParser{parser: p, ids: map[string]int{}}
		kp.config(root, c, opts)
	}

	errs := p.errors()
	dotenv, err := readDotenv(src.envFile)
	if err != nil {
		errs = append(errs, err)
	}
	src.dotenv = dotenv
	for _, k := range c.Keys {
		if err := src.resolve(k); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	c.Warnings = append(p.warnings(), sharedSecrets(c.Keys)...)
	return c, nil
}

// keysParser checks keys.json's schema.
type keysParser struct {
	*parser
	ids   map[string]int // key_id → offset of its first use
	decls []decl         // every valid (key, model) in file order
}

// decl is one key's declaration of a bucket's limits.
type decl struct {
	key    string
	bucket BucketID
	lim    Limits
	obj    *node            // the object holding the limits
	f      map[string]*node // its fields
}

func (p *keysParser) config(root *node, c *Config, opts Options) {
	if !isObject(root) {
		p.errorf(root.off, "", `want an object like {"keys": [...]}, got %s`, describe(root))
		return
	}
	f := p.fields(root, "", topFields)
	switch keys := f["keys"]; {
	case keys == nil:
		p.errorf(root.off, "", `missing "keys": add "keys": [...] with one object per API key`)
	case !isArray(keys):
		p.typeError("", "keys", keys, "a list")
	case len(keys.elems) == 0:
		p.errorf(keys.off, "", `field "keys": the list is empty: add an object per API key`)
	default:
		for i, n := range keys.elems {
			p.key(i, n, c)
		}
		p.buckets(c)
	}
	if n := f["day_reset_timezone"]; n != nil {
		if tz, ok := p.str("", "day_reset_timezone", n); ok {
			loc, err := time.LoadLocation(tz)
			if err != nil || tz == "" {
				p.errorf(n.off, "", `field "day_reset_timezone": unknown time zone %q: use an IANA name like %q`, tz, defaultTimezone)
			} else {
				c.DayResetLocation = loc
			}
		}
	}
	if n := f["lease_ttl"]; n != nil {
		if s, ok := p.str("", "lease_ttl", n); ok {
			d, err := time.ParseDuration(s)
			switch {
			case err != nil:
				p.errorf(n.off, "", `field "lease_ttl": %q is not a duration: write it like "10m" or "90s"`, s)
			case d <= 0:
				p.errorf(n.off, "", `field "lease_ttl": must be > 0, got %q`, s)
			default:
				c.LeaseTTL = d
			}
		}
	}
	if n := f["window_margin"]; n != nil {
		if s, ok := p.str("", "window_margin", n); ok {
			d, err := time.ParseDuration(s)
			switch {
			case err != nil:
				p.errorf(n.off, "", `field "window_margin": %q is not a duration: write it like "1s" or "500ms"`, s)
			case d < 0 || d >= 30*time.Second:
				p.errorf(n.off, "", `field "window_margin": must be between 0s and 30s, got %q`, s)
			default:
				c.WindowMargin = d
			}
		}
	}
	if v, ok := p.int("", "default_tokens", f["default_tokens"], 1); ok {
		c.DefaultTokens = v
	}
	if n := f["access"]; n != nil {
		c.Access = p.access(n, opts)
	}
}

// key checks the i'th key object n and appends it to c.Keys when it has a
// valid key_id.
func (p *keysParser) key(i int, n *node, c *Config) {
	ctx := fmt.Sprintf("key #%d", i+1)
	if !isObject(n) {
		p.errorf(n.off, ctx, "want an object, got %s", describe(n))
		return
	}
	k := &Key{Enabled: true, Models: map[string]Limits{}}
	idNode := n.field("key_id")
	if id, ok := p.str(ctx, "key_id", idNode); !ok && idNode == nil {
		p.errorf(n.off, ctx, `missing "key_id": add a unique "key_id"`)
	} else if ok && !validID.MatchString(id) {
		p.errorf(idNode.off, ctx, `field "key_id": %q is not a valid id: use letters, digits, '_', '-' and '.' (not first)`, id)
	} else if ok {
		ctx, k.ID, k.Project, k.SecretEnv = "key "+id, id, id, "GEMINI_KEY_"+id
		if first, dup := p.ids[id]; dup {
			p.errorf(idNode.off, ctx, "duplicate key_id (first at %s): rename one", p.pos(first))
		} else {
			p.ids[id] = idNode.off
		}
	}

	f := p.fields(n, ctx, keyFields)
	if s, ok := p.str(ctx, "project", f["project"]); ok {
		if s == "" {
			p.errorf(f["project"].off, ctx, `field "project": must not be empty: name the Google Cloud project or remove the field`)
		} else {
			k.Project = s
		}
	}
	if s, ok := p.str(ctx, "secret_env", f["secret_env"]); ok {
		// Never echo the value: it may be the secret itself.
		switch {
		case strings.HasPrefix(s, "AIza"):
			p.errorf(f["secret_env"].off, ctx, `field "secret_env": holds an API key, not a variable name: move the key to the environment or .env and name its variable here`)
		case !validEnv.MatchString(s):
			p.errorf(f["secret_env"].off, ctx, `field "secret_env": not a variable name: use letters, digits and '_', like "GEMINI_KEY_%s"`, k.ID)
		default:
			k.SecretEnv = s
		}
	}
	if b, ok := p.boolean(ctx, "enabled", f["enabled"]); ok {
		k.Enabled = b
	}
	k.MaxInFlight, _ = p.int(ctx, "max_in_flight", f["max_in_flight"], 0)
	priority, _ := p.int(ctx, "priority", f["priority"], math.MinInt64)
	k.Priority = int(priority)
	k.WorkloadType, _ = p.str(ctx, "workload_type", f["workload_type"])

	for _, d := range p.models(ctx, n, f) {
		k.Models[d.bucket.Model] = d.lim
		if k.ID != "" {
			d.key, d.bucket.Project = k.ID, k.Project
			p.decls = append(p.decls, d)
		}
	}
	if k.ID != "" {
		c.Keys = append(c.Keys, k)
	}
}

// models checks the models of key object n (fields f): "model_name" with
// its limits beside it, or the "models" object. It returns the valid ones,
// without key or project.
func (p *keysParser) models(ctx string, n *node, f map[string]*node) []decl {
	name, models := f["model_name"], f["models"]
	switch {
	case name == nil && models == nil:
		p.errorf(n.off, ctx, `no model: add "model_name" with "rpm" and "tpm", or "models"`)
	case models == nil:
		m, ok := p.str(ctx, "model_name", name)
		if ok && m == "" {
			p.errorf(name.off, ctx, `field "model_name": must not be empty`)
			ok = false
		}
		if lim, limOK := p.limits(ctx, n, f); ok && limOK {
			return []decl{{bucket: BucketID{Model: m}, lim: lim, obj: n, f: f}}
		}
	default:
		if name != nil {
			p.errorf(name.off, ctx, `field "model_name" beside "models": use one: "model_name" with "rpm" and "tpm", or "models"`)
		}
		for _, l := range limitFields {
			if x := f[l]; x != nil {
				p.errorf(x.off, ctx, `field %q beside "models": move it into each model of "models"`, l)
			}
		}
		if !isObject(models) {
			p.typeError(ctx, "models", models, `an object like {"MODEL": {"rpm": N, "tpm": N}}`)
			return nil
		}
		if len(models.fields) == 0 {
			p.errorf(models.off, ctx, `field "models": is empty: add at least one model`)
		}
		var out []decl
		mf := p.fields(models, ctx, nil)
		for _, m := range models.fields {
			mctx := ctx + ": model " + m.name
			switch {
			case mf[m.name] != m.val: // a repeat, reported by fields
			case m.name == "":
				p.errorf(m.val.off, ctx, `field "models": model name must not be empty`)
			case !isObject(m.val):
				p.errorf(m.val.off, mctx, `want an object like {"rpm": N, "tpm": N}, got %s`, describe(m.val))
			default:
				lf := p.fields(m.val, mctx, limitFields)
				if lim, ok := p.limits(mctx, m.val, lf); ok {
					out = append(out, decl{bucket: BucketID{Model: m.name}, lim: lim, obj: m.val, f: lf})
				}
			}
		}
		return out
	}
	return nil
}

// limits checks the limits in f, the fields of obj; ok reports they are
// all valid.
func (p *keysParser) limits(ctx string, obj *node, f map[string]*node) (l Limits, ok bool) {
	nerr := len(p.errs)
	for i, dst := range []*int64{&l.RPM, &l.TPM, &l.RPD, &l.BurstCapacity} {
		name, least := limitFields[i], int64(0)
		if i < 2 {
			least = 1
			if f[name] == nil {
				what := map[string]string{"rpm": "requests-per-minute", "tpm": "tokens-per-minute"}[name]
				p.errorf(obj.off, ctx, "missing %q: add the model's %s limit", name, what)
			}
		}
		*dst, _ = p.int(ctx, name, f[name], least)
	}
	if l.RPM > 0 && l.BurstCapacity > l.RPM {
		p.errorf(f["burst_capacity"].off, ctx, "burst_capacity %d exceeds rpm %d: lower it to %d or less", l.BurstCapacity, l.RPM, l.RPM)
	}
	return l, len(p.errs) == nerr
}

// buckets fills c.Buckets, checking that keys sharing a bucket declare the
// same limits.
func (p *keysParser) buckets(c *Config) {
	first := map[BucketID]decl{}
	for _, d := range p.decls {
		f, seen := first[d.bucket]
		if !seen {
			first[d.bucket], c.Buckets[d.bucket] = d, d.lim
			continue
		}
		a := [...]int64{f.lim.RPM, f.lim.TPM, f.lim.RPD, f.lim.BurstCapacity}
		b := [...]int64{d.lim.RPM, d.lim.TPM, d.lim.RPD, d.lim.BurstCapacity}
		for i, name := range limitFields {
			if a[i] == b[i] {
				continue
			}
			off := d.obj.off
			if x := d.f[name]; x != nil {
				off = x.off
			}
			p.errorf(off, "", "keys %s and %s share bucket %s but declare different %s (%d vs %d): make them equal",
				f.key, d.key, d.bucket, name, a[i], b[i])
		}
	}
}

// access resolves the access section n.
func (p *keysParser) access(n *node, opts Options) Access {
	if !isObject(n) {
		p.typeError("", "access", n, `an object like {"lease": {"uids": [...], "groups": [...]}}`)
		return Access{}
	}
	lookupUser, lookupGroup := opts.LookupUser, opts.LookupGroup
	if lookupUser == nil {
		lookupUser = func(name string) (uint32, error) {
			u, err := user.Lookup(name)
			if err != nil {
				return 0, err
			}
			id, err := strconv.ParseUint(u.Uid, 10, 32)
			return uint32(id), err
		}
	}
	if lookupGroup == nil {
		lookupGroup = func(name string) (uint32, error) {
			g, err := user.LookupGroup(name)
			if err != nil {
				return 0, err
			}
			id, err := strconv.ParseUint(g.Gid, 10, 32)
			return uint32(id), err
		}
	}
	f := p.fields(n, "access", []string{"lease", "admin"})
	var a Access
	for _, x := range []struct {
		name string
		dst  *Principals
	}{{"lease", &a.Lease}, {"admin", &a.Admin}} {
		name, dst, pn := x.name, x.dst, f[x.name]
		switch {
		case pn == nil:
		case !isObject(pn):
			p.typeError("access", name, pn, `an object like {"uids": [...], "groups": [...]}`)
		default:
			ctx := "access." + name
			pf := p.fields(pn, ctx, []string{"uids", "groups"})
			dst.UIDs = p.principalIDs(ctx, "uids", "user", pf["uids"], lookupUser)
			dst.GIDs = p.principalIDs(ctx, "groups", "group", pf["groups"], lookupGroup)
		}
	}
	return a
}

// principalIDs resolves list field name of numeric ids and names of what
// ("user" or "group").
func (p *keysParser) principalIDs(ctx, name, what string, n *node, lookup func(string) (uint32, error)) []uint32 {
	if n == nil {
		return nil
	}
	if !isArray(n) {
		p.typeError(ctx, name, n, "a list of "+what+" names and numeric ids")
		return nil
	}
	var out []uint32
	for _, e := range n.elems {
		switch v := e.val.(type) {
		case json.Number:
			id, err := strconv.ParseUint(string(v), 10, 32)
			if err != nil {
				p.errorf(e.off, ctx, "field %q: want a %s name or an id from 0 to %d, got %s", name, what, uint32(math.MaxUint32), describe(e))
				continue
			}
			out = append(out, uint32(id))
		case string:
			id, err := lookup(v)
			if err != nil {
				p.errorf(e.off, ctx, "field %q: unknown %s %q (%v): use an existing %s name or a numeric id", name, what, v, err, what)
				continue
			}
			out = append(out, id)
		default:
			p.typeError(ctx, name, e, "a "+what+" name or a numeric id")
		}
	}
	return out
}
