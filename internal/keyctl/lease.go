package keyctl

import (
	"context"
	"flag"
	"fmt"
	"time"

	"github.com/keyd/keyd/api"
)

var leaseCmd = &command{
	name:  "lease",
	args:  "--model M [--tokens N] [--wait D] [--workload W] [--client NAME] [--json | --env]",
	short: "take a key lease for one Gemini call (prints the secret)",
	long: `Lease asks keyd for a key that has capacity for one call to the model, and
prints the lease, secret included: that is the point of a lease. Report the
call's outcome afterwards with 'keyctl report LEASE_ID'.

With --env the output is shell code for eval:
  eval "$(keyctl lease --model gemini-2.5-flash --env)"
sets GEMINI_API_KEY, KEYD_LEASE_ID and KEYD_KEY_ID.

When no key has capacity, keyctl waits up to --wait for one, then exits
with code 3, saying when a retry can succeed.`,
	setup: func(e *env, fs *flag.FlagSet) func(context.Context, []string) error {
		var req api.LeaseRequest
		fs.StringVar(&req.Model, "model", "", "Gemini model `M` to call, e.g. gemini-2.5-flash (required)")
		fs.Int64Var(&req.Tokens, "tokens", 0, "estimated input tokens `N` of the call (default: the config's default_tokens)")
		wait := fs.Duration("wait", 0, "how long `D` to wait for capacity, e.g. 30s (at most 10m; default: answer at once)")
		fs.StringVar(&req.WorkloadType, "workload", "", "lease only keys whose workload_type is `W`")
		fs.StringVar(&req.Client, "client", "keyctl", "`NAME` of the caller in keyd's logs and usage")
		asJSON := fs.Bool("json", false, "print the lease as JSON")
		asEnv := fs.Bool("env", false, "print export lines for eval: GEMINI_API_KEY, KEYD_LEASE_ID, KEYD_KEY_ID")
		return func(ctx context.Context, args []string) error {
			switch {
			case len(args) > 0:
				return usagef("lease", "unexpected argument %q", args[0])
			case req.Model == "":
				return usagef("lease", "--model is required")
			case req.Tokens < 0:
				return usagef("lease", "--tokens must be >= 0, got %d", req.Tokens)
			case *wait < 0 || *wait > api.MaxWait:
				return usagef("lease", "--wait must be between 0 and %s, got %s", api.MaxWait, *wait)
			case *asJSON && *asEnv:
				return usagef("lease", "use one of --json and --env")
			}
			req.WaitMS = wait.Milliseconds()
			if *wait > 0 && req.WaitMS == 0 {
				req.WaitMS = 1
			}
			ctx, cancel := context.WithTimeout(ctx, *wait+callTimeout)
			defer cancel()
			l, err := e.client().Lease(ctx, req)
			if err != nil {
				return err
			}
			switch {
			case *asJSON:
				return e.printJSON(l)
			case *asEnv:
				fmt.Fprintf(e.stdout, "export GEMINI_API_KEY=%s\nexport KEYD_LEASE_ID=%s\nexport KEYD_KEY_ID=%s\n",
					shellQuote(l.Secret), shellQuote(l.LeaseID), shellQuote(l.KeyID))
				return nil
			}
			tw := newTable(e.stdout)
			row(tw, "lease_id", l.LeaseID)
			row(tw, "key_id", l.KeyID)
			row(tw, "project", l.Project)
			row(tw, "model", l.Model)
			row(tw, "tokens", fmt.Sprint(l.Tokens))
			row(tw, "expires_at", fmt.Sprintf("%s (in %s)", l.ExpiresAt.Format(time.RFC3339), fmtDuration(l.ExpiresAt.Sub(e.now()))))
			row(tw, "secret", l.Secret)
			tw.Flush()
			fmt.Fprintf(e.stderr, "report the outcome: keyctl report %s --status CODE (or --unused)\n", l.LeaseID)
			return nil
		}
	},
}
