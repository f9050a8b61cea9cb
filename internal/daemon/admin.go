package daemon

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/internal/config"
	"github.com/keyd/keyd/internal/limiter"
	"github.com/keyd/keyd/internal/store"
)

// keyAction disables, enables or resets a key for an admin. reset also
// clears the penalties and the learned limits (learned.go) of the key's
// buckets, which other keys of the same project share.
func (p *pool) keyAction(ctx context.Context, keyID, action string, who string) (*api.KeyActionResponse, *api.Error) {
	p.mu.Lock()
	now := p.now()
	ks := p.keys[keyID]
	if ks == nil || ks.removed {
		ids := make([]string, 0, len(p.order))
		for _, k := range p.order {
			ids = append(ids, k.key.ID)
		}
		p.mu.Unlock()
		msg := fmt.Sprintf("key %s is not configured; configured: %s", keyID, strings.Join(ids, ", "))
		if n := config.Nearest(keyID, ids); n != "" {
			msg += fmt.Sprintf(" (did you mean %s?)", n)
		}
		return nil, api.Errorf(http.StatusNotFound, api.CodeNotFound, "%s", msg)
	}
	batch := &store.Batch{}
	switch action {
	case "disable":
		ks.disabled = &store.Key{KeyID: keyID, Reason: "disabled by " + who, By: "admin", At: now}
		batch.Keys = append(batch.Keys, *ks.disabled)
	case "enable", "reset":
		ks.disabled = nil
		batch.DeleteKeys = append(batch.DeleteKeys, keyID)
		if action == "reset" {
			for _, m := range ks.key.ModelNames() {
				bid := config.BucketID{Project: ks.key.Project, Model: m}
				if b := p.buckets[bid]; b != nil {
					b.Clear()
					if _, ok := p.learned[bid]; ok {
						b.SetLimits(p.forget(bid, p.cfg.Buckets[bid], "a key of the bucket was reset", "key", keyID, "by", who), now)
					}
					p.putBucket(batch, bid, b.Penalty(now))
				}
			}
		}
	default:
		p.mu.Unlock()
		return nil, api.Errorf(http.StatusNotFound, api.CodeNotFound, "unknown key action %q: use disable, enable or reset", action)
	}
	pending := p.st.Submit(batch)
	state, _, _ := p.keyState(ks, now)
	p.kick()
	p.mu.Unlock()
	if err := pending.Wait(context.WithoutCancel(ctx)); err != nil {
		return nil, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "recording the change failed: %v", err)
	}
	p.log.Info("key "+action, "key", keyID, "by", who, "state", state)
	return &api.KeyActionResponse{KeyID: keyID, State: state}, nil
}

// reload loads the configuration again and, when it is valid, swaps it in.
// An invalid one leaves the running configuration in place.
func (p *pool) reload(load func() (*config.Config, error)) (*api.ReloadResponse, *api.Error) {
	cfg, err := load()
	p.mu.Lock()
	p.m.reloaded(err == nil)
	if err != nil {
		p.lastErr = err.Error()
		p.mu.Unlock()
		p.log.Error("reload failed; the running configuration stays", "err", err)
		return nil, api.Errorf(http.StatusUnprocessableEntity, api.CodeReloadFailed, "reload failed, the running configuration stays: %v", err)
	}
	changed := !sameConfig(p.cfg, cfg)
	var pending *store.Pending
	if changed {
		batch := &store.Batch{}
		p.apply(cfg, p.now(), batch)
		if len(batch.DeleteKeys)+len(batch.Buckets)+len(batch.DeleteBuckets) > 0 {
			pending = p.st.Submit(batch) // re-enabled keys, forgotten learned limits
		}
	} else {
		p.lastErr = ""
	}
	p.mu.Unlock()
	if changed {
		p.logConfig(cfg, "reloaded")
	}
	if pending != nil {
		if err := pending.Wait(context.Background()); err != nil {
			return nil, api.Errorf(http.StatusInternalServerError, api.CodeInternal, "recording the reload failed: %v", err)
		}
	}
	return &api.ReloadResponse{Path: cfg.Path, Changed: changed, Keys: len(cfg.Keys), Warnings: nonNil(cfg.Warnings)}, nil
}

// sameConfig reports whether b changes nothing of a: same bytes, same secrets.
func sameConfig(a, b *config.Config) bool {
	if a == nil || !bytes.Equal(a.Raw, b.Raw) || len(a.Keys) != len(b.Keys) {
		return false
	}
	for i := range a.Keys {
		if a.Keys[i].Secret != b.Keys[i].Secret {
			return false
		}
	}
	return true
}

