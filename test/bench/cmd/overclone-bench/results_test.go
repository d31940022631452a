package main

import (
	"strings"
	"testing"
)

func TestQuantile(t *testing.T) {
	s := []float64{5, 1, 4, 2, 3, 10, 9, 8, 7, 6}
	if got := quantile(s, 0.5); got != 5 {
		t.Errorf("median %v, want 5", got)
	}
	if got := quantile(s, 0.9); got != 9 {
		t.Errorf("p90 %v, want 9", got)
	}
	if got := quantile([]float64{3}, 0.9); got != 3 {
		t.Errorf("p90 of one sample %v, want 3", got)
	}
}

// TestReport: ratios are taken against the baseline of the same
// measurement, checks read them, and every output renders.
func TestReport(t *testing.T) {
	r := &Report{}
	r.add("xfs", "unpack", "3 layers", tOverlay, "", "ms", []float64{100, 110, 90})
	r.add("xfs", "unpack", "3 layers", tOverclone, tOverlay, "ms", []float64{104, 99, 103})
	r.add("xfs", "calls", "Stat", tOverclone, tOverlay, "ms", []float64{1})
	r.add("xfs", "calls", "Stat", tOverlay, "", "ms", []float64{2})
	r.fail("xfs", "deep-1000", "first View+mount", tOverlay, "", errString("mount options is too long"))
	r.add("xfs", "deep-1000", "first View+mount", tOverclone, tOverlay, "ms", []float64{700})
	r.ratios()
	if got := r.Results[1].Ratio; got < 1.029 || got > 1.031 {
		t.Errorf("unpack ratio %v, want 1.03", got)
	}
	r.check()
	var met, missed int
	for _, c := range r.Checks {
		if c.Met {
			met++
		} else {
			missed++
			t.Logf("missed: %s: %s", c.Target, c.Got)
		}
	}
	if met != 3 || missed != 0 {
		t.Errorf("%d met, %d missed; want 3 met (unpack 1.03x, Stat 0.5x, deep)", met, missed)
	}
	var md strings.Builder
	r.markdown(&md)
	if !strings.Contains(md.String(), "| xfs | unpack | 3 layers | overclone | 3 | 103.00ms |") {
		t.Errorf("markdown lacks the unpack row:\n%s", md.String())
	}
	if svg := r.svg(); !strings.HasPrefix(svg, "<svg") || !strings.Contains(svg, "failed") {
		t.Errorf("svg does not draw the failure:\n%s", svg)
	}
}

type errString string

func (e errString) Error() string { return string(e) }
