package keyctl

import (
	"context"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/keyd/keyd/api"
)

var statusCmd = &command{
	name:  "status",
	args:  "[--json]",
	short: "show keyd's config, warnings, keys and quota buckets",
	long: `Status shows what keyd is running: the config file and when it was loaded,
the last load error and every warning, then each key (state, leases in
flight, why it is not ready and until when) and each (project, model) quota
bucket with its usage against its limits. The warnings are the config's,
then the buckets': a limit that Gemini reported lower than keys.json's,
with the fix (the bucket enforces Gemini's value until a reload changes
that limit or keyctl reset of one of its keys; a restart keeps it). Then
how many lease requests wait for capacity, if any. Secrets never
appear: a key shows at most the last 4 characters of its secret.`,
	setup: func(e *env, fs *flag.FlagSet) func(context.Context, []string) error {
		asJSON := fs.Bool("json", false, "print keyd's status object as JSON")
		return func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return usagef("status", "unexpected argument %q", args[0])
			}
			ctx, cancel := context.WithTimeout(ctx, callTimeout)
			defer cancel()
			st, err := e.client().Status(ctx)
			if err != nil {
				return err
			}
			if *asJSON {
				return e.printJSON(st)
			}
			e.printStatus(e.stdout, st)
			return nil
		}
	},
}

// modelsWidth is the width beyond which a key's models are summarized.
const modelsWidth = 28

func (e *env) printStatus(w io.Writer, st *api.Status) {
	e.renderStatus(w, st, lineWidth, false)
}

// renderStatus is printStatus with tables fitted to width columns; below
// lineWidth, the keys table leaves out the secret hints. compact, for
// keyctl watch, shortens the top to a line or two and leaves out the
// blank lines and the cut cells written in full below the tables.
func (e *env) renderStatus(w io.Writer, st *api.Status, width int, compact bool) {
	narrow := width < lineWidth
	sep := "\n"
	if compact {
		e.statusTop(w, st)
		sep = ""
	} else {
		e.printTop(w, st)
	}

	fmt.Fprintf(w, "%sKEYS: %s\n", sep, keyCounts(st.Keys))
	var rows [][]string
	var labels []string
	for _, k := range st.Keys {
		// The row names the key: "key ID: " in front of a reason is noise.
		reason := strings.TrimPrefix(k.Reason, "key "+k.KeyID+": ")
		row := []string{k.KeyID, k.Project, models(k.Models), hint(k.SecretHint),
			k.State, fmt.Sprint(k.InFlight), e.reasonUntil(k.State, reason, k.Until)}
		if narrow {
			row = slices.Delete(row, 3, 4)
		}
		rows = append(rows, row)
		labels = append(labels, k.KeyID)
	}
	header := []string{"KEY", "PROJECT", "MODELS", "SECRET", "STATE", "IN-FLIGHT", "REASON/UNTIL"}
	if narrow {
		header = slices.Delete(header, 3, 4)
	}
	fitTableWidth(w, width, !compact, header, rows, labels)

	fmt.Fprintf(w, "%sBUCKETS: %d\n", sep, len(st.Buckets))
	rows, labels = nil, nil
	for _, b := range st.Buckets {
		rows = append(rows, []string{b.Project, b.Model, b.State, counter(b.RPM), counter(b.TPM), counter(b.RPD),
			e.reasonUntil(b.State, b.Reason, b.Until)})
		labels = append(labels, b.Project+"/"+b.Model)
	}
	fitTableWidth(w, width, !compact, []string{"PROJECT", "MODEL", "STATE", "RPM", "TPM", "RPD", "REASON/UNTIL"}, rows, labels)
}

// printTop writes the top of status: keyd, its config, the last load
// error and every warning.
func (e *env) printTop(w io.Writer, st *api.Status) {
	fmt.Fprintf(w, "keyd %s, up %s, socket %s\n", clean(st.Version), fmtDuration(time.Duration(st.UptimeS)*time.Second), e.socketPath())
	cfg := st.Config
	loaded := "never"
	if !cfg.LoadedAt.IsZero() {
		loaded = fmt.Sprintf("%s (%s)", cfg.LoadedAt.In(e.loc).Format("2006-01-02 15:04:05"), e.ago(cfg.LoadedAt))
	}
	fmt.Fprintf(w, "config: %s, loaded %s\n", clean(cfg.Path), loaded)
	if cfg.LastError != "" {
		fmt.Fprintf(w, "LAST ERROR (keyd kept the config above):\n")
		for _, l := range strings.Split(strings.TrimSpace(cfg.LastError), "\n") {
			fmt.Fprintf(w, "  %s\n", clean(l))
		}
	}
	printWarnings(w, statusWarnings(st))
	if len(st.Waiting) > 0 {
		fmt.Fprintf(w, "waiting for capacity: %s\n", waitingLine(st.Waiting))
	}
}

