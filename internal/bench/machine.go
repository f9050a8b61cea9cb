// Package bench measures keyd from the outside: lease+report throughput and
// latency against a Redis-backed limiter doing the same bookkeeping
// (docs/bench/redis.md), and keyd's lease latency, startup time and memory
// with 10 to 10,000 keys (docs/bench/scale.md). cmd/keyd-loadtest runs it;
// `make bench-redis` and `make bench-scale` write the two documents.
//
// Every server it measures is a real process it starts and stops itself:
// the keyd binary on a real Unix socket and bbolt file, and Debian's
// redis-server on a random loopback port. Children die with the benchmark
// (PR_SET_PDEATHSIG), so none is ever left running.
package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Machine describes where a run happened.
type Machine struct {
	NProc      int
	GOMAXPROCS int
	CPU        string
	MemGiB     float64
	Kernel     string
	GoVersion  string
}

// ThisMachine reads the machine's description.
func ThisMachine() Machine {
	m := Machine{NProc: runtime.NumCPU(), GOMAXPROCS: runtime.GOMAXPROCS(0), GoVersion: runtime.Version()}
	if out, err := exec.Command("nproc").Output(); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(out))); err == nil {
			m.NProc = n
		}
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "MemTotal:"); ok {
				kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
				m.MemGiB = kb / (1 << 20)
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if out, err := exec.Command("go", "version").Output(); err == nil {
		m.GoVersion = strings.TrimSpace(strings.TrimPrefix(string(out), "go version "))
	}
	return m
}

// Markdown is the machine as a bullet list.
func (m Machine) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "- `nproc` = %d (GOMAXPROCS %d), %s, %.0f GiB RAM, Linux %s\n", m.NProc, m.GOMAXPROCS, m.CPU, m.MemGiB, m.Kernel)
	fmt.Fprintf(&b, "- `go version`: %s\n", m.GoVersion)
	return b.String()
}

// FSOf names the file system holding path, e.g. "ext4 (/dev/vda)", from
// /proc/mounts (the longest mount point that is a prefix of path).
func FSOf(path string) string {
	abs, err := filepath.Abs(path)
	if err != nil {
		return "?"
	}
	if r, err := filepath.EvalSymlinks(abs); err == nil {
		abs = r
	}
	b, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return "?"
	}
	best, fs := "", "?"
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			continue
		}
		mp := f[1]
		if (abs == mp || strings.HasPrefix(abs, strings.TrimSuffix(mp, "/")+"/")) && len(mp) >= len(best) {
			best, fs = mp, f[2]+" ("+f[0]+")"
		}
	}
	return fs
}

// LoadAvg returns the 1-minute load average.
func LoadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return -1
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

// LoadSampler samples the 1-minute load average every interval while it
// runs.
type LoadSampler struct {
	mu      sync.Mutex
	samples []float64
	stop    chan struct{}
	done    chan struct{}
}

// StartLoadSampler starts sampling now and every interval.
func StartLoadSampler(interval time.Duration) *LoadSampler {
	s := &LoadSampler{stop: make(chan struct{}), done: make(chan struct{})}
	s.samples = append(s.samples, LoadAvg())
	go func() {
		defer close(s.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-t.C:
				s.mu.Lock()
				s.samples = append(s.samples, LoadAvg())
				s.mu.Unlock()
			}
		}
	}()
	return s
}

// Stop stops sampling, takes a last sample and returns them all.
func (s *LoadSampler) Stop() []float64 {
	close(s.stop)
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	s.samples = append(s.samples, LoadAvg())
	return slices.Clone(s.samples)
}

// LoadSummary is "min–max (start a, end b)" of load samples.
func LoadSummary(samples []float64) string {
	if len(samples) == 0 {
		return "?"
	}
	return fmt.Sprintf("%.2f–%.2f (%.2f at the start, %.2f at the end, %d samples)",
		slices.Min(samples), slices.Max(samples), samples[0], samples[len(samples)-1], len(samples))
}

// procCPU returns the user+system CPU time process pid has used, from
// /proc/PID/stat (clock ticks of 10 ms).
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name, which is in parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * (time.Second / 100) // USER_HZ is 100 on Linux
}

// selfCPU returns the user+system CPU time of this process.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// Memory is a process's resident memory.
type Memory struct {
	RSS, HWM int64 // bytes: VmRSS and VmHWM (peak)
}

// procMemory reads VmRSS and VmHWM from /proc/PID/status.
func procMemory(pid int) (Memory, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return Memory{}, err
	}
	defer f.Close()
	var m Memory
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "VmRSS":
			m.RSS = kb << 10
		case "VmHWM":
			m.HWM = kb << 10
		}
	}
	return m, sc.Err()
}

// childAttr makes a child process die with this one and live in its own
// process group.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
}
