package e2e

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/overclone/overclone/test/e2e/harness"
)

// rebaseSafe records the decision TestContainerd2ParallelUnpack checks:
// whether overclone may advertise the "rebase" capability, i.e. whether
// whiteouts and opaque dirs survive containerd 2.x's parallel unpack. See
// deploy/README.md.
var rebaseSafe = map[string]bool{
	harness.SnapshotterName: false,
	harness.UserspaceName:   false,
}

// TestContainerd2ParallelUnpack pulls with max_concurrent_unpacks > 1 and
// "rebase" advertised for overclone: containerd then prepares every layer
// without its parent, applies it, and names the parent only at Commit. The
// built-in overlayfs is the control (containerd rewrites its bind mounts to
// overlays so the applier still writes whiteouts); for overclone the test
// asserts the decision recorded in rebaseSafe.
func TestContainerd2ParallelUnpack(t *testing.T) {
	s := newSuite(t, harness.Containerd2BinDir(), harness.ContainerdOptions{
		Capabilities:         []string{"rebase"},
		MaxConcurrentUnpacks: 4,
		LogLevel:             "debug",
	})
	// Parallel unpack is a pull-only path: push the image from this
	// containerd, then forget it so the pulls fetch and unpack.
	s.ctr(t, "images", "import", "--no-unpack", s.f.archive)
	ref := fmt.Sprintf("%s/overclone/e2e-parallel:1", s.f.registry.Host)
	s.ctr(t, "images", "tag", imageName, ref)
	s.ctr(t, "images", "push", "--plain-http", ref)
	s.removeImages(t)

	top := s.chainIDs()[len(s.chainIDs())-1]
	for _, sn := range s.sns {
		t.Run(sn, func(t *testing.T) {
			s.timed(t, "pull, 4 parallel unpacks", sn, "images", "pull", "--plain-http", "--snapshotter", sn, ref)
			s.requireUnpacked(t, sn)
			if !s.unpackedInParallel(t, top) {
				t.Fatalf("containerd did not unpack %s in parallel; the test proves nothing", sn)
			}
			ctx, cancel := context.WithTimeout(context.Background(), ctrTimeout)
			defer cancel()
			out, err := s.c.Ctr(ctx, "run", "--rm", "--snapshotter", sn, ref, "parallel-"+sn)
			if err != nil {
				// A snapshotter that loses the parent's content at
				// the rebase cannot even start the entrypoint.
				out = fmt.Sprintf("(container did not run: %v)\n", err)
				t.Logf("%s: %v", sn, err)
			}
			intact := out == s.f.img.Expected
			t.Logf("%s: whiteouts and opaque dirs survive a parallel unpack: %v", sn, intact)
			switch {
			case sn == "overlayfs" || rebaseSafe[sn]:
				compareView(t, "after a parallel unpack", out, s.f.img.Expected)
			case intact:
				t.Errorf("%s kept whiteouts through a parallel unpack: rebase may be advertised; update rebaseSafe and deploy/", sn)
			default:
				// Expected: the lost whiteouts are what deploy/
				// documents as the reason not to advertise rebase.
				var msg strings.Builder
				compareView(&recorder{TB: t, w: &msg}, "after a parallel unpack", out, s.f.img.Expected)
				t.Logf("%s with rebase advertised (documented as unsupported):\n%s", sn, msg.String())
			}
			s.removeImages(t)
		})
	}
}

// unpackedInParallel reads containerd's debug log for the unpack of the
// chain ending in top.
func (s *suite) unpackedInParallel(t *testing.T, top string) bool {
	t.Helper()
	b, err := os.ReadFile(s.c.Log)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, `msg="image unpacked"`) && strings.Contains(line, top) {
			return strings.Contains(line, "parallel=true")
		}
	}
	return false
}
