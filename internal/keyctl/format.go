package keyctl

import (
	"bytes"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/keyd/keyd/api"
)

func newTable(w io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
}

// row writes cells as one tab-separated table row, each cleaned.
func row(w io.Writer, cells ...string) {
	for i, c := range cells {
		cells[i] = clean(c)
	}
	fmt.Fprintln(w, strings.Join(cells, "\t"))
}

// lineWidth is the width tables fit in.
const lineWidth = 100

// fitTable writes header and rows as a table, one line per row, whose
// last column is cut so that each line fits in lineWidth columns (keeping
// at least 20 for it). Each cut cell is then written in full below the
// table, after the row's label: nothing is lost, and the table stays
// readable at a glance.
func fitTable(w io.Writer, header []string, rows [][]string, labels []string) {
	fitTableWidth(w, lineWidth, true, header, rows, labels)
}

// fitTableWidth is fitTable for width columns. Narrower than lineWidth,
// the last column keeps at least 8 columns (and its header) rather than
// 20. Without notes, cut cells are not written in full below the table.
func fitTableWidth(w io.Writer, width int, notes bool, header []string, rows [][]string, labels []string) {
	all := append([][]string{header}, rows...)
	n := len(header)
	widths := make([]int, n)
	for _, r := range all {
		for i := range n - 1 {
			r[i] = clean(r[i])
			widths[i] = max(widths[i], len([]rune(r[i])))
		}
	}
	used := 0
	for _, wd := range widths[:n-1] {
		used += wd + 2
	}
	minLast := 20
	if width < lineWidth {
		minLast = max(8, len([]rune(header[n-1])))
	}
	last := max(width-used, minLast)
	var buf bytes.Buffer
	tw := newTable(&buf)
	var cut []string
	for i, r := range all {
		full := clean(r[n-1])
		r[n-1] = truncate(full, last)
		if r[n-1] != full && i > 0 {
			cut = append(cut, labels[i-1]+": "+full)
		}
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	tw.Flush()
	for _, l := range strings.SplitAfter(buf.String(), "\n") {
		io.WriteString(w, strings.TrimRight(l, " \n"))
		if strings.HasSuffix(l, "\n") {
			io.WriteString(w, "\n")
		}
	}
	if !notes {
		cut = nil
	}
	for _, note := range cut {
		for i, l := range wrap(note, width-4, 10) {
			if i > 0 {
				l = "    " + l
			}
			fmt.Fprintf(w, "  %s\n", l)
		}
	}
}

// wrap breaks s into lines of at most width runes at spaces, at most
// maxLines of them, the last cut with "…" if need be.
func wrap(s string, width, maxLines int) []string {
	var lines []string
	words := strings.Fields(s)
	cur := ""
	for i, word := range words {
		switch {
		case cur == "":
			cur = word
		case len([]rune(cur))+1+len([]rune(word)) <= width:
			cur += " " + word
		default:
			if len(lines) == maxLines-1 {
				return append(lines, truncate(strings.Join(append([]string{cur}, words[i:]...), " "), width))
			}
			lines = append(lines, truncate(cur, width))
			cur = word
		}
	}
	return append(lines, truncate(cur, width))
}

// clean makes s safe for one table cell: no control characters (terminal
// escapes, tabs, newlines) pass through.
func clean(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r == '\t' || r == '\n' || r == '\r':
			return ' '
		case unicode.IsControl(r):
			return '?'
		}
		return r
	}, s)
}

// truncate shortens s to at most n runes, marking the cut with "…".
func truncate(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n-1]) + "…"
}

// fmtDuration writes d compactly for humans, rounded up to the second:
// "42s", "4m05s", "7h03m", "2d07h".
func fmtDuration(d time.Duration) string {
	if d <= 0 {
		return "0s"
	}
	s := int64((d + time.Second - 1) / time.Second)
	switch {
	case s < 60:
		return fmt.Sprintf("%ds", s)
	case s < 3600:
		return fmt.Sprintf("%dm%02ds", s/60, s%60)
	case s < 86400:
		return fmt.Sprintf("%dh%02dm", s/3600, s%3600/60)
	}
	return fmt.Sprintf("%dd%02dh", s/86400, s%86400/3600)
}

// human writes n shortly: 1234, 12.3k, 250k, 1M, 4.5M.
func human(n int64) string {
	abs := n
	if abs < 0 {
		abs = -abs
	}
	if abs < 10000 {
		return strconv.FormatInt(n, 10)
	}
	for _, u := range []struct {
		div  float64
		unit string
	}{{1e9, "G"}, {1e6, "M"}, {1e3, "k"}} {
		if float64(abs) >= u.div {
			v := float64(n) / u.div
			s := strconv.FormatFloat(v, 'f', 1, 64)
			if abs >= int64(100*u.div) || strings.HasSuffix(s, ".0") {
				s = strconv.FormatFloat(v, 'f', 0, 64)
			}
			return s + u.unit
		}
	}
	return strconv.FormatInt(n, 10)
}

// counter writes used/limit, with "-" for no limit.
func counter(c api.Counter) string {
	limit := "-"
	if c.Limit > 0 {
		limit = human(c.Limit)
	}
	return human(c.Used) + "/" + limit
}

// hint shows at most the last 4 characters of a secret hint, whatever keyd
// sent, so that no secret can reach the terminal through status.
func hint(h string) string {
	r := []rune(strings.TrimPrefix(h, "…"))
	if len(r) == 0 {
		return "-"
	}
	if len(r) > 4 {
		r = r[len(r)-4:]
	}
	return "…" + string(r)
}

// until says when a state ends: "cooling 42s", or "until 15:04 (7h03m)".
func (e *env) until(state string, t *time.Time) string {
	if t == nil {
		return ""
	}
	d := t.Sub(e.now())
	if state == api.StateCooling {
		return "cooling " + fmtDuration(d)
	}
	lt := t.In(e.loc)
	layout := "15:04"
	if d > 20*time.Hour {
		layout = "Jan 2 15:04"
	}
	return fmt.Sprintf("until %s (%s)", lt.Format(layout), fmtDuration(d))
}

// reasonUntil is the REASON/UNTIL cell: when the state ends, then why.
func (e *env) reasonUntil(state, reason string, t *time.Time) string {
	parts := []string{}
	if u := e.until(state, t); u != "" {
		parts = append(parts, u)
	}
	if reason != "" {
		parts = append(parts, reason)
	}
	return strings.Join(parts, ": ")
}

// ago says how long ago t was: "5m00s ago".
func (e *env) ago(t time.Time) string {
	d := e.now().Sub(t)
	if d < 0 {
		return "in " + fmtDuration(-d)
	}
	return fmtDuration(d) + " ago"
}

// shellQuote quotes s for a POSIX shell.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// plural writes "1 key" or "2 keys".
func plural(n int, word string) string {
	if n == 1 {
		return "1 " + word
	}
	return fmt.Sprintf("%d %ss", n, word)
}
