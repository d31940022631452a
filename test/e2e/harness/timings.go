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
// the median per snapshotter and overclone's ratio to overlayfs.
func (t *Timings) Table() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	type rowKey struct{ containerd, op string }
	rows := map[rowKey]map[string][]time.Duration{}
	for k, v := range t.rows {
		rk := rowKey{k[0], k[1]}
		if rows[rk] == nil {
			rows[rk] = map[string][]time.Duration{}
		}
		rows[rk][k[2]] = v
	}
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
	fmt.Fprintf(&b, "%-11s %-34s %-22s %-22s %s\n", "containerd", "operation", "overlayfs (median, n)", "overclone (median, n)", "overclone/overlayfs")
	for _, k := range keys {
		o, oc := rows[k]["overlayfs"], rows[k][SnapshotterName]
		ratio := "-"
		if len(o) > 0 && len(oc) > 0 {
			ratio = fmt.Sprintf("%.2f", float64(median(oc))/float64(median(o)))
		}
		fmt.Fprintf(&b, "%-11s %-34s %-22s %-22s %s\n", k.containerd, k.op, cell(o), cell(oc), ratio)
	}
	return b.String()
}

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
