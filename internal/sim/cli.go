package sim

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"
)

// Problems checks a suite's outcome for what must hold whatever the
// numbers: the provider never admitted a request above a limit (its own
// recheck), keyd never caused a 429, and keyd used at least 90% of the
// quota wherever demand reached the capacity; the last two only where
// keyd's configuration matches the provider (not Scenario.Configured). It
// returns one line per failure.
func (o *Outcome) Problems() []string {
	var out []string
	for i, s := range o.Scenarios {
		for _, r := range o.Results[i] {
			for _, v := range r.Violations {
				out = append(out, fmt.Sprintf("%s/%s: the provider admitted a request above a limit: %s", s.Name, r.Policy, v))
			}
			if r.Policy != "keyd" || s.Configured != nil {
				continue
			}
			if r.Provider429 > 0 {
				out = append(out, fmt.Sprintf("%s/keyd: %d requests above the limits (429s from the provider)", s.Name, r.Provider429))
			}
			if s.Load >= 1 && r.QuotaUsed < 0.9 {
				out = append(out, fmt.Sprintf("%s/keyd: used %.1f%% of the quota with demand at %.1fx the capacity, want at least 90%%", s.Name, 100*r.QuotaUsed, s.Load))
			}
		}
	}
	return out
}

// Main is `keyd-bench sim`: it runs the suite, prints the tables and the
// wall time, writes the report and its plots into -out, and fails when
// Problems finds any.
func Main(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("keyd-bench sim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	smoke := fs.Bool("smoke", false, "run the short suite (20 virtual minutes per scenario), as CI does")
	out := fs.String("out", "", "write policies.md and its SVG plots into `DIR` (e.g. docs/bench)")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: keyd-bench sim [-smoke] [-out DIR]\n\n"+
			"Runs keyd's policy simulator: every scenario's trace through keyd and the baseline\n"+
			"policies, in virtual time. Prints the tables and the wall time.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "keyd-bench sim: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	start := time.Now()
	o, err := RunSuite(Suite(*smoke))
	if err != nil {
		fmt.Fprintf(stderr, "keyd-bench sim: %v\n", err)
		return 1
	}
	wall := time.Since(start)
	fmt.Fprint(stdout, o.Text())
	var virtual time.Duration
	for _, s := range o.Scenarios {
		virtual += s.Duration
	}
	fmt.Fprintf(stdout, "%d runs, %v of virtual time each policy, in %v of wall time\n",
		len(o.Scenarios)*len(Policies), virtual, wall.Round(time.Millisecond))
	if *out != "" {
		if err := o.Write(*out, *smoke); err != nil {
			fmt.Fprintf(stderr, "keyd-bench sim: %v\n", err)
			return 1
		}
		fmt.Fprintf(stdout, "wrote %s\n", filepath.Join(*out, "policies.md"))
	}
	if ps := o.Problems(); len(ps) > 0 {
		for _, p := range ps {
			fmt.Fprintf(stderr, "keyd-bench sim: %s\n", p)
		}
		return 1
	}
	return 0
}

// Write writes policies.md and the plots into dir.
func (o *Outcome) Write(dir string, smoke bool) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "policies.md"), o.Markdown(smoke), 0o644); err != nil {
		return err
	}
	for _, pl := range Plots {
		if svg := o.SVG(pl.Scenario); svg != nil {
			if err := os.WriteFile(filepath.Join(dir, pl.File), svg, 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}
