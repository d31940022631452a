package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/e2e/harness"
	"github.com/overclone/overclone/test/image"
	"github.com/overclone/overclone/test/image/view"
	"github.com/overclone/overclone/test/require"
)

// usernsHostRoot is where the containers' ids start on the host, as a
// kubelet maps a pod: 65536 ids from here.
const usernsHostRoot = 100000

// TestUserNamespace runs containers in their own user namespace on
// containerd 2.4 with overclone advertised as `capabilities =
// ["remap-ids"]`: `ctr run --uidmap --gidmap --remap-labels` hands the
// mapping to the snapshotter as labels (without --remap-labels ctr makes
// a chowned copy itself, and the snapshotter sees no mapping). Inside, the
// container sees the image as built (owners, modes, capabilities), its
// writes land in its upper owned by the mapped host ids, and the upper's
// root is the mapped root's: for overclone in both modes, checked the
// same way on containerd's built-in overlayfs, the reference.
func TestUserNamespace(t *testing.T) {
	runc := filepath.Join(harness.RuncBinDir(), "runc")
	if _, err := os.Stat(runc); err != nil {
		require.Skipf(t, "runc >= 1.2 missing: %v (make runc)", err)
	}
	s := newSuite(t, harness.Containerd2BinDir(), harness.ContainerdOptions{Capabilities: []string{"remap-ids"}})
	// runc, in the container's user namespace, reaches the rootfs under
	// containerd's state dir: the suite's dirs (0700) must let the
	// mapped root through, as /run and /var/lib do on a node.
	for _, d := range []string{s.dir, filepath.Join(s.dir, "ctd")} {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	s.ctr(t, "images", "import", "--no-unpack", s.f.archive)
	for _, sn := range s.sns {
		t.Run(sn, func(t *testing.T) {
			s.ctr(t, "images", "import", "--snapshotter", sn, s.f.archive)
			s.runUserns(t, sn, "userns-"+sn, runc, true)
		})
	}
	// Where containerd's config leaves remap-ids out, its client chowns a
	// copy of the image and still hands the snapshotter the labels:
	// overclone must not map that copy a second time.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.c.Restart(ctx, harness.ContainerdOptions{Proxies: s.proxies}); err != nil {
		t.Fatal(err)
	}
	// Only the overlay-mode daemon: containerd's chown walk fails on an
	// image with hard links wherever a snapshot keeps them (userspace
	// mode, like containerd's native snapshotter): it meets the inode
	// again, already chowned, under its second name ("container ID 100000
	// cannot be mapped to a host ID").
	sn := s.sns[1]
	t.Run(sn+"/without-remap-ids", func(t *testing.T) {
		s.runUserns(t, sn, "userns-copy-"+sn, runc, false)
	})
}

// runUserns runs the viewer's write in container id mapped at
// usernsHostRoot with --remap-labels, checks the view inside, and that
// what it wrote lands in its upper owned by the mapped ids. labelled says
// whether the container's snapshot itself carries the mapping labels
// (containerd then leaves the mapping to the snapshotter).
func (s *suite) runUserns(t *testing.T, sn, id, runc string, labelled bool) {
	t.Helper()
	mapping := fmt.Sprintf("0:%d:65536", usernsHostRoot)
	mapped := fmt.Sprintf("%d:%d", usernsHostRoot, usernsHostRoot)
	o := s.viewerOut(t, id)
	// The container's root is the mapped root: the out dir must be its
	// to write.
	if err := os.Chown(o.Dir, usernsHostRoot, usernsHostRoot); err != nil {
		t.Fatal(err)
	}
	args := append([]string{"run", "--runc-binary", runc, "--uidmap", mapping, "--gidmap", mapping, "--remap-labels"}, o.MountFlags()...)
	args = append(append(args, "--snapshotter", sn, imageName, id), o.Command("write", viewFile)...)
	op := "run userns (write)"
	if !labelled {
		op = "run userns, client's chowned copy (write)"
	}
	out := s.timed(t, op, sn, args...)
	got, want := s.readView(t, o, viewFile, out), expectedAfterWrite(t, s.f.img.Expected)
	if labelled {
		compareView(t, "user-namespaced container's view after its writes", got, want)
	} else {
		// containerd's chowned copy loses file capabilities (chown
		// drops them) and, copied up one name at a time, hard links:
		// only the owners and modes are overclone's to keep.
		g, w := ownersAndModes(got), ownersAndModes(want)
		for p, wv := range w {
			if g[p] != wv {
				t.Errorf("%s: %q inside the container, want %q", p, g[p], wv)
			}
		}
	}

	info := s.ctr(t, "snapshots", "--snapshotter", sn, "info", id)
	if labelled && !strings.Contains(info, "containerd.io/snapshot/uidmapping") {
		t.Errorf("the container's snapshot has no mapping label, so the snapshotter did not map it:\n%s", info)
	}
	upper := upperOf(t, s.ctr(t, "snapshots", "--snapshotter", sn, "mounts", "/mnt", id))
	for _, p := range []string{".", image.DataDir + "/" + view.CreatedFile} {
		if got := ownerOf(filepath.Join(upper, p)); got != mapped {
			t.Errorf("%s in the upper %s owned by %s, want the mapped %s", p, upper, got, mapped)
		}
	}
	s.ctr(t, "containers", "rm", id)
}

// ownersAndModes maps each path of a view to its "mode uid:gid".
func ownersAndModes(v string) map[string]string {
	out := map[string]string{}
	for _, line := range strings.Split(v, "\n") {
		if f := strings.Fields(line); len(f) >= 4 {
			out[f[0]] = f[2] + " " + f[3]
		}
	}
	return out
}

var upperdirRE = regexp.MustCompile(`upperdir=([^,\s]+)`)

// upperOf is the dir a container writes into, from `ctr snapshots mounts`:
// an overlay's upperdir, or the source of a read-write bind.
func upperOf(t *testing.T, mounts string) string {
	t.Helper()
	if m := upperdirRE.FindStringSubmatch(mounts); m != nil {
		return m[1]
	}
	if f := strings.Fields(mounts); len(f) >= 4 && f[0] == "mount" && f[2] == "bind" {
		return f[3]
	}
	t.Fatalf("no upper in %q", mounts)
	return ""
}

func ownerOf(path string) string {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return err.Error()
	}
	return fmt.Sprintf("%d:%d", st.Uid, st.Gid)
}
