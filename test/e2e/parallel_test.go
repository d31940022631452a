package e2e

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/overclone/overclone/test/e2e/harness"
)

// TestContainerd2ParallelUnpack pulls with max_concurrent_unpacks > 1 and
// "rebase" advertised for every snapshotter: containerd then prepares each
// layer without its parent, applies it, and names the parent only at
// Commit. It checks what deploy/README.md promises:
//
//   - overlayfs (the control) and overclone in overlay mode: the parallel
//     unpack keeps whiteouts, opaque dirs and a dir recreated over a
//     whiteout, so "rebase" may be advertised there;
//   - overclone in userspace mode refuses the rebase at Commit, so the pull
//     fails with a message saying not to advertise it, instead of
//     committing a layer without its parent's files.
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

	modes := map[string]string{"overlayfs": "overlay"}
	for _, p := range s.proxies {
		modes[p.Name] = p.Overclone.Mode()
	}
	top := s.chainIDs()[len(s.chainIDs())-1]
	for _, sn := range s.sns {
		t.Run(sn, func(t *testing.T) {
			defer s.removeImages(t)
			t.Logf("%s serves in %s mode", sn, modes[sn])
			if modes[sn] == "userspace" {
				s.requireRebaseRefused(t, sn, ref)
				return
			}
			s.timed(t, "pull, 4 parallel unpacks", sn, "images", "pull", "--plain-http", "--snapshotter", sn, ref)
			s.requireUnpacked(t, sn)
			if !s.unpackedInParallel(t, top) {
				t.Fatalf("containerd did not unpack %s in parallel; the test proves nothing", sn)
			}
			got := s.runViewer(t, sn, ref, "parallel-"+sn, "", "view")
			compareView(t, "after a parallel unpack", got, s.f.img.Expected)
		})
	}
}

// requireRebaseRefused pulls into a userspace-mode daemon that containerd
// believes can rebase: the pull must fail at the first rebase, saying why,
// and leave no committed layer above the bottom one.
func (s *suite) requireRebaseRefused(t *testing.T, sn, ref string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), ctrTimeout)
	defer cancel()
	_, err := s.c.Ctr(ctx, "images", "pull", "--plain-http", "--snapshotter", sn, ref)
	switch {
	case err == nil:
		t.Fatalf("%s: a parallel pull with rebase advertised succeeded; userspace mode should refuse the rebase", sn)
	case !strings.Contains(err.Error(), "rebase is not supported in userspace mode"):
		t.Fatalf("%s: the pull failed, but not with the refusal: %v", sn, err)
	}
	t.Logf("%s refuses: %.200s", sn, err)
	for _, id := range s.chainIDs()[1:] {
		if _, ok := s.snapshots(t, sn)[id]; ok {
			t.Errorf("%s: layer %s committed although its rebase was refused", sn, id)
		}
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
