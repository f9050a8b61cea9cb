// Package keyctl implements the keyctl command, keyd's command-line
// client: one file per subcommand, all output through the writers Main is
// given.
package keyctl

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/client"
)

// Version is keyctl's version, set at build time with -ldflags "-X".
var Version = "0.1.0-dev"

// Exit codes.
const (
	exitOK         = 0
	exitError      = 1
	exitUsage      = 2
	exitNoCapacity = 3
)

// callTimeout bounds a call to keyd, beyond any wait the caller asked for.
const callTimeout = 30 * time.Second

// env is what a subcommand runs with. Tests build their own.
type env struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	getenv         func(string) string
	now            func() time.Time
	loc            *time.Location // for times shown to humans

	socket string // --socket; "" means api.ClientSocketPathFrom
}

func (e *env) socketPath() string {
	if e.socket != "" {
		return e.socket
	}
	return api.ClientSocketPathFrom(e.getenv, os.Getuid(), func(p string) bool { _, err := os.Stat(p); return err == nil })
}

func (e *env) client() *client.Client { return client.New(e.socketPath()) }

// printJSON writes v indented, as --json output.
func (e *env) printJSON(v any) error {
	enc := json.NewEncoder(e.stdout)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}

// command is one subcommand.
type command struct {
	name  string
	args  string // synopsis after "keyctl NAME", e.g. "[--json]"
	short string // one line, for keyctl help
	long  string // what keyctl NAME --help says above the flags
	// setup registers the command's flags on fs and returns the function
	// that runs the command with its positional arguments.
	setup func(e *env, fs *flag.FlagSet) func(ctx context.Context, args []string) error
	// rawArgs: the first positional argument (or "--") ends the command's
	// flags, and it and all that follow are passed on as they are (a
	// command line of its own, as for keyctl run).
	rawArgs bool
}

// commands is every subcommand, in the order keyctl help lists them.
func commands() []*command {
	return []*command{
		statusCmd,
		watchCmd,
		leaseCmd,
		reportCmd,
		runCmd,
		reloadCmd,
		keyActionCmd("disable", "stop leasing a key until it is enabled again"),
		keyActionCmd("enable", "lift a disable (by an admin, or by keyd after an invalid-key error)"),
		keyActionCmd("reset", "enable a key and clear its buckets' penalties (cooldown, exhausted, disabled) and limits learned from 429s"),
		checkCmd,
		usageCmd,
		waitCmd,
		versionCmd,
		helpCmd(),
	}
}

func findCommand(name string) *command {
	for _, c := range commands() {
		if c.name == name {
			return c
		}
	}
	return nil
}

// usageError is a bad command line: exit code 2 with a usage hint.
type usageError struct {
	cmd string // "" for keyctl itself
	msg string
}

func (e *usageError) Error() string { return e.msg }

func usagef(cmd, format string, args ...any) error {
	return &usageError{cmd: cmd, msg: fmt.Sprintf(format, args...)}
}

// exitCodeError ends keyctl with code after printing msg (when not empty).
type exitCodeError struct {
	code int
	msg  string
}

func (e *exitCodeError) Error() string { return e.msg }

// Main runs keyctl with args (without the program name) and returns the
// exit code: 0 ok, 1 error, 2 usage, 3 no capacity.
func Main(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	e := &env{
		stdin:  stdin,
		stdout: stdout,
		stderr: stderr,
		getenv: os.Getenv,
		now:    time.Now,
		loc:    time.Local,
	}
	return run(context.Background(), e, args)
}

func run(ctx context.Context, e *env, args []string) int {
	fs := flag.NewFlagSet("keyctl", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&e.socket, "socket", "", "keyd's Unix socket `PATH`")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printUsage(e, e.stdout)
			return exitOK
		}
		return report(e, usagef("", "%v", err))
	}
	args = fs.Args()
	if len(args) == 0 {
		printUsage(e, e.stderr)
		return exitUsage
	}
	cmd := findCommand(args[0])
	if cmd == nil {
		msg := fmt.Sprintf("unknown command %q", args[0])
		var names []string
		for _, c := range commands() {
			names = append(names, c.name)
		}
		if s := nearest(args[0], names); s != "" {
			msg += fmt.Sprintf(" (did you mean %q?)", s)
		}
		return report(e, usagef("", "%s", msg))
	}
	return report(e, runCommand(ctx, e, cmd, args[1:]))
}

