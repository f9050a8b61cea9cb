// Command keyd-bench runs keyd's benchmarks that are not Go benchmarks.
//
//	keyd-bench sim [-smoke] [-out DIR]
//
// sim runs the policy simulator (internal/sim): hours of traffic in
// virtual time through keyd's real lease code and the key-rotation
// policies people use today, against a model of Gemini's limits. With
// -out it writes policies.md and its SVG plots (make bench-sim writes
// docs/bench/).
package main

import (
	"fmt"
	"io"
	"os"

	"github.com/keyd/keyd/internal/sim"
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprintln(stderr, "usage: keyd-bench sim [-smoke] [-out DIR]")
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	switch args[0] {
	case "sim":
		return sim.Main(args[1:], stdout, stderr)
	}
	fmt.Fprintf(stderr, "keyd-bench: unknown command %q (commands: sim)\n", args[0])
	return 2
}
