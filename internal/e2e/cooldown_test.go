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

// TestConcurrent429sCoolOnce: several leases of one bucket are in flight
// together and Gemini answers each of them 429 (per-minute quota), as
// happens when keyd's window and Gemini's disagree by a few milliseconds
// at a window's edge. Those 429s are one event, the same verdict on
// requests that were all sent before the first answer came back: the
// bucket must cool as for one 429, not once more, doubled, for each
// report. (TestPool saw it before d3376d9: at the refill 60 s after a
// burst, some twenty 429s in 100 ms cooled two buckets for MaxCooldown,
// 10 minutes, and the pool ran at a quarter of its capacity. This is the
// same, end to end through keyd's reports, in a tenth of a second.)
func TestConcurrent429sCoolOnce(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "keys.json")
	env := filepath.Join(dir, "keyd.env")
	writeFile(t, cfg, `{"keys": [{"key_id": "k", "project": "p", "model_name": "m", "rpm": 10, "tpm": 1000000}]}`)
	writeFile(t, env, "GEMINI_KEY_k=AIzaFAKE-cooldown-k-0001\n")
	sock := filepath.Join(shortTempDir(t, "kc"), "s.sock")
	k := startKeyd(t, sock, "--config", cfg, "--env-file", env, "--state-dir", filepath.Join(dir, "state"))
	defer k.stop()
	c := client.New(sock)
	defer c.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	body, err := os.ReadFile(filepath.Join("..", "gemini", "testdata", "429_paid_rpm.json"))
	if err != nil {
		t.Fatal(err)
	}

	const n = 6
	var leases []string
	for range n {
		l, err := c.Lease(ctx, api.LeaseRequest{Model: "m", Tokens: 10})
		if err != nil {
			t.Fatal(err)
		}
		leases = append(leases, l.LeaseID)
	}
	start := time.Now()
	for i, id := range leases {
		r, err := c.Report(ctx, id, api.ReportRequest{Status: 429, Error: rawJSON(body)})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("report %d: %s: %s", i+1, r.Classification, r.Action)
	}
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b := st.Buckets[0]
	if b.State != api.StateCooling || b.Until == nil {
		t.Fatalf("bucket %s after %d 429s: %+v; want cooling", b.Project, n, b)
	}
	// One 429 cools the bucket until its oldest grant leaves the window
	// (60 s) or for the body's retryDelay (34 s), whichever is longer.
	if d := b.Until.Sub(start); d > 61*time.Second {
		t.Errorf("after %d 429s on leases in flight together the bucket cools for %v; want about 60 s, as after one", n, d.Round(time.Second))
	}
}
