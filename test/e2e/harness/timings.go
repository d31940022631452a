package harness

import (
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"
)

// Timings collects durations of the same operation on different
// snapshotters, so a run can print overclone next to the built-in overlayfs.
type Timings struct {
	mu   sync.Mutex
	rows map[[3]string][]time.Duration // containerd version, operation, snapshotter
}

// Add records one measurement.
func (t *Timings) Add(containerd, op, snapshotter string, d time.Duration) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.rows == nil {
		t.rows = map[[3]string][]time.Duration{}
	}
	k := [3]string{containerd, op, snapshotter}
	t.rows[k] = append(t.rows[k], d)
}

// Empty reports whether nothing was recorded.
func (t *Timings) Empty() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.rows) == 0
}

// Table formats the measurements: one row per containerd and operation,
// the median per snapshotter, and each snapshotter's ratio to overlayfs.
func (t *Timings) Table() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	type rowKey struct{ containerd, op string }
	rows := map[rowKey]map[string][]time.Duration{}
	seen := map[string]bool{}
	for k, v := range t.rows {
		rk := rowKey{k[0], k[1]}
		if rows[rk] == nil {
			rows[rk] = map[string][]time.Duration{}
		}
		rows[rk][k[2]] = v
		seen[k[2]] = true
	}
	// overlayfs first: the baseline the ratios divide by.
	var cols []string
	for sn := range seen {
		if sn != baseline {
			cols = append(cols, sn)
		}
	}
	sort.Strings(cols)
	cols = append([]string{baseline}, cols...)

	keys := make([]rowKey, 0, len(rows))
	for k := range rows {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].containerd != keys[j].containerd {
			return keys[i].containerd < keys[j].containerd
		}
		return keys[i].op < keys[j].op
	})
	var b strings.Builder
	fmt.Fprintf(&b, "%-10s %-34s", "containerd", "operation (median, runs)")
	for _, c := range cols {
		fmt.Fprintf(&b, " %-20s", c)
	}
	for _, c := range cols[1:] {
		fmt.Fprintf(&b, " %s/%s", c, baseline)
	}
	b.WriteString("\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "%-10s %-34s", k.containerd, k.op)
		for _, c := range cols {
			fmt.Fprintf(&b, " %-20s", cell(rows[k][c]))
		}
		for _, c := range cols[1:] {
			ratio := "-"
			if base, d := rows[k][baseline], rows[k][c]; len(base) > 0 && len(d) > 0 {
				ratio = fmt.Sprintf("%.2f", float64(median(d))/float64(median(base)))
			}
			fmt.Fprintf(&b, " %*s", len(c)+len(baseline)+1, ratio)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// baseline is the snapshotter every other is compared with.
const baseline = "overlayfs"

func cell(ds []time.Duration) string {
	if len(ds) == 0 {
		return "-"
	}
	return fmt.Sprintf("%s (%d)", median(ds).Round(time.Millisecond), len(ds))
}

func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}
