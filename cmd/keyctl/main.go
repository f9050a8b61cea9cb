// Command keyctl is keyd's command-line client: status, leases, reports,
// admin actions and an offline config check. See keyctl help.
package main

import (
	"os"

	"github.com/keyd/keyd/internal/keyctl"
)

func main() { os.Exit(keyctl.Main(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)) }
