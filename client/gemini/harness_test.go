package gemini

import (
	"context"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/client"
	"github.com/keyd/keyd/internal/daemon"
	"github.com/keyd/keyd/internal/fakegemini"
	"github.com/keyd/keyd/internal/testutil"
)

// TestMain fails the run on leaked goroutines. genai's dependencies start
// one at init (opencensus's stats worker) that lives as long as the process.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("go.opencensus.io/stats/view.(*worker).start"))
}

const flash = "gemini-2.5-flash"

// secretOf is the secret of test key id: "AIza" and 35 more characters,
// the shape of a real key.
func secretOf(id string) string {
	s := "AIzaSyTEST-" + id + "-"
	return s + strings.Repeat("x", 39-len(s))
}

// world is a real keyd (run in-process, as internal/daemon's tests do), a
// fakegemini on a loopback httptest server, and a Generator between them.
type world struct {
	kc    *client.Client
	fake  *fakegemini.Server
	hs    *httptest.Server
	g     *Generator
	log   *testutil.SyncBuffer // keyd's log, at debug
	glog  *testutil.SyncBuffer // the Generator's log
	model string
}

// setup starts keyd with keysJSON (every key_id in ids gets secretOf(id)
// in .env), the fake with fcfg, and a Generator with opts (BaseURL,
// HTTPClient and Logger filled in when empty).
func setup(t *testing.T, keysJSON string, ids []string, fcfg fakegemini.Config, opts Options) *world {
	t.Helper()
	w := &world{log: &testutil.SyncBuffer{}, glog: &testutil.SyncBuffer{}, model: flash}
	dir, err := os.MkdirTemp("", "kg")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.WriteFile(filepath.Join(dir, "keys.json"), []byte(keysJSON), 0o600); err != nil {
		t.Fatal(err)
	}
	var env strings.Builder
	for _, id := range ids {
		fmt.Fprintf(&env, "GEMINI_KEY_%s=%s\n", id, secretOf(id))
	}
	if err := os.WriteFile(filepath.Join(dir, ".env"), []byte(env.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s.sock")
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- daemon.Run(ctx, daemon.Options{
			ConfigPath: filepath.Join(dir, "keys.json"), SocketPath: sock,
			StateDir: filepath.Join(dir, "state"), Log: w.log, LogLevel: slog.LevelDebug,
			Ready: func() { close(ready) },
		})
	}()
	select {
	case <-ready:
	case err := <-done:
		cancel()
		t.Fatalf("keyd did not start: %v\n%s", err, w.log)
	}
	w.kc = client.New(sock)
	t.Cleanup(func() {
		w.kc.CloseIdleConnections()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("keyd stopped with %v", err)
		}
		for _, id := range ids {
			for what, s := range map[string]string{"keyd's log": w.log.String(), "the Generator's log": w.glog.String()} {
				if strings.Contains(s, secretOf(id)) {
					t.Errorf("a secret reached %s:\n%s", what, s)
				}
			}
		}
	})

	w.fake = fakegemini.New(fcfg)
	w.hs = httptest.NewServer(w.fake)
	t.Cleanup(w.hs.Close)
	if opts.BaseURL == "" {
		opts.BaseURL = w.hs.URL
	}
	if opts.HTTPClient == nil {
		opts.HTTPClient = w.hs.Client()
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(w.glog, nil))
	}
	w.g = New(w.kc, opts)
	t.Cleanup(w.g.Close)
	return w
}

// twoProjects is keyd's config of keys a (project p1, preferred) and b
// (project p2) for flash, with generous limits.
const twoProjects = `{"keys":[
 {"key_id":"a","project":"p1","model_name":"gemini-2.5-flash","rpm":100,"tpm":1000000,"priority":1},
 {"key_id":"b","project":"p2","model_name":"gemini-2.5-flash","rpm":100,"tpm":1000000}]}`

// fakeConfig is the fake's world: keys a (p1) and b (p2) with keyd's
// secrets, and flash without limits.
func fakeConfig(model fakegemini.Model) fakegemini.Config {
	if model.Name == "" {
		model.Name = flash
	}
	return fakegemini.Config{
		Keys:   []fakegemini.Key{{Key: secretOf("a"), Project: "p1"}, {Key: secretOf("b"), Project: "p2"}},
		Models: []fakegemini.Model{model},
	}
}

func (w *world) status(t *testing.T) *api.Status {
	t.Helper()
	st, err := w.kc.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func (w *world) bucket(t *testing.T, project string) api.BucketState {
	t.Helper()
	for _, b := range w.status(t).Buckets {
		if b.Project == project && b.Model == w.model {
			return b
		}
	}
	t.Fatalf("no bucket %s/%s", project, w.model)
	return api.BucketState{}
}

func (w *world) key(t *testing.T, id string) api.KeyStatus {
	t.Helper()
	for _, k := range w.status(t).Keys {
		if k.KeyID == id {
			return k
		}
	}
	t.Fatalf("no key %s", id)
	return api.KeyStatus{}
}

// usage sums keyd's usage rows of a project.
func (w *world) usage(t *testing.T, project string) api.UsageRow {
	t.Helper()
	u, err := w.kc.Usage(context.Background(), time.Time{}, "")
	if err != nil {
		t.Fatal(err)
	}
	var sum api.UsageRow
	for _, r := range u.Rows {
		if r.Project != project {
			continue
		}
		sum.Requests += r.Requests
		sum.PromptTokens += r.PromptTokens
		sum.OutputTokens += r.OutputTokens
		sum.RateMinute += r.RateMinute
		sum.RateDay += r.RateDay
		sum.Other429 += r.Other429
		sum.Errors += r.Errors
		sum.Unused += r.Unused
	}
	return sum
}

var (
	grantRe  = regexp.MustCompile(`msg="lease granted" .*key=(\S+) .*tokens=(\d+)`)
	reportRe = regexp.MustCompile(`msg="lease reported" .*key=(\S+) class=(\S+)`)
)

// grants lists keyd's grants as "key:tokens", from its debug log.
func (w *world) grants() []string {
	var out []string
	for _, m := range grantRe.FindAllStringSubmatch(w.log.String(), -1) {
		out = append(out, m[1]+":"+m[2])
	}
	return out
}

// reports lists keyd's classifications of reports as "key:class".
func (w *world) reports() []string {
	var out []string
	for _, m := range reportRe.FindAllStringSubmatch(w.log.String(), -1) {
		out = append(out, m[1]+":"+m[2])
	}
	return out
}

// calls lists the fake's generation requests as "key:status", with the
// key id rather than the secret.
func (w *world) calls() []string {
	var out []string
	for _, r := range w.fake.Requests() {
		if r.Method != fakegemini.MethodGenerate && r.Method != fakegemini.MethodStream {
			continue
		}
		out = append(out, keyID(r.Key)+":"+strconv.Itoa(r.Status))
	}
	return out
}

func keyID(secret string) string {
	if s, ok := strings.CutPrefix(secret, "AIzaSyTEST-"); ok {
		id, _, _ := strings.Cut(s, "-")
		return id
	}
	return "?"
}

// generations returns the fake's records of answered generation requests.
func (w *world) generations() []fakegemini.Record {
	var out []fakegemini.Record
	for _, r := range w.fake.Requests() {
		if (r.Method == fakegemini.MethodGenerate || r.Method == fakegemini.MethodStream) && r.Status == 200 {
			out = append(out, r)
		}
	}
	return out
}

func same(t *testing.T, what string, got, want []string) {
	t.Helper()
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("%s = %q, want %q", what, got, want)
	}
}
