package daemon

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/keyd/keyd/internal/gctune"
)

// BenchmarkLeaseReportMinimalClient is BenchmarkLeaseReport with clients
// that cost next to nothing: each pair goes over a connection of its own
// (one per client, kept alive), written and read in the calling goroutine
// with a few lines of HTTP/1.1 instead of net/http's Transport and its
// two goroutines per connection. It is not a client to use (no contexts,
// no errors beyond failing the benchmark, answers keyd's server framing
// alone); it tells how much of BenchmarkLeaseReport's latency and CPU is
// keyd's side of the socket. Metrics as in BenchmarkLeaseReport.
func BenchmarkLeaseReportMinimalClient(b *testing.B) {
	if stop, err := gctune.Start(gctune.DefaultHeadroom); err == nil {
		defer stop()
	}
	for _, n := range benchClients {
		b.Run(fmt.Sprintf("clients=%d", n), func(b *testing.B) {
			d := startDaemonLevel(b, benchKeys, slog.LevelInfo)
			conns := make(chan *minimalConn, n)
			for range n {
				c, err := net.Dial("unix", d.socket)
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				conns <- &minimalConn{br: bufio.NewReader(c), bw: bufio.NewWriter(c)}
			}
			lease := []byte(`{"model":"m","tokens":1000,"client":"bench"}`)
			report := []byte(`{"status":200,"usage":{"prompt_tokens":900,"output_tokens":100}}`)
			pair := func() (time.Duration, time.Duration, error) {
				c := <-conns // as many as clients: never waits
				defer func() { conns <- c }()
				t0 := time.Now()
				answer, err := c.post("/v1/leases", lease)
				if err != nil {
					return 0, 0, err
				}
				i := bytes.Index(answer, []byte(`"lease_id":"`))
				if i < 0 {
					return 0, 0, fmt.Errorf("lease answer %q", answer)
				}
				id := answer[i+len(`"lease_id":"`):]
				id = id[:bytes.IndexByte(id, '"')]
				c.path = append(append(append(c.path[:0], "/v1/leases/"...), id...), "/report"...)
				t1 := time.Now()
				if _, err := c.post(string(c.path), report); err != nil {
					return 0, 0, err
				}
				return t1.Sub(t0), time.Since(t1), nil
			}
			runClients(b, n, pair).report(b)
		})
	}
}

// minimalConn is one kept-alive connection of
// BenchmarkLeaseReportMinimalClient; one goroutine uses it at a time.
type minimalConn struct {
	br     *bufio.Reader
	bw     *bufio.Writer
	answer []byte // the last answer's body, reused
	path   []byte
}

// post sends body to path and returns the 200 answer's body, valid until
// the next call. keyd's answers to these two routes carry Content-Length.
func (c *minimalConn) post(path string, body []byte) ([]byte, error) {
	c.bw.WriteString("POST ")
	c.bw.WriteString(path)
	c.bw.WriteString(" HTTP/1.1\r\nHost: keyd\r\nContent-Type: application/json\r\nContent-Length: ")
	c.bw.WriteString(strconv.Itoa(len(body)))
	c.bw.WriteString("\r\n\r\n")
	c.bw.Write(body)
	if err := c.bw.Flush(); err != nil {
		return nil, err
	}
	status, err := c.br.ReadSlice('\n')
	if err != nil {
		return nil, err
	}
	ok := bytes.HasPrefix(status, []byte("HTTP/1.1 200 "))
	size := -1
	for {
		line, err := c.br.ReadSlice('\n')
		if err != nil {
			return nil, err
		}
		if len(line) <= 2 {
			break
		}
		if v, found := bytes.CutPrefix(line, []byte("Content-Length: ")); found {
			size, _ = strconv.Atoi(string(bytes.TrimSpace(v)))
		}
	}
	if size < 0 {
		return nil, fmt.Errorf("POST %s: answer without Content-Length", path)
	}
	c.answer = append(c.answer[:0], make([]byte, size)...)
	if _, err := io.ReadFull(c.br, c.answer); err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("POST %s: %s %s", path, bytes.TrimSpace(status), c.answer)
	}
	return c.answer, nil
}