// waitingLine says how many lease requests wait for each model, and for
// how long the first in line has: "gemini-2.5-flash 37 (oldest 12s)".
func waitingLine(ws []api.ModelWaiting) string {
	parts := make([]string, 0, len(ws))
	for _, m := range ws {
		parts = append(parts, fmt.Sprintf("%s %d (oldest %s)", clean(m.Model), m.Requests, fmtDuration(time.Duration(m.OldestMS)*time.Millisecond)))
	}
	return strings.Join(parts, "; ")
}

// statusWarnings are the config's warnings, then the buckets', in the
// order of the buckets.
func statusWarnings(st *api.Status) []string {
	out := slices.Clone(st.Config.Warnings)
	for _, b := range st.Buckets {
		out = append(out, b.Warnings...)
	}
	return out
}

// statusTop is printTop in a line or two: version, uptime, the config and
// when it loaded, how many warnings, and the last load error.
func (e *env) statusTop(w io.Writer, st *api.Status) {
	cfg := st.Config
	loaded := "never loaded"
	if !cfg.LoadedAt.IsZero() {
		loaded = "loaded " + e.ago(cfg.LoadedAt)
	}
	fmt.Fprintf(w, "keyd %s, up %s; %s %s; %s\n", clean(st.Version), fmtDuration(time.Duration(st.UptimeS)*time.Second),
		clean(cfg.Path), loaded, plural(len(statusWarnings(st)), "warning"))
	if cfg.LastError != "" {
		fmt.Fprintf(w, "LAST ERROR (config kept): %s\n", clean(strings.Join(strings.Fields(cfg.LastError), " ")))
	}
	if len(st.Waiting) > 0 {
		fmt.Fprintf(w, "waiting: %s\n", waitingLine(st.Waiting))
	}
}

// models lists a key's models in at most modelsWidth columns: the first
// ones, then "+N" for the rest.
func models(ms []string) string {
	s := strings.Join(ms, ",")
	if len(ms) <= 1 || len([]rune(s)) <= modelsWidth {
		return s
	}
	for i := len(ms) - 1; i >= 1; i-- {
		s = strings.Join(ms[:i], ",") + fmt.Sprintf(" +%d", len(ms)-i)
		if len([]rune(s)) <= modelsWidth || i == 1 {
			return s
		}
	}
	return s
}

// printWarnings prints warnings, or that there are none: their absence is
// worth stating too. A warning longer than a line is wrapped, its next
// lines indented under its first.
func printWarnings(w io.Writer, warnings []string) {
	if len(warnings) == 0 {
		fmt.Fprintf(w, "warnings: none\n")
		return
	}
	fmt.Fprintf(w, "WARNINGS (%d):\n", len(warnings))
	for _, s := range warnings {
		for i, l := range wrap(clean(s), lineWidth-4, 10) {
			if i == 0 {
				fmt.Fprintf(w, "  ! %s\n", l)
			} else {
				fmt.Fprintf(w, "    %s\n", l)
			}
		}
	}
}

// keyCounts says how many keys are in each state: "5 (3 ready, 2 cooling)".
func keyCounts(keys []api.KeyStatus) string {
	order := []string{api.StateReady, api.StateCooling, api.StateExhausted, api.StateDisabled, api.StateNoSecret}
	n := map[string]int{}
	for _, k := range keys {
		if n[k.State] == 0 && !slices.Contains(order, k.State) {
			order = append(order, k.State)
		}
		n[k.State]++
	}
	var parts []string
	for _, s := range order {
		if n[s] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n[s], clean(s)))
		}
	}
	if len(parts) == 0 {
		return "0"
	}
	return fmt.Sprintf("%d (%s)", len(keys), strings.Join(parts, ", "))
}