// runCommand parses cmd's flags, which may come before, between or after
// its arguments, and runs it.
func runCommand(ctx context.Context, e *env, cmd *command, args []string) error {
	fs := flag.NewFlagSet("keyctl "+cmd.name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	addSocketFlag(fs, &e.socket)
	runFn := cmd.setup(e, fs)
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				printCommandHelp(e.stdout, cmd, fs)
				return nil
			}
			return usagef(cmd.name, "%v", err)
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		if cmd.rawArgs {
			pos = args
			break
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
	return runFn(ctx, pos)
}

// addSocketFlag registers a subcommand's --socket, which keeps the value
// *p holds, from a --socket before the subcommand.
func addSocketFlag(fs *flag.FlagSet, p *string) {
	fs.StringVar(p, "socket", *p, "keyd's Unix socket `PATH` (also accepted before the command)")
}

// report prints err the way keyctl does and returns the exit code.
func report(e *env, err error) int {
	if err == nil {
		return exitOK
	}
	var ue *usageError
	var xe *exitCodeError
	switch {
	case errors.As(err, &ue):
		fmt.Fprintf(e.stderr, "keyctl: %s\n", ue.msg)
		if c := findCommand(ue.cmd); c != nil {
			fmt.Fprintf(e.stderr, "usage: keyctl %s %s\nrun 'keyctl %s --help' for details\n", c.name, c.args, c.name)
		} else {
			fmt.Fprintf(e.stderr, "usage: keyctl [--socket PATH] COMMAND [flags]\nrun 'keyctl help' for the commands\n")
		}
		return exitUsage
	case errors.As(err, &xe):
		if xe.msg != "" {
			fmt.Fprintf(e.stderr, "keyctl: %s\n", xe.msg)
		}
		return xe.code
	}
	if d, ok := client.IsNoCapacity(err); ok {
		msg := err.Error()
		if d > 0 {
			msg += fmt.Sprintf(" (retry in %s)", fmtDuration(d))
		}
		fmt.Fprintf(e.stderr, "keyctl: %s\n", msg)
		return exitNoCapacity
	}
	fmt.Fprintf(e.stderr, "keyctl: %s\n", err)
	return exitError
}

func printUsage(e *env, w io.Writer) {
	fmt.Fprintf(w, `keyctl controls keyd, the daemon that leases Gemini API keys.

usage: keyctl [--socket PATH] COMMAND [flags] [args]

commands:
`)
	tw := newTable(w)
	for _, c := range commands() {
		fmt.Fprintf(tw, "  %s\t%s\n", c.name, c.short)
	}
	tw.Flush()
	fmt.Fprintf(w, `
global flags:
  --socket PATH  keyd's Unix socket; default $KEYD_SOCKET, else
                 $RUNTIME_DIRECTORY/keyd.sock, else /run/keyd/keyd.sock for
                 root, else $XDG_RUNTIME_DIR/keyd/keyd.sock (here: %s)

Run 'keyctl COMMAND --help' for a command's flags.
Exit codes: 0 ok, 1 error, 2 usage, 3 no capacity (lease refused);
keyctl run exits with its command's code.
`, e.socketPath())
}

func printCommandHelp(w io.Writer, cmd *command, fs *flag.FlagSet) {
	fmt.Fprintf(w, "usage: keyctl %s %s\n\n%s\n", cmd.name, cmd.args, strings.TrimSpace(cmd.long))
	var flags []*flag.Flag
	fs.VisitAll(func(f *flag.Flag) { flags = append(flags, f) })
	if len(flags) == 0 {
		return
	}
	fmt.Fprintf(w, "\nflags:\n")
	tw := newTable(w)
	for _, f := range flags {
		name, usage := flag.UnquoteUsage(f)
		left := "--" + f.Name
		if name != "" {
			left += " " + name
		}
		lines := strings.Split(usage, "\n")
		if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "0" && f.DefValue != "0s" && f.Name != "socket" {
			lines[len(lines)-1] += fmt.Sprintf(" (default %s)", f.DefValue)
		}
		fmt.Fprintf(tw, "  %s\t%s\n", left, lines[0])
		for _, l := range lines[1:] {
			fmt.Fprintf(tw, "  \t%s\n", l)
		}
	}
	tw.Flush()
}

// nearest returns the candidate closest to s, if it is close enough to be
// a typo, or else the first candidate s is a prefix of.
func nearest(s string, candidates []string) string {
	best, bestD := "", max(1, len(s)/3)+1
	for _, c := range candidates {
		if d := editDistance(s, c); d < bestD {
			best, bestD = c, d
		}
	}
	if best == "" && len(s) >= 2 {
		for _, c := range candidates {
			if strings.HasPrefix(c, s) {
				return c
			}
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
