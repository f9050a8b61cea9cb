package bench

import (
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
)

// GoBench is one parsed line of `go test -bench` output: the
// sub-benchmark's name (without "Benchmark" and the -GOMAXPROCS suffix)
// and its metrics by unit.
type GoBench struct {
	Name    string
	Metrics map[string]float64
}

// RunGoBench runs `go test -run=^$ -bench=pattern -benchtime=benchtime pkg`
// in the current directory (the module) and parses its results.
func RunGoBench(ctx context.Context, pkg, pattern, benchtime string) ([]GoBench, string, error) {
	args := []string{"test", "-run=^$", "-bench=" + pattern, "-benchtime=" + benchtime, "-count=1", pkg}
	cmd := exec.CommandContext(ctx, "go", args...)
	out, err := cmd.CombinedOutput()
	line := "go " + strings.Join(args, " ")
	if err != nil {
		return nil, line, fmt.Errorf("%s: %v\n%s", line, err, out)
	}
	return ParseGoBench(string(out)), line, nil
}

// ParseGoBench parses the result lines of `go test -bench` output.
func ParseGoBench(out string) []GoBench {
	var res []GoBench
	for line := range strings.SplitSeq(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") {
			continue
		}
		if _, err := strconv.Atoi(f[1]); err != nil {
			continue
		}
		name := strings.TrimPrefix(f[0], "Benchmark")
		if i := strings.LastIndexByte(name, '-'); i > 0 {
			if _, err := strconv.Atoi(name[i+1:]); err == nil {
				name = name[:i]
			}
		}
		b := GoBench{Name: name, Metrics: map[string]float64{}}
		for i := 2; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				continue
			}
			b.Metrics[f[i+1]] = v
		}
		res = append(res, b)
	}
	return res
}

// find returns the metrics of the benchmark named name, or nil.
func find(bs []GoBench, name string) map[string]float64 {
	for _, b := range bs {
		if b.Name == name {
			return b.Metrics
		}
	}
	return nil
}