// logConfig says, once per load, what loaded and what did not.
func (p *pool) logConfig(cfg *config.Config, verb string) {
	ready := 0
	for _, k := range cfg.Keys {
		switch {
		case k.SecretError != "":
			p.log.Warn(k.SecretError, "key", k.ID)
		case !k.Enabled:
			p.log.Info("key configured but disabled (enabled: false)", "key", k.ID)
		default:
			ready++
		}
	}
	for _, w := range cfg.Warnings {
		p.log.Warn("config: "+w, "file", cfg.Path)
	}
	p.log.Info("config "+verb, "file", cfg.Path, "keys", len(cfg.Keys), "with_secret_and_enabled", ready,
		"models", cfg.Models(), "warnings", len(cfg.Warnings))
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// keyState derives a key's state, reason and until. Callers hold mu.
func (p *pool) keyState(ks *keyState, now time.Time) (state, reason string, until *time.Time) {
	k := ks.key
	switch {
	case !k.Enabled:
		return api.StateDisabled, "enabled is false in keys.json", nil
	case k.Secret == "":
		return api.StateNoSecret, k.SecretError, nil
	case ks.disabled != nil:
		return api.StateDisabled, ks.disabled.Reason, nil
	}
	// Ready if any of its buckets is; else the state of the one that frees first.
	var best limiter.Penalty
	var bestModel string
	for _, m := range k.ModelNames() {
		b := p.buckets[config.BucketID{Project: k.Project, Model: m}]
		if b == nil {
			continue
		}
		pen := bucketPenalty(b, now)
		if pen.State == limiter.Ready {
			return api.StateReady, "", nil
		}
		if bestModel == "" || rank(pen) < rank(best) || rank(pen) == rank(best) && pen.Until.Before(best.Until) {
			best, bestModel = pen, m
		}
	}
	if bestModel == "" {
		return api.StateReady, "", nil
	}
	var u *time.Time
	if !best.Until.IsZero() {
		t := best.Until
		u = &t
	}
	return best.State.String(), bestModel + ": " + best.Reason, u
}

// bucketPenalty is the bucket's penalty as users see it: a day whose rpd
// is used up shows as exhausted until the day resets, penalty or not.
func bucketPenalty(b *limiter.Bucket, now time.Time) limiter.Penalty {
	pen := b.Penalty(now)
	if pen.State == limiter.Ready {
		if full, end := b.DayFull(now); full {
			_, n := b.Day(now)
			pen = limiter.Penalty{State: limiter.Exhausted, Until: end, Reason: fmt.Sprintf("rpd %d/%d used until the day resets", n, b.Limits().RPD)}
		}
	}
	return pen
}

func rank(p limiter.Penalty) int {
	switch p.State {
	case limiter.Cooling:
		return 0
	case limiter.Exhausted:
		return 1
	}
	return 2
}

// status returns the whole state for GET /v1/status: no secret in it.
func (p *pool) status(version string) *api.Status {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	st := &api.Status{
		Version: version,
		UptimeS: int64(now.Sub(p.start).Seconds()),
		Config: api.ConfigStatus{Path: p.cfg.Path, LoadedAt: p.loadedAt, LastError: p.lastErr,
			Warnings: nonNil(p.cfg.Warnings)},
		Keys:    []api.KeyStatus{},
		Buckets: []api.BucketState{},
		Waiting: p.waiting(now),
	}
	inFlight := map[config.BucketID]int{}
	for _, ks := range p.keys {
		for ls := range ks.open {
			inFlight[ls.bid]++
		}
	}
	for _, ks := range p.order {
		k := ks.key
		state, reason, until := p.keyState(ks, now)
		st.Keys = append(st.Keys, api.KeyStatus{
			KeyID: k.ID, Project: k.Project, Models: k.ModelNames(), Priority: k.Priority,
			WorkloadType: k.WorkloadType, State: state, Reason: reason, Until: until,
			SecretHint: k.SecretHint(), InFlight: int(ks.inFlight),
		})
	}
	bids := make([]config.BucketID, 0, len(p.buckets))
	for bid := range p.buckets {
		bids = append(bids, bid)
	}
	slices.SortFunc(bids, func(a, b config.BucketID) int {
		if a.Project != b.Project {
			return cmpStr(a.Project, b.Project)
		}
		return cmpStr(a.Model, b.Model)
	})
	for _, bid := range bids {
		b := p.buckets[bid]
		l, u, pen := b.Limits(), b.Usage(now), bucketPenalty(b, now)
		bs := api.BucketState{
			Project: bid.Project, Model: bid.Model, State: pen.State.String(), Reason: pen.Reason,
			RPM: api.Counter{Used: u.Requests, Limit: l.RPM}, TPM: api.Counter{Used: u.Tokens, Limit: l.TPM},
			RPD: api.Counter{Used: u.Day, Limit: l.RPD}, InFlight: inFlight[bid],
			Warnings: p.bucketWarnings(bid),
		}
		if !pen.Until.IsZero() {
			t := pen.Until
			bs.Until = &t
		}
		st.Buckets = append(st.Buckets, bs)
	}
	return st
}

func cmpStr(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// health is the short form of status.
func (p *pool) health(version string) *api.Health {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	h := &api.Health{OK: true, Version: version, KeysTotal: len(p.order)}
	for _, ks := range p.order {
		if s, _, _ := p.keyState(ks, now); s == api.StateReady {
			h.KeysReady++
		}
	}
	return h
}
