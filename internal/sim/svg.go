package sim

import (
	"bytes"
	"fmt"
	"html"
	"math"
	"strings"
)

// policyColors are the plot colors of the policies, in Policies order
// (ColorBrewer Dark2, readable by most color-blind readers).
var policyColors = []string{"#1b9e77", "#d95f02", "#7570b3", "#e7298a"}

// SVG plots one scenario's results over time: the quota used per bin (top
// panel, linear) and the provider's 429s per bin (bottom panel, log
// scale), one line per policy. It needs no plotting library.
func (o *Outcome) SVG(scenario string) []byte {
	i := o.index(scenario)
	if i < 0 {
		return nil
	}
	s, results := o.Scenarios[i], o.Results[i]
	const (
		width, height = 960, 660
		left, right   = 80, 30
		top1, h1      = 115, 210 // quota panel
		top2, h2      = 395, 200
		plotW         = width - left - right
	)
	var b bytes.Buffer
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	p(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="Helvetica, Arial, sans-serif" font-size="13">`+"\n", width, height, width, height)
	p(`<rect width="100%%" height="100%%" fill="white"/>` + "\n")
	p(`<text x="%d" y="28" font-size="17" font-weight="bold">%s</text>`+"\n", left, esc(s.Title))
	p(`<text x="%d" y="50" fill="#444">%s</text>`+"\n", left,
		esc(fmt.Sprintf("%d keys in %d projects, demand %gx the per-minute capacity, %g h from %s; per %g-minute bin",
			len(s.Keys), len(s.Projects), s.Load, s.Duration.Hours(), s.Start.Format("2006-01-02 15:04 MST"), BinWidth.Minutes())))
	// Legend.
	for j, r := range results {
		x := left + j*200
		p(`<line x1="%d" y1="76" x2="%d" y2="76" stroke="%s" stroke-width="3"/>`, x, x+28, policyColors[j%len(policyColors)])
		p(`<text x="%d" y="80">%s</text>`+"\n", x+34, esc(r.Policy))
	}
	n := len(results[0].Bins)
	xOf := func(bin int) float64 { return left + (float64(bin)+0.5)*plotW/float64(n) }
	hours := s.Duration.Hours()
	// Pacific midnights: the RPD resets.
	var midnights []float64
	for _, d := range (&runner{s: s}).days(0, s.Duration)[1:] {
		midnights = append(midnights, left+d.from.Hours()/hours*plotW)
	}
	resets := func(y0, h int) {
		for _, x := range midnights {
			p(`<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#888" stroke-dasharray="4 4"/>`, x, y0-h, x, y0)
			p(`<text x="%.1f" y="%d" fill="#666" font-size="11">RPD reset (00:00 PT)</text>`+"\n", x+4, y0-h-4)
		}
	}
	xAxis := func(y0 int) {
		p(`<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#333"/>`+"\n", left, y0, left+plotW, y0)
		step := 0.5
		if hours > 2 {
			step = 1
		}
		if hours <= 1 {
			step = 0.25
		}
		for t := 0.0; t <= hours+1e-9; t += step {
			x := left + t/hours*plotW
			p(`<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#333"/>`, x, y0, x, y0+5)
			p(`<text x="%.1f" y="%d" text-anchor="middle">%s</text>`+"\n", x, y0+20, hourLabel(t))
		}
	}
	// Quota panel.
	p(`<text x="%d" y="%d" font-weight="bold">Quota used (RPM/TPM, per bucket's binding limit)</text>`+"\n", left, top1-8)
	for _, v := range []float64{0, 0.25, 0.5, 0.75, 1} {
		y := float64(top1+h1) - v*h1
		p(`<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#ddd"/>`, left, y, left+plotW, y)
		p(`<text x="%d" y="%.1f" text-anchor="end">%.0f%%</text>`+"\n", left-8, y+4, 100*v)
	}
	xAxis(top1 + h1)
	resets(top1+h1, h1)
	for j := len(results) - 1; j >= 0; j-- { // keyd last, on top
		r := results[j]
		pts := make([]string, n)
		for k, bin := range r.Bins {
			pts[k] = fmt.Sprintf("%.1f,%.1f", xOf(k), float64(top1+h1)-min(bin.QuotaUsed, 1.05)*h1)
		}
		p(`<polyline fill="none" stroke="%s" stroke-width="%s" points="%s"/>`+"\n", policyColors[j%len(policyColors)], strokeWidth(j), strings.Join(pts, " "))
	}
	// 429 panel, log scale.
	maxErr := 1
	for _, r := range results {
		for _, bin := range r.Bins {
			maxErr = max(maxErr, bin.Errors429)
		}
	}
	decades := math.Ceil(math.Log10(float64(maxErr + 1)))
	yOf := func(v int) float64 { return float64(top2+h2) - math.Log10(float64(v)+1)/decades*h2 }
	p(`<text x="%d" y="%d" font-weight="bold">429s from the provider (log scale)</text>`+"\n", left, top2-8)
	for v := 0; float64(v) <= math.Pow(10, decades); {
		y := yOf(v)
		p(`<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#ddd"/>`, left, y, left+plotW, y)
		p(`<text x="%d" y="%.1f" text-anchor="end">%d</text>`+"\n", left-8, y+4, v)
		if v == 0 {
			v = 1
		} else {
			v *= 10
		}
	}
	xAxis(top2 + h2)
	resets(top2+h2, h2)
	p(`<text x="%d" y="%d" text-anchor="middle">hours since start</text>`+"\n", left+plotW/2, top2+h2+42)
	for j := len(results) - 1; j >= 0; j-- {
		r := results[j]
		pts := make([]string, n)
		for k, bin := range r.Bins {
			pts[k] = fmt.Sprintf("%.1f,%.1f", xOf(k), yOf(bin.Errors429))
		}
		p(`<polyline fill="none" stroke="%s" stroke-width="%s" points="%s"/>`+"\n", policyColors[j%len(policyColors)], strokeWidth(j), strings.Join(pts, " "))
	}
	p("</svg>\n")
	return b.Bytes()
}

func strokeWidth(j int) string {
	if j == 0 {
		return "3"
	}
	return "2"
}

func hourLabel(t float64) string {
	if t == math.Trunc(t) {
		return fmt.Sprintf("%.0f h", t)
	}
	return fmt.Sprintf("%g h", t)
}

func esc(s string) string { return html.EscapeString(s) }
