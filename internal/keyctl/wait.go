package keyctl

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"time"
)

// defaultWait is wait's default --timeout.
const defaultWait = 30 * time.Second

var waitCmd = &command{
	name:  "wait",
	args:  "[--timeout D]",
	short: "wait until keyd answers (for scripts and unit ordering)",
	long: `Wait polls keyd's health until it answers, then exits 0. When the timeout
passes first it exits 1, saying why keyd could not be reached.`,
	setup: func(e *env, fs *flag.FlagSet) func(context.Context, []string) error {
		timeout := fs.Duration("timeout", defaultWait, "how long `D` to wait, e.g. 1m")
		return func(ctx context.Context, args []string) error {
			switch {
			case len(args) > 0:
				return usagef("wait", "unexpected argument %q", args[0])
			case *timeout <= 0:
				return usagef("wait", "--timeout must be > 0, got %s", *timeout)
			}
			ctx, cancel := context.WithTimeout(ctx, *timeout)
			defer cancel()
			c := e.client()
			if err := c.Wait(ctx); err != nil {
				if errors.Is(err, context.DeadlineExceeded) {
					return fmt.Errorf("keyd did not answer within %s (socket %s)", *timeout, c.Socket())
				}
				return err
			}
			if h, err := c.Health(ctx); err == nil {
				fmt.Fprintf(e.stdout, "keyd %s is up: %d/%d keys ready\n", clean(h.Version), h.KeysReady, h.KeysTotal)
			}
			return nil
		}
	},
}
