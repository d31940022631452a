package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/overclone/overclone/test/e2e/harness"
	"github.com/overclone/overclone/test/image"
)

// DeepEnv turns TestDeepImage on; its value is the number of rounds. It is
// a measurement of several minutes, not a check the suite needs each run:
// the suite's own checks already mount stacks deeper than the kernel's 500.
const DeepEnv = "OVERCLONE_E2E_DEEP"

// TestDeepImage times, through real containerd (1.6 and 2.x), the import of
// a 500-layer image on the built-in overlayfs and on overclone, and the
// import and first `ctr run --rm` of a 1000-layer image, which only
// overclone can run. Each round imports into one snapshotter at a time,
// the order alternating, and removes the image after. It asserts nothing
// about time (a report, see issue 12's goals); the runs' views are checked.
//
//	OVERCLONE_E2E_DEEP=3 go test -count=1 -run TestDeepImage -v ./test/e2e/
func TestDeepImage(t *testing.T) {
	rounds, _ := strconv.Atoi(os.Getenv(DeepEnv))
	if rounds <= 0 {
		t.Skipf("a measurement of several minutes: set %s to the number of rounds to run it", DeepEnv)
	}
	f := getFixture(t)
	dir := t.TempDir()
	viewer, err := os.ReadFile(filepath.Join(f.dir, "viewer"))
	if err != nil {
		t.Fatal(err)
	}
	images := map[int]*deepImage{}
	for _, n := range []int{500, 1000} {
		name := fmt.Sprintf("overclone.test/e2e/deep%d:1", n)
		img, err := image.BuildDeep(filepath.Join(dir, fmt.Sprint("layout", n)), name, n, viewer)
		if err != nil {
			t.Fatal(err)
		}
		archive := filepath.Join(dir, fmt.Sprintf("deep%d.tar", n))
		if err := img.WriteArchive(archive); err != nil {
			t.Fatal(err)
		}
		images[n] = &deepImage{img, archive}
	}
	for _, v := range []struct{ name, bin string }{
		{"containerd-1.6", harness.Containerd16Bin},
		{"containerd-2", harness.Containerd2BinDir()},
	} {
		t.Run(v.name, func(t *testing.T) {
			s := newSuite(t, v.bin, harness.ContainerdOptions{})
			sns := []string{"overlayfs", harness.SnapshotterName}
			for round := range rounds {
				for _, sn := range alternate(sns, round) {
					s.deepRound(t, sn, images[500], 500)
				}
				s.deepRound(t, harness.SnapshotterName, images[1000], 1000)
			}
		})
	}
}

type deepImage struct {
	img     *image.Image
	archive string
}

// deepRound imports the image into sn, runs it once if sn can mount it, and
// removes it.
func (s *suite) deepRound(t *testing.T, sn string, d *deepImage, layers int) {
	s.timed(t, fmt.Sprintf("import, %d layers", layers), sn, "images", "import", "--snapshotter", sn, d.archive)
	// The built-in's mount options outgrow a page past a few hundred
	// layers and the kernel stops at 500: only overclone runs these.
	if sn != "overlayfs" {
		id := fmt.Sprintf("deep%d-%d", layers, time.Now().UnixNano())
		got := s.runViewer(t, sn, d.img.Name, id, fmt.Sprintf("first run --rm, %d layers", layers), "view")
		compareView(t, fmt.Sprintf("ctr run --snapshotter %s, %d layers", sn, layers), got, d.img.Expected)
	}
	s.ctr(t, "images", "rm", "--sync", d.img.Name)
}
