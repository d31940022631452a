package overlaytest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"

	"github.com/overclone/overclone/overlayutil"
	"github.com/overclone/overclone/snapshotter"
	"github.com/overclone/overclone/test/loopfs"
)

// depths are the stacks the issue measures; 501 is one past the kernel.
var depths = []int{50, 128, 256, 500, 501}

// TestDepthSideBySide commits a chain of 501 layers in containerd's
// built-in overlayfs snapshotter and in overclone's, mounts an active
// snapshot on the top 50, 128, 256, 500 and 501 of each with core/mount,
// checks the merged view, and logs the table: where each one fails, and
// the option bytes core/mount passes (compacted) and that a consumer which
// does not compact (an OCI spec mount handed to runc) would need.
func TestDepthSideBySide(t *testing.T) {
	if testing.Short() {
		t.Skip("commits 1002 layers")
	}
	ctx := namespaces.WithNamespace(context.Background(), "overlaytest")
	base := loopfs.Mount(t, loopfs.Ext4)
	type result struct {
		ok     bool
		detail string
	}
	results := map[string]map[int]result{}
	names := []string{"built-in", "overclone"}
	for _, name := range names {
		root := filepath.Join(base, name)
		var sn snapshots.Snapshotter
		var err error
		switch name {
		case "built-in":
			sn, err = overlay.NewSnapshotter(root)
		case "overclone":
			sn, err = snapshotter.New(ctx, root)
		}
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		t.Cleanup(func() { sn.Close() })
		tmp := t.TempDir()
		if err := CommitChain(ctx, sn, "", depths[len(depths)-1], tmp); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		results[name] = map[int]result{}
		for _, n := range depths {
			target := filepath.Join(tmp, fmt.Sprintf("top-%d", n))
			if err := os.Mkdir(target, 0o755); err != nil {
				t.Fatal(err)
			}
			ms, unmount, err := MountTop(ctx, sn, "", n, fmt.Sprintf("top-%d", n), target)
			var r result
			if err != nil {
				r.detail = "FAILS: " + shortErr(err)
			} else {
				verr := VerifyMerged(target, n)
				if uerr := unmount(); uerr != nil {
					t.Errorf("%s: unmount %d: %v", name, n, uerr)
				}
				if verr != nil {
					r.detail = "WRONG VIEW: " + verr.Error()
				} else {
					r.ok = true
					r.detail = "ok"
				}
			}
			if len(ms) == 1 {
				_, data := overlayutil.MountData(ms[0], os.Getpagesize())
				r.detail += fmt.Sprintf(" (%d B, %d B uncompacted)", len(data), len(strings.Join(ms[0].Options, ",")))
			}
			results[name][n] = r
		}
	}
	t.Logf("%-7s  %-48s  %s", "layers", "built-in overlayfs", "overclone")
	for _, n := range depths {
		b, o := results["built-in"][n], results["overclone"][n]
		t.Logf("%-7d  %-48s  %s", n, b.detail, o.detail)
		if n <= overlayutil.DefaultMaxLowers && !b.ok {
			t.Errorf("built-in failed at %d layers: %s", n, b.detail)
		}
		// overclone must mount wherever the built-in does.
		if b.ok && !o.ok {
			t.Errorf("overclone failed at %d layers where the built-in mounts: %s", n, o.detail)
		}
	}
}

// shortErr keeps the end of a mount error: the option string before it
// runs to kilobytes.
func shortErr(err error) string {
	s := err.Error()
	if i := strings.LastIndex(s, "err: "); i >= 0 {
		return s[i+len("err: "):]
	}
	if len(s) > 120 {
		return "..." + s[len(s)-120:]
	}
	return s
}
