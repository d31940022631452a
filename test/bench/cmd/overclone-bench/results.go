package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Result is one measured quantity for one target: every sample is kept, the
// table shows the median and the 90th percentile, and the ratio is the
// median over the median of the baseline target measured in the same run,
// on the same filesystem, in the same workload.
type Result struct {
	FS       string    `json:"fs"`
	Workload string    `json:"workload"`
	Op       string    `json:"op"`
	Target   string    `json:"target"`
	Unit     string    `json:"unit"`
	Samples  []float64 `json:"samples,omitempty"`
	Median   float64   `json:"median"`
	P90      float64   `json:"p90"`
	Baseline string    `json:"baseline,omitempty"`
	Ratio    float64   `json:"ratio,omitempty"`
	Err      string    `json:"error,omitempty"`
}

// Report is everything one run produced.
type Report struct {
	Started  time.Time `json:"started"`
	Duration string    `json:"duration"`
	Host     HostInfo  `json:"host"`
	Flags    string    `json:"flags"`
	Results  []*Result `json:"results"`
	Checks   []Check   `json:"checks"`
	Notes    []string  `json:"notes"`
}

// HostInfo says what the numbers were measured on; the load average is
// there because the machine is shared.
type HostInfo struct {
	Kernel    string `json:"kernel"`
	CPUs      int    `json:"cpus"`
	LoadStart string `json:"load_start"`
	LoadEnd   string `json:"load_end"`
	GoVersion string `json:"go"`
}

// Check is one of issue 8's targets and whether this run met it.
type Check struct {
	Target string `json:"target"`
	Got    string `json:"got"`
	Met    bool   `json:"met"`
}

// add records samples (in unit) for one target.
func (r *Report) add(fs, workload, op, target, baseline, unit string, samples []float64) *Result {
	res := &Result{FS: fs, Workload: workload, Op: op, Target: target, Baseline: baseline, Unit: unit, Samples: samples}
	if len(samples) > 0 {
		res.Median = quantile(samples, 0.5)
		res.P90 = quantile(samples, 0.9)
	}
	r.Results = append(r.Results, res)
	return res
}

// fail records that target could not do op at all (the built-in past its
// depth limit, say): a result of its own, not a missing row.
func (r *Report) fail(fs, workload, op, target, baseline string, err error) {
	r.Results = append(r.Results, &Result{FS: fs, Workload: workload, Op: op, Target: target, Baseline: baseline, Err: err.Error()})
}

func (r *Report) note(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	fmt.Fprintln(os.Stderr, "note:", msg)
	r.Notes = append(r.Notes, msg)
}

// quantile is the nearest-rank quantile: a sample that was measured, not
// an interpolation between two.
func quantile(samples []float64, q float64) float64 {
	s := slices.Clone(samples)
	slices.Sort(s)
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

// find returns the result of target for the same measurement as r.
func (r *Report) find(of *Result, target string) *Result {
	for _, o := range r.Results {
		if o.FS == of.FS && o.Workload == of.Workload && o.Op == of.Op && o.Target == target {
			return o
		}
	}
	return nil
}

// ratios fills in every result's ratio to its baseline.
func (r *Report) ratios() {
	for _, res := range r.Results {
		if res.Baseline == "" || res.Err != "" {
			continue
		}
		if b := r.find(res, res.Baseline); b != nil && b.Err == "" && b.Median > 0 {
			res.Ratio = res.Median / b.Median
		}
	}
}

func fmtVal(v float64, unit string) string {
	switch {
	case unit == "ms" && v < 1:
		return fmt.Sprintf("%.0fµs", v*1000)
	case unit == "ms" && v >= 10000:
		return fmt.Sprintf("%.1fs", v/1000)
	case unit == "ms":
		return fmt.Sprintf("%.2fms", v)
	}
	return fmt.Sprintf("%.1f %s", v, unit)
}

func (res *Result) cells() []string {
	if res.Err != "" {
		return []string{res.FS, res.Workload, res.Op, res.Target, "-", "FAILED", "-", "-", shorten(res.Err, 70)}
	}
	ratio := "-"
	if res.Ratio > 0 {
		ratio = fmt.Sprintf("%.2fx %s", res.Ratio, res.Baseline)
	} else if res.Baseline == "" {
		ratio = "(baseline)"
	}
	return []string{res.FS, res.Workload, res.Op, res.Target, fmt.Sprint(len(res.Samples)),
		fmtVal(res.Median, res.Unit), fmtVal(res.P90, res.Unit), ratio, ""}
}

var header = []string{"fs", "workload", "op", "target", "n", "median", "p90", "ratio", "error"}

func shorten(s string, n int) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > n {
		return s[:n-3] + "..."
	}
	return s
}

