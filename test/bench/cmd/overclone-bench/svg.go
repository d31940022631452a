package main

import (
	"fmt"
	"html"
	"math"
	"strings"
)

// svg draws every ratio as a horizontal bar on a log scale from 1/16x to
// 16x, with 1x (the baseline) as the axis: bars to the left are faster
// than the baseline, to the right slower. Failures are drawn as a red
// mark at the right edge.
func (r *Report) svg() string {
	const (
		rowH   = 16
		labelW = 520
		plotW  = 420
		top    = 40
		maxLog = 4.0 // log2(16)
	)
	var rows []*Result
	for _, res := range r.Results {
		if res.Ratio > 0 || res.Err != "" {
			rows = append(rows, res)
		}
	}
	height := top + rowH*len(rows) + 30
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">`+"\n", labelW+plotW+80, height)
	fmt.Fprintf(&b, `<text x="8" y="16" font-size="14">overclone benchmark: median ratio to baseline (log scale; left of 1x is faster), %s</text>`+"\n", r.Started.UTC().Format("2006-01-02 15:04Z"))
	x := func(ratio float64) float64 {
		l := math.Max(-maxLog, math.Min(maxLog, math.Log2(ratio)))
		return labelW + plotW/2 + l/maxLog*plotW/2
	}
	for _, tick := range []float64{1.0 / 16, 0.25, 1, 4, 16} {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ccc"/>`+"\n", x(tick), top-6, x(tick), top+rowH*len(rows))
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle">%gx</text>`+"\n", x(tick), top+rowH*len(rows)+14, tick)
	}
	for i, res := range rows {
		y := top + i*rowH
		label := fmt.Sprintf("%s %s %s: %s vs %s", res.FS, res.Workload, res.Op, res.Target, res.Baseline)
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end">%s</text>`+"\n", labelW-6, y+11, html.EscapeString(label))
		if res.Err != "" {
			fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#c00">failed</text>`+"\n", labelW+plotW+4, y+11)
			continue
		}
		x0, x1 := x(1), x(res.Ratio)
		color := "#2a7"
		if res.Ratio > 1 {
			color = "#d73"
		}
		fmt.Fprintf(&b, `<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s"/>`+"\n", math.Min(x0, x1), y+2, math.Abs(x1-x0)+0.5, rowH-4, color)
		fmt.Fprintf(&b, `<text x="%d" y="%d">%.2fx</text>`+"\n", labelW+plotW+4, y+11, res.Ratio)
	}
	b.WriteString("</svg>\n")
	return b.String()
}
