package e2e

import (
	"context"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/overclone/overclone/test/e2e/harness"
)

// e2eLimit is the limit the containers run with; e2eFill is past it.
const (
	e2eLimit = 40 << 20
	e2eFill  = 80 << 20
)

// TestContainerd2SizeLimit runs containers through containerd 2.4 with
// `ctr run --snapshotter-label containerd.io/snapshot/max-size=...`:
//
//   - on overclone (overlay mode) a write past the limit fails inside the
//     container with "no space left on device", and once the container
//     is removed its image is unmounted;
//   - a container without the label on the same overclone writes the
//     same amount;
//   - overclone in userspace mode refuses the label, and containerd's
//     error says why, rather than running the container unlimited.
func TestContainerd2SizeLimit(t *testing.T) {
	s := newSuite(t, harness.Containerd2BinDir(), harness.ContainerdOptions{})
	s.ctr(t, "images", "import", "--no-unpack", s.f.archive)
	label := "--snapshotter-label=" + snapshots.LabelSnapshotMaxSize + "=" + strconv.Itoa(e2eLimit)
	fill := []string{"/bin/viewer", "fill", "/big", strconv.Itoa(e2eFill)}
	ctx, cancel := context.WithTimeout(context.Background(), ctrTimeout)
	defer cancel()

	sn := harness.SnapshotterName
	s.ctr(t, "images", "import", "--snapshotter", sn, s.f.archive)
	out, err := s.c.Ctr(ctx, append([]string{"run", "--rm", label, "--snapshotter", sn, imageName, "limited"}, fill...)...)
	if err == nil || !strings.Contains(out+err.Error(), "no space left on device") {
		t.Fatalf("writing %d bytes in a container limited to %d: %v, output %q; want no space left on device", e2eFill, e2eLimit, err, out)
	}
	s.ctr(t, append([]string{"run", "--rm", "--snapshotter", sn, imageName, "unlimited"}, fill...)...)
	// containerd removes a container's snapshot from the snapshotter in
	// its garbage collection; images rm --sync runs one and waits.
	s.removeImages(t)
	if left := mountsUnder(t, s.oc.Root+"/snapshots/"); len(left) > 0 {
		t.Errorf("mounts left after containerd's GC: %v", left)
	}

	us := harness.UserspaceName
	s.ctr(t, "images", "import", "--snapshotter", us, s.f.archive)
	out, err = s.c.Ctr(ctx, append([]string{"run", "--rm", label, "--snapshotter", us, imageName, "userspace"}, fill...)...)
	if err == nil || !strings.Contains(out+err.Error(), "userspace mode") {
		t.Fatalf("a limit in userspace mode: %v, output %q; want a refusal naming userspace mode", err, out)
	}
}

// mountsUnder lists the mount points under prefix.
func mountsUnder(t *testing.T, prefix string) []string {
	t.Helper()
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(mi), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], prefix) {
			out = append(out, f[4])
		}
	}
	return out
}
