package keyctl

import (
	"context"
	"flag"
	"fmt"
)

var reloadCmd = &command{
	name:  "reload",
	args:  "[--json]",
	short: "make keyd reload its config (admin)",
	long: `Reload makes keyd read its config file again, and prints the outcome. A file
that fails to load changes nothing: keyd keeps running the config it has, and
keyctl prints the errors and exits 1. Reloading unchanged bytes is a no-op.`,
	setup: func(e *env, fs *flag.FlagSet) func(context.Context, []string) error {
		asJSON := fs.Bool("json", false, "print keyd's answer as JSON")
		return func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return usagef("reload", "unexpected argument %q", args[0])
			}
			ctx, cancel := context.WithTimeout(ctx, callTimeout)
			defer cancel()
			resp, err := e.client().Reload(ctx)
			if err != nil {
				return err
			}
			if *asJSON {
				return e.printJSON(resp)
			}
			changed := "unchanged: same bytes, nothing to do"
			if resp.Changed {
				changed = "changed"
			}
			fmt.Fprintf(e.stdout, "reloaded %s: %s (%s)\n", clean(resp.Path), plural(resp.Keys, "key"), changed)
			printWarnings(e.stdout, resp.Warnings)
			return nil
		}
	},
}
