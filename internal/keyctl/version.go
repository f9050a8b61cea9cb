package keyctl

import (
	"context"
	"flag"
	"fmt"
	"time"
)

var versionCmd = &command{
	name:  "version",
	args:  "",
	short: "print keyctl's version, and keyd's when it answers",
	long:  `Version prints keyctl's version, then keyd's if keyd answers within 2s.`,
	setup: func(e *env, fs *flag.FlagSet) func(context.Context, []string) error {
		return func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return usagef("version", "unexpected argument %q", args[0])
			}
			fmt.Fprintf(e.stdout, "keyctl %s\n", Version)
			ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			c := e.client()
			if h, err := c.Health(ctx); err == nil {
				fmt.Fprintf(e.stdout, "keyd   %s (socket %s)\n", clean(h.Version), c.Socket())
			} else {
				fmt.Fprintf(e.stdout, "keyd   unknown: %v\n", err)
			}
			return nil
		}
	},
}
