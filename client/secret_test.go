package client

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"unsafe"
	"weak"

	"github.com/keyd/keyd/api"
)

// realLease is a lease answer as keyd writes it, with a lease ID of
// newLeaseID's form and a secret as long as a Gemini API key: at 16 bytes
// and more, the secret is not packed into a shared block by the runtime's
// tiny allocator, so whether it is collected is up to the client alone.
const (
	realSecret = "AIzaSyD-0123456789abcdefghijklmnopqrstu"
	realLease  = `{"lease_id":"l18828a6b1c2d3e4f0123456789abcdef","key_id":"key-primary-07","project":"proj-alpha",` +
		`"model":"gemini-2.5-flash","secret":"` + realSecret + `","tokens":1000,"expires_at":"2026-11-29T14:03:04.56789Z"}` + "\n"
)

// kept is what a caller keeps of a lease after the call it made with the
// secret: every string but the secret.
type kept struct{ leaseID, keyID, project, model string }

func keep(l *api.Lease) kept { return kept{l.LeaseID, l.KeyID, l.Project, l.Model} }

// assertSecretFreed checks that the memory of the secret get returns is
// collected while the caller keeps the other strings of the lease: no
// string but the secret may share memory with it.
func assertSecretFreed(t *testing.T, secret string, get func() *api.Lease) {
	t.Helper()
	// In a function of its own, so that no variable of this one holds
	// the lease or the secret.
	grab := func() (kept, weak.Pointer[byte]) {
		l := get()
		if l.Secret != secret || l.LeaseID == "" || l.Model == "" {
			t.Fatalf("lease = %+v", l)
		}
		return keep(l), weak.Make(unsafe.StringData(l.Secret))
	}
	k, w := grab()
	for i := 0; i < 3 && w.Value() != nil; i++ {
		runtime.GC()
	}
	if w.Value() != nil {
		t.Errorf("the secret's memory outlives the lease: it is shared with a string the caller kept")
	}
	for _, s := range []string{k.leaseID, k.keyID, k.project, k.model} {
		if strings.Contains(s, secret) {
			t.Errorf("%q holds the secret", s)
		}
	}
	runtime.KeepAlive(k)
}

func TestLeaseStringsDoNotHoldTheSecret(t *testing.T) {
	decline := func([]byte, *api.Lease) bool { return false }
	for _, tt := range []struct {
		name, answer, secret string
		parse                func([]byte, *api.Lease) bool
	}{
		{"parse", realLease, realSecret, parseLease},
		// A secret shorter than minOwn, and strings short enough for
		// the runtime to pack them all in one tiny block.
		{"parse short", leaseAnswers[0], "AIza-x_y", parseLease},
		{"json", realLease, realSecret, decline},
		{"json short", leaseAnswers[0], "AIza-x_y", decline},
		{"json escaped", strings.Replace(leaseAnswers[0], "AIza", `AI\u007aa`, 1), "AIza-x_y", decline},
	} {
		t.Run(tt.name, func(t *testing.T) {
			assertSecretFreed(t, tt.secret, func() *api.Lease {
				l, err := decodeAnswer([]byte(tt.answer), tt.parse)
				if err != nil {
					t.Fatal(err)
				}
				return l
			})
		})
	}
	t.Run("client", func(t *testing.T) {
		c := New(fakeKeyd(t, constAnswer(realLease)))
		defer c.CloseIdleConnections()
		assertSecretFreed(t, realSecret, func() *api.Lease {
			l, err := c.Lease(context.Background(), api.LeaseRequest{Model: "gemini-2.5-flash", Tokens: 1000})
			if err != nil {
				t.Fatal(err)
			}
			return l
		})
	})
}

// TestPooledAnswerBufferHoldsNoSecret checks that the answer buffers the
// client pools hold no copy of the secret once a lease is returned, also
// when the answer outgrows the buffer and readAll grows it.
func TestPooledAnswerBufferHoldsNoSecret(t *testing.T) {
	for _, pad := range []int{0, 3 * respBuf} {
		// Whitespace that makes the answer outgrow a pooled buffer
		// (it also sends the answer down encoding/json's path).
		answer := realLease[:len(realLease)-1] + strings.Repeat(" ", pad) + "\n"
		c := New(fakeKeyd(t, constAnswer(answer)))
		for range 4 {
			if _, err := c.Lease(context.Background(), api.LeaseRequest{Model: "m"}); err != nil {
				t.Fatal(err)
			}
		}
		c.CloseIdleConnections()
		// sync.Pool may hand back other buffers, or new ones; look at
		// whatever it holds.
		var held []*[]byte
		for range 8 {
			bp := respPool.Get().(*[]byte)
			if bytes.Contains((*bp)[:cap(*bp)], []byte(realSecret)) {
				t.Errorf("pad %d: a pooled buffer holds the secret", pad)
			}
			held = append(held, bp)
		}
		for _, bp := range held {
			respPool.Put(bp)
		}
	}
	// readAll clears the buffer it outgrows.
	b := make([]byte, 0, 8)
	old := b[:cap(b)]
	got, err := readAll(iotestOneByte(realLease), b)
	if err != nil || string(got) != realLease {
		t.Fatalf("readAll = %q, %v", got, err)
	}
	if !bytes.Equal(old, make([]byte, len(old))) {
		t.Errorf("readAll left %q in the buffer it outgrew", old)
	}
}

// iotestOneByte reads s a byte at a time.
func iotestOneByte(s string) io.Reader { return &oneByte{s} }

type oneByte struct{ s string }

func (r *oneByte) Read(p []byte) (int, error) {
	if r.s == "" {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	p[0], r.s = r.s[0], r.s[1:]
	return 1, nil
}

// constAnswer answers every request with body, doing as little as it can.
type constAnswer string

func (a constAnswer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	io.Copy(io.Discard, r.Body)
	w.Header()["Content-Type"] = jsonType
	io.WriteString(w, string(a))
}

// BenchmarkDecodeLease measures decoding keyd's answer to a lease, as
// Lease does.
func BenchmarkDecodeLease(b *testing.B) {
	data := []byte(realLease)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := decodeAnswer(data, parseLease); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLease measures Lease against an in-process fake keyd, whose
// own allocations are counted too.
func BenchmarkLease(b *testing.B) {
	sock := fakeKeyd(b, constAnswer(realLease))
	c := New(sock)
	defer c.CloseIdleConnections()
	ctx := context.Background()
	req := api.LeaseRequest{Model: "gemini-2.5-flash", Tokens: 1000, Client: "bench"}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.Lease(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
}
