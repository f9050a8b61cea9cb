package keyctl

import (
	"context"
	"flag"
	"io"
)

// helpCmd is a function: as a variable it would be part of its own
// initialization, through findCommand.
func helpCmd() *command {
	return &command{
		name:  "help",
		args:  "[COMMAND]",
		short: "explain keyctl, or one command and its flags",
		long:  `Help prints keyctl's commands, or with a COMMAND, that command's flags.`,
		setup: func(e *env, fs *flag.FlagSet) func(context.Context, []string) error {
			return func(ctx context.Context, args []string) error {
				switch {
				case len(args) == 0:
					printUsage(e, e.stdout)
					return nil
				case len(args) > 1:
					return usagef("help", "unexpected argument %q", args[1])
				}
				c := findCommand(args[0])
				if c == nil {
					return usagef("help", "unknown command %q", args[0])
				}
				cfs := flag.NewFlagSet("keyctl "+c.name, flag.ContinueOnError)
				cfs.SetOutput(io.Discard)
				addSocketFlag(cfs, new(string))
				c.setup(e, cfs)
				printCommandHelp(e.stdout, c, cfs)
				return nil
			}
		},
	}
}
