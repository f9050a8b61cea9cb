package keyctl

import (
	"context"
	"flag"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/keyd/keyd/api"
)

var usageCmd = &command{
	name:  "usage",
	args:  "[--key K] [--since D] [--json]",
	short: "show hourly usage: requests, tokens, 429s, errors",
	long: `Usage prints keyd's hourly history per bucket (and key): requests, prompt
and output tokens, 429s per kind (per-minute / per-day / other), errors and
unused leases, with totals.`,
	setup: func(e *env, fs *flag.FlagSet) func(context.Context, []string) error {
		key := fs.String("key", "", "only key `K`'s usage")
		sinceFlag := fs.String("since", "24h", "how far back `D`: a duration such as 6h or 7d, or an RFC 3339 time")
		asJSON := fs.Bool("json", false, "print keyd's answer as JSON")
		return func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return usagef("usage", "unexpected argument %q", args[0])
			}
			since, err := parseSince(*sinceFlag, e.now())
			if err != nil {
				return usagef("usage", "--since: %v", err)
			}
			ctx, cancel := context.WithTimeout(ctx, callTimeout)
			defer cancel()
			resp, err := e.client().Usage(ctx, since, *key)
			if err != nil {
				return err
			}
			if *asJSON {
				return e.printJSON(resp)
			}
			e.printUsage(resp, since)
			return nil
		}
	},
}

// parseSince reads --since: a duration back from now (with a "d" unit for
// days) or an RFC 3339 time.
func parseSince(s string, now time.Time) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	var d time.Duration
	var err error
	if n, ok := strings.CutSuffix(s, "d"); ok {
		var days int64
		days, err = strconv.ParseInt(n, 10, 64)
		d = time.Duration(days) * 24 * time.Hour
	} else {
		d, err = time.ParseDuration(s)
	}
	if err != nil {
		return time.Time{}, fmt.Errorf("%q is neither a duration (6h, 7d) nor an RFC 3339 time (2026-11-29T00:00:00Z)", s)
	}
	if d < 0 {
		return time.Time{}, fmt.Errorf("%q is negative: give how far back, e.g. 24h", s)
	}
	return now.Add(-d), nil
}

func (e *env) printUsage(resp *api.UsageResponse, since time.Time) {
	w := e.stdout
	if len(resp.Rows) == 0 {
		fmt.Fprintf(w, "no usage since %s\n", since.In(e.loc).Format("2006-01-02 15:04"))
		return
	}
	tw := newTable(w)
	row(tw, "HOUR", "PROJECT", "MODEL", "KEY", "REQS", "PROMPT", "OUTPUT", "429 M/D/O", "ERRORS", "UNUSED")
	var total api.UsageRow
	for _, r := range resp.Rows {
		key := r.KeyID
		if key == "" {
			key = "-"
		}
		row(tw, r.Hour.In(e.loc).Format("01-02 15:04"), r.Project, r.Model, key,
			human(r.Requests), human(r.PromptTokens), human(r.OutputTokens),
			fmt.Sprintf("%d/%d/%d", r.RateMinute, r.RateDay, r.Other429), human(r.Errors), human(r.Unused))
		total.Requests += r.Requests
		total.PromptTokens += r.PromptTokens
		total.OutputTokens += r.OutputTokens
		total.RateMinute += r.RateMinute
		total.RateDay += r.RateDay
		total.Other429 += r.Other429
		total.Errors += r.Errors
		total.Unused += r.Unused
	}
	row(tw, "TOTAL", "", "", "", human(total.Requests), human(total.PromptTokens), human(total.OutputTokens),
		fmt.Sprintf("%d/%d/%d", total.RateMinute, total.RateDay, total.Other429), human(total.Errors), human(total.Unused))
	tw.Flush()
}
