// Command poolgen is the Go load generator of keyd's end-to-end pool test
// (internal/e2e/pool_test.go), which builds it; testdata/poolgen.py is its
// Python twin, with the same protocol.
//
// POOLGEN_WORKERS goroutines call GenerateContent through one
// client/gemini Generator, which leases a key from keyd, calls the Gemini
// API at POOLGEN_BASE_URL, reports the outcome and retries under another
// lease after a 429 or an invalid key. Worker 0's first call, if it is
// granted within POOLGEN_LONG_WITHIN seconds of the start, sends
// POOLGEN_LONG_PROMPT (which the test's fake answers slowly); every other
// call a short prompt.
//
// Protocol: {"event":"ready"} on stdout once keyd answers; work after a
// line on stdin; stop at EOF on stdin. A stop cancels the calls in
// progress, so the test stops the generators only when no call is in
// flight and keyd has nothing to grant: what is canceled then is only
// waiting. Every outcome is a JSON line on stdout (see genLine). The
// Generator's warnings (a report that could not be made) go to stderr as
// JSON; the test requires there are none.
//
// Environment: POOLGEN_SOCKET, POOLGEN_BASE_URL, POOLGEN_MODEL,
// POOLGEN_NAME, POOLGEN_WORKERS, POOLGEN_LONG_PROMPT, POOLGEN_LONG_WITHIN.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"time"

	"google.golang.org/genai"

	"github.com/keyd/keyd/client"
	"github.com/keyd/keyd/client/gemini"
)

// genLine is one line of stdout: the fields of the test's genLine that
// the Go generator knows. It cannot see a successful call's lease or key
// (the Generator keeps them), only the response's id.
type genLine struct {
	Event    string `json:"event"` // ready, call, lease_error, done
	Gen      string `json:"gen"`
	Lang     string `json:"lang"`
	Worker   int    `json:"worker"`
	Status   int    `json:"status,omitempty"`
	Resp     string `json:"resp,omitempty"` // the response's responseId
	Long     bool   `json:"long,omitempty"`
	Key      string `json:"key,omitempty"` // of a failed call's last attempt
	Attempts int    `json:"attempts,omitempty"`
	Code     string `json:"code,omitempty"`
	Err      string `json:"error,omitempty"`
}

func main() { os.Exit(run()) }

func run() int {
	env := func(k string) string { return os.Getenv("POOLGEN_" + k) }
	name, model, longPrompt := env("NAME"), env("MODEL"), env("LONG_PROMPT")
	workers, err := strconv.Atoi(env("WORKERS"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "poolgen: POOLGEN_WORKERS:", err)
		return 2
	}
	longWithin, err := time.ParseDuration(env("LONG_WITHIN") + "s")
	if err != nil {
		fmt.Fprintln(os.Stderr, "poolgen: POOLGEN_LONG_WITHIN:", err)
		return 2
	}
	var outMu sync.Mutex
	enc := json.NewEncoder(os.Stdout)
	emit := func(l genLine) {
		l.Gen, l.Lang = name, "go"
		outMu.Lock()
		defer outMu.Unlock()
		enc.Encode(l)
	}

	kc := client.New(env("SOCKET"))
	defer kc.CloseIdleConnections()
	wctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	err = kc.Wait(wctx)
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "poolgen: keyd:", err)
		return 1
	}
	g := gemini.New(kc, gemini.Options{
		BaseURL:    env("BASE_URL"),
		Wait:       90 * time.Second, // queue in keyd for the next free slot
		ClientName: name,
		Logger:     slog.New(slog.NewJSONHandler(os.Stderr, nil)),
	})
	defer g.Close()
	emit(genLine{Event: "ready"})

	in := bufio.NewReader(os.Stdin)
	if _, err := in.ReadString('\n'); err != nil {
		return 0
	}
	goAt := time.Now()
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	go func() {
		io.Copy(io.Discard, in)
		stop()
	}()

	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			first := true
			for i := 1; ctx.Err() == nil; i++ {
				long := w == 0 && first && time.Since(goAt) < longWithin
				prompt := fmt.Sprintf("%s worker %d request %d: say something short.", name, w, i)
				if long {
					prompt = longPrompt
				}
				resp, err := g.GenerateContent(ctx, model, genai.Text(prompt), nil)
				if err == nil {
					first = false
					emit(genLine{Event: "call", Worker: w, Status: 200, Resp: resp.ResponseID, Long: long})
					continue
				}
				if ctx.Err() != nil {
					return // stopping: what was waiting is canceled
				}
				var ge *gemini.Error
				if !errors.As(err, &ge) || ge.Attempts == 0 {
					// keyd refused or did not answer the lease: it is down
					// (killed, coming back), or there is no capacity.
					code := "transport_error"
					if errors.Is(err, client.ErrNotRunning) {
						code = "not_running"
					} else if _, ok := client.IsNoCapacity(err); ok {
						code = "no_capacity"
					}
					emit(genLine{Event: "lease_error", Worker: w, Code: code, Err: err.Error()})
					time.Sleep(100 * time.Millisecond)
					continue
				}
				emit(genLine{Event: "call", Worker: w, Status: ge.Status, Key: ge.KeyID, Attempts: ge.Attempts, Err: err.Error(), Long: long})
			}
		})
	}
	wg.Wait()
	emit(genLine{Event: "done"})
	return 0
}
