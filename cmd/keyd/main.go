// Command keyd owns a pool of Gemini API keys and leases them to local
// processes over a Unix socket. See keyd --help and README.md.
package main

import (
	"os"

	"github.com/keyd/keyd/internal/daemon"
)

func main() { os.Exit(daemon.Main(os.Args[1:])) }
