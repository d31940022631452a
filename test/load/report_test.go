package load

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// writeMethods are the calls that change the metadata, each one bolt
// write transaction and one fdatasync in containerd's MetaStore: the
// calls group commit is about (issue 12, goal 3).
var writeMethods = []string{"Prepare", "Commit", "Remove", "View"}

// comparison is one phase run against both targets.
type comparison struct {
	label  string
	ours   *stats // overclone
	theirs *stats // the built-in
}

// row is one line of a comparison: a set of methods on both sides.
type row struct {
	name             string
	ours, theirs     []time.Duration
	oursRate, thRate float64
}

func (c comparison) row(name string, methods ...string) row {
	r := row{name: name, ours: c.ours.sorted(methods...), theirs: c.theirs.sorted(methods...)}
	r.oursRate, r.thRate = c.ours.rate(len(r.ours)), c.theirs.rate(len(r.theirs))
	return r
}

// throughput is overclone's calls per second over the built-in's.
func (r row) throughput() float64 { return ratio(r.oursRate, r.thRate) }

// p99 is overclone's 99th percentile latency over the built-in's.
func (r row) p99() float64 {
	return ratio(float64(percentile(r.ours, 0.99)), float64(percentile(r.theirs, 0.99)))
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// rows are the whole phase, its write calls together, and each write call.
func (c comparison) rows() []row {
	all, writes := c.row("all calls"), c.row("writes", writeMethods...)
	rs := []row{all}
	// A phase of nothing but writes needs the row once.
	if len(writes.ours) != len(all.ours) || len(writes.theirs) != len(all.theirs) {
		rs = append(rs, writes)
	}
	for _, m := range writeMethods {
		if r := c.row(m, m); len(r.ours)+len(r.theirs) > 0 {
			rs = append(rs, r)
		}
	}
	return rs
}

// markdown formats comparisons as one table: per target the calls, calls
// per second, p50 and p99; then overclone's throughput and p99 as ratios
// to the built-in's (throughput above 1 and p99 below 1 are better).
func markdown(cs []comparison) string {
	var b strings.Builder
	fmt.Fprintf(&b, "| phase | calls | %[1]s n | %[1]s calls/s | %[1]s p50 | %[1]s p99 | %[2]s n | %[2]s calls/s | %[2]s p50 | %[2]s p99 | throughput %[1]s/%[2]s | p99 %[1]s/%[2]s |\n", overclone, builtIn)
	b.WriteString("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, c := range cs {
		for _, r := range c.rows() {
			fmt.Fprintf(&b, "| %s | %s | %d | %.0f | %v | %v | %d | %.0f | %v | %v | %.2f | %.2f |\n",
				c.label, r.name,
				len(r.ours), r.oursRate, round(percentile(r.ours, 0.50)), round(percentile(r.ours, 0.99)),
				len(r.theirs), r.thRate, round(percentile(r.theirs, 0.50)), round(percentile(r.theirs, 0.99)),
				r.throughput(), r.p99())
		}
	}
	return b.String()
}

func round(d time.Duration) time.Duration {
	if d >= 10*time.Millisecond {
		return d.Round(100 * time.Microsecond)
	}
	return d.Round(time.Microsecond)
}

// writeResults stores the report where the e2e suite stores its timings:
// results/ at the top of the repository (git ignores it), or the file
// OVERCLONE_LOAD_RESULTS names.
func writeResults(report string) (string, error) {
	path := os.Getenv("OVERCLONE_LOAD_RESULTS")
	if path == "" {
		root, err := filepath.Abs(filepath.Join("..", ".."))
		if err != nil {
			return "", err
		}
		path = filepath.Join(root, "results", "load.md")
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return "", err
	}
	return path, os.WriteFile(path, []byte(report), 0o644)
}