// printTable writes the plain-text table to w (stdout).
func (r *Report) printTable(w io.Writer) {
	tw := tabwriter.NewWriter(w, 2, 0, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, res := range r.Results {
		fmt.Fprintln(tw, strings.Join(res.cells(), "\t"))
	}
	tw.Flush()
	fmt.Fprintln(w)
	for _, c := range r.Checks {
		mark := "MET   "
		if !c.Met {
			mark = "MISSED"
		}
		fmt.Fprintf(w, "%s %s: %s\n", mark, c.Target, c.Got)
	}
}

// markdown writes the report as a Markdown document.
func (r *Report) markdown(w io.Writer) {
	fmt.Fprintf(w, "# overclone benchmark results\n\n")
	fmt.Fprintf(w, "Run %s, took %s. Kernel %s, %d CPUs, load average %s at the start and %s at the end (a shared machine: read the ratios, not the absolute times). %s. Flags: `%s`.\n\n",
		r.Started.UTC().Format(time.RFC3339), r.Duration, r.Host.Kernel, r.Host.CPUs, r.Host.LoadStart, r.Host.LoadEnd, r.Host.GoVersion, r.Flags)
	fmt.Fprintf(w, "Every ratio is this target's median over its baseline's median, measured in the same run, on the same loop-mounted filesystem, interleaved. Each side runs as it ships. `overlay` (and `overlay-grpc`, `overlay-proc`, `overlay-again`) is containerd's built-in overlayfs with its plugin's defaults: `sync_remove = false`, so Remove drops only the metadata and Cleanup deletes the directories. `overclone` is in-process with the daemon's defaults (overlay mode on this kernel, `sync_on_commit` on); `overclone-nosync` is the same with `sync_on_commit` off, to show what the sync costs; `overclone-us` is userspace mode; `fileops` is overclone's copy-up engine called directly on the same layers; `*-grpc` are served by the same in-process gRPC server over a unix socket; `overclone-daemon` is the real daemon binary with no config file (its defaults) through containerd's proxy client, compared with `overlay-proc`, the built-in served by the same gRPC service from a process of its own; `overlay-again` is a second built-in measured against the first, the noise floor of the run. Because the built-in defers deletion to Cleanup and overclone to a background deleter, the calls table has a `Cleanup` row (one Cleanup after every 50 Removes) and a `%s` row (per snapshot: the Removes, the Cleanup and the wait until the directories are deleted). The targets below are checked on `overclone` and `overclone-daemon` as shipped.\n\n", opDisk)
	fmt.Fprintf(w, "## Targets\n\n")
	for _, c := range r.Checks {
		mark := "met"
		if !c.Met {
			mark = "**missed**"
		}
		fmt.Fprintf(w, "- %s — %s: %s\n", mark, c.Target, c.Got)
	}
	fmt.Fprintf(w, "\n## Results\n\n| %s |\n|%s\n", strings.Join(header, " | "), strings.Repeat("---|", len(header)))
	for _, res := range r.Results {
		fmt.Fprintf(w, "| %s |\n", strings.Join(res.cells(), " | "))
	}
	if len(r.Notes) > 0 {
		fmt.Fprintf(w, "\n## Notes\n\n")
		for _, n := range r.Notes {
			fmt.Fprintf(w, "- %s\n", n)
		}
	}
}

// write stores results.md, results.json and, with plot, results.svg in dir.
func (r *Report) write(dir string, plot bool) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	var md strings.Builder
	r.markdown(&md)
	if err := os.WriteFile(filepath.Join(dir, "results.md"), []byte(md.String()), 0o644); err != nil {
		return err
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), append(js, '\n'), 0o644); err != nil {
		return err
	}
	if plot {
		if err := os.WriteFile(filepath.Join(dir, "results.svg"), []byte(r.svg()), 0o644); err != nil {
			return err
		}
	}
	return nil
}
