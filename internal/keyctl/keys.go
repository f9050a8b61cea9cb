package keyctl

import (
	"context"
	"flag"
	"fmt"
)

// keyActionCmd is disable, enable or reset: one admin action on one key.
func keyActionCmd(action, short string) *command {
	return &command{
		name:  action,
		args:  "KEY [--json]",
		short: short + " (admin)",
		long: fmt.Sprintf(`%s KEY: %s. The change is kept across
restarts and reloads. Prints the key's new state.`, action, short),
		setup: func(e *env, fs *flag.FlagSet) func(context.Context, []string) error {
			asJSON := fs.Bool("json", false, "print keyd's answer as JSON")
			return func(ctx context.Context, args []string) error {
				switch {
				case len(args) == 0:
					return usagef(action, "missing KEY: name the key_id to %s", action)
				case len(args) > 1:
					return usagef(action, "unexpected argument %q: %s takes one KEY", args[1], action)
				}
				ctx, cancel := context.WithTimeout(ctx, callTimeout)
				defer cancel()
				resp, err := e.client().KeyAction(ctx, args[0], action)
				if err != nil {
					return err
				}
				if *asJSON {
					return e.printJSON(resp)
				}
				fmt.Fprintf(e.stdout, "key %s: %s\n", clean(resp.KeyID), clean(resp.State))
				return nil
			}
		},
	}
}
