package e2e

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/client"
)

// TestReportAfterRestartWithNewConfig: leases are open when keyd stops,
// and keyd restarts on an edited keys.json (a deploy: systemctl restart
// after editing the file). The open leases come back from the store and
// their callers report them as usual. keyd must answer those reports and
// stay responsive, whatever became of the lease's key or bucket.
func TestReportAfterRestartWithNewConfig(t *testing.T) {
	for _, tc := range []struct {
		name, before, after string
		model, key          string // of the leases taken before the restart
	}{{
		name: "key removed",
		before: `{"keys": [
  {"key_id": "a", "project": "p1", "model_name": "m", "rpm": 10, "tpm": 100000},
  {"key_id": "c", "project": "p3", "model_name": "m2", "rpm": 10, "tpm": 100000}
]}`,
		after: `{"keys": [
  {"key_id": "a", "project": "p1", "model_name": "m", "rpm": 10, "tpm": 100000}
]}`,
		model: "m2", key: "c",
	}, {
		name:   "key moved to another project",
		before: `{"keys": [{"key_id": "a", "project": "p1", "model_name": "m", "rpm": 10, "tpm": 100000}]}`,
		after:  `{"keys": [{"key_id": "a", "project": "p2", "model_name": "m", "rpm": 10, "tpm": 100000}]}`,
		model:  "m", key: "a",
	}} {
		t.Run(tc.name, func(t *testing.T) {
			reportAfterRestart(t, tc.before, tc.after, tc.model, tc.key)
		})
	}
}

func reportAfterRestart(t *testing.T, before, after, model, key string) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "keys.json")
	env := filepath.Join(dir, "keyd.env")
	writeFile(t, cfg, before)
	writeFile(t, env, "GEMINI_KEY_a=AIzaFAKE-restart-a\nGEMINI_KEY_c=AIzaFAKE-restart-c\n")
	sock := filepath.Join(shortTempDir(t, "kr"), "s.sock")
	args := []string{"--config", cfg, "--env-file", env, "--state-dir", filepath.Join(dir, "state")}

	k := startKeyd(t, sock, args...)
	c := client.New(sock)
	ctx := context.Background()
	var leases []string
	for range 3 {
		l, err := c.Lease(ctx, api.LeaseRequest{Model: model})
		if err != nil {
			t.Fatal(err)
		}
		leases = append(leases, l.LeaseID)
	}
	c.CloseIdleConnections()
	k.stop()

	writeFile(t, cfg, after)
	k = startKeyd(t, sock, args...)
	c = client.New(sock)
	defer c.CloseIdleConnections()
	invalid, err := os.ReadFile(filepath.Join("..", "gemini", "testdata", "400_api_key_invalid.json"))
	if err != nil {
		t.Fatal(err)
	}
	for i, rep := range []api.ReportRequest{
		{Status: 200, Usage: &api.Usage{PromptTokens: 10}},
		{Outcome: api.OutcomeUnused},
		{Status: 400, Error: rawJSON(invalid)},
	} {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		r, err := c.Report(rctx, leases[i], rep)
		cancel()
		if err != nil {
			t.Errorf("report %d of lease %s, open on key %s at the restart: %v", i, leases[i], key, err)
		} else if r.KeyID != key || r.Duplicate {
			t.Errorf("report %d: %+v, want a first report on key %s", i, r, key)
		}
		// keyd must still answer.
		hctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		_, err = c.Health(hctx)
		cancel()
		if err != nil {
			t.Fatalf("keyd stopped answering after report %d (%v); its log:\n%s", i, err, k.log)
		}
	}
	if t.Failed() {
		return // keyd may be wedged: cleanup kills it
	}
	k.stop()
}

// rawJSON is a Gemini error body as the report's Error: sent as it is.
type rawJSON []byte

func (r rawJSON) MarshalJSON() ([]byte, error) { return r, nil }
