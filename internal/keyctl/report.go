package keyctl

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/keyd/keyd/api"
)

// maxErrorFile bounds --error-file; keyd takes request bodies up to 1 MiB.
const maxErrorFile = 1<<20 - 4096

var reportCmd = &command{
	name:  "report",
	args:  "LEASE_ID (--status N [--error-file F] [--prompt-tokens N] [--output-tokens N] | --unused) [--json]",
	short: "report how the call made under a lease went",
	long: `Report tells keyd the outcome of the call made with a lease's key, and prints
how keyd classified it and what it did (e.g. put a bucket in cooldown).

Give exactly one of:
  --status N   the HTTP status Gemini answered (0 for a network error); for a
               failure, --error-file holds Gemini's error body as received
  --unused     the call was never sent: the reservation is refunded`,
	setup: func(e *env, fs *flag.FlagSet) func(context.Context, []string) error {
		status := fs.Int("status", 0, "HTTP status `N` Gemini answered; 0 for a network error")
		errorFile := fs.String("error-file", "", "file `F` holding Gemini's raw error body (JSON); - reads stdin")
		prompt := fs.Int64("prompt-tokens", 0, "`N` = usageMetadata.promptTokenCount of a successful call")
		output := fs.Int64("output-tokens", 0, "`N` = usageMetadata.candidatesTokenCount of a successful call")
		unused := fs.Bool("unused", false, "the call was never sent")
		asJSON := fs.Bool("json", false, "print keyd's answer as JSON")
		return func(ctx context.Context, args []string) error {
			set := map[string]bool{}
			fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
			switch {
			case len(args) == 0:
				return usagef("report", "missing LEASE_ID")
			case len(args) > 1:
				return usagef("report", "unexpected argument %q", args[1])
			case set["status"] == *unused:
				return usagef("report", "give exactly one of --status N and --unused")
			case *unused && (set["error-file"] || set["prompt-tokens"] || set["output-tokens"]):
				return usagef("report", "--unused takes no --error-file, --prompt-tokens or --output-tokens")
			case set["status"] && (*status < 0 || *status > 599 || *status > 0 && *status < 100):
				return usagef("report", "--status must be an HTTP status (100-599) or 0 for a network error, got %d", *status)
			case set["error-file"] && *status >= 200 && *status <= 299:
				return usagef("report", "--error-file is for a failed call, but --status %d is a success", *status)
			case *prompt < 0 || *output < 0:
				return usagef("report", "token counts must be >= 0")
			}
			rep := api.ReportRequest{Status: *status}
			if *unused {
				rep = api.ReportRequest{Outcome: api.OutcomeUnused}
			}
			if set["prompt-tokens"] || set["output-tokens"] {
				rep.Usage = &api.Usage{PromptTokens: *prompt, OutputTokens: *output, TotalTokens: *prompt + *output}
			}
			if *errorFile != "" {
				body, err := e.readErrorFile(*errorFile)
				if err != nil {
					return err
				}
				rep.Error = body
			}
			ctx, cancel := context.WithTimeout(ctx, callTimeout)
			defer cancel()
			resp, err := e.client().Report(ctx, args[0], rep)
			if err != nil {
				return err
			}
			if *asJSON {
				return e.printJSON(resp)
			}
			fmt.Fprintf(e.stdout, "lease %s (key %s): %s\n", clean(resp.LeaseID), clean(resp.KeyID), clean(resp.Classification))
			if resp.Action != "" {
				fmt.Fprintf(e.stdout, "action: %s\n", clean(resp.Action))
			}
			if resp.Duplicate {
				fmt.Fprintf(e.stdout, "already reported: the first report stands, nothing was applied twice\n")
			}
			return nil
		}
	},
}

// readErrorFile reads Gemini's error body from path ("-" is stdin). A JSON
// body is sent as it is; anything else (an HTML page from a proxy) as a
// JSON string, which keyd classifies on the status alone.
func (e *env) readErrorFile(path string) (any, error) {
	var r io.Reader = e.stdin
	name := "stdin"
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("--error-file: %w", err)
		}
		defer f.Close()
		r, name = f, path
	}
	data, err := io.ReadAll(io.LimitReader(r, maxErrorFile+1))
	if err != nil {
		return nil, fmt.Errorf("--error-file: reading %s: %w", name, err)
	}
	if len(data) > maxErrorFile {
		return nil, fmt.Errorf("--error-file: %s is over %d bytes: is it really a Gemini error body?", name, maxErrorFile)
	}
	data = bytes.TrimSpace(data)
	if len(data) == 0 {
		return nil, fmt.Errorf("--error-file: %s is empty", name)
	}
	if json.Valid(data) {
		return json.RawMessage(data), nil
	}
	fmt.Fprintf(e.stderr, "keyctl: note: %s is not JSON: sending it as text\n", name)
	return string(data), nil
}
