package gemini

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyd/keyd/api"
	"github.com/keyd/keyd/client"
	"github.com/keyd/keyd/internal/testutil"
)

// fakeReports serves keyd's report route on a Unix socket, answering with
// status (200: a ReportResponse) and recording each report's body.
type fakeReports struct {
	mu     sync.Mutex
	bodies []string
}

func (f *fakeReports) serve(t *testing.T, sock string, status int) {
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Error(err)
		return
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		f.mu.Lock()
		f.bodies = append(f.bodies, r.Method+" "+r.URL.Path+" "+strings.TrimSpace(string(b)))
		dup := len(f.bodies) > 1
		f.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		if status != http.StatusOK {
			json.NewEncoder(w).Encode(api.ErrorBody{Error: &api.Error{Code: "bad_request", Message: "no"}})
			return
		}
		json.NewEncoder(w).Encode(api.ReportResponse{LeaseID: "L1", KeyID: "k1", Classification: "success", Duplicate: dup})
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

func (f *fakeReports) got() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.bodies...)
}

func shortSocket(t *testing.T) string {
	dir, err := os.MkdirTemp("", "kdr")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "s")
}

func TestReportRetriedWhileKeydRestarts(t *testing.T) {
	sock := shortSocket(t)
	var f fakeReports
	time.AfterFunc(300*time.Millisecond, func() { f.serve(t, sock, http.StatusOK) })
	var logs testutil.SyncBuffer
	g := New(client.New(sock), Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // reports run detached from the caller's ctx
	start := time.Now()
	g.report(ctx, &api.Lease{LeaseID: "L1", KeyID: "k1"}, api.ReportRequest{Status: 429})
	got := f.got()
	if len(got) != 1 || got[0] != `POST /v1/leases/L1/report {"status":429}` {
		t.Fatalf("reports = %q", got)
	}
	if d := time.Since(start); d < 300*time.Millisecond || d > 5*time.Second {
		t.Errorf("report took %v", d)
	}
	if logs.String() != "" {
		t.Errorf("logged: %s", logs.String())
	}
}

func TestReportRetryGivesUp(t *testing.T) {
	sock := shortSocket(t)
	var logs testutil.SyncBuffer
	g := New(client.New(sock), Options{ReportRetry: 250 * time.Millisecond, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	start := time.Now()
	g.report(context.Background(), &api.Lease{LeaseID: "L1", KeyID: "k1"}, api.ReportRequest{Status: 200})
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("report took %v, want about 250ms", d)
	}
	if s := logs.String(); !strings.Contains(s, "reporting a lease failed") || !strings.Contains(s, "tries=") || strings.Contains(s, "tries=1 ") {
		t.Errorf("log = %s", s)
	}
}

func TestReportNotRetriedOnKeydAnswer(t *testing.T) {
	sock := shortSocket(t)
	var f fakeReports
	f.serve(t, sock, http.StatusBadRequest)
	var logs testutil.SyncBuffer
	g := New(client.New(sock), Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	g.report(context.Background(), &api.Lease{LeaseID: "L1", KeyID: "k1"}, api.ReportRequest{Status: 200})
	if got := f.got(); len(got) != 1 {
		t.Errorf("reports = %q, want one", got)
	}
	if !strings.Contains(logs.String(), "tries=1 ") {
		t.Errorf("log = %s", logs.String())
	}
}

func TestReportRetryDisabled(t *testing.T) {
	sock := shortSocket(t)
	var logs testutil.SyncBuffer
	g := New(client.New(sock), Options{ReportRetry: -1, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	g.report(context.Background(), &api.Lease{LeaseID: "L1", KeyID: "k1"}, api.ReportRequest{Status: 200})
	if !strings.Contains(logs.String(), "tries=1 ") {
		t.Errorf("log = %s", logs.String())
	}
}
