package harness

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"

	"github.com/overclone/overclone/test/image"
)

// ImageName is what the test image's archive annotations name it.
const ImageName = "overclone.test/e2e/viewer:1"

// BuildImage compiles the static viewer from the module at repoRoot, builds
// the test image under dir and writes its archive; it returns the image and
// the archive's path.
func BuildImage(dir, repoRoot string) (*image.Image, string, error) {
	viewer := filepath.Join(dir, "viewer")
	if err := GoBuild(repoRoot, viewer, "./test/image/viewer", "CGO_ENABLED=0"); err != nil {
		return nil, "", err
	}
	bin, err := os.ReadFile(viewer)
	if err != nil {
		return nil, "", err
	}
	img, err := image.Build(filepath.Join(dir, "layout"), ImageName, bin)
	if err != nil {
		return nil, "", err
	}
	archive := filepath.Join(dir, "image.tar")
	if err := img.WriteArchive(archive); err != nil {
		return nil, "", err
	}
	return img, archive, nil
}

// GoBuild builds pkg of the module at repoRoot into out.
func GoBuild(repoRoot, out, pkg string, env ...string) error {
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	cmd := exec.Command(goTool, "build", "-o", out, pkg)
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), env...)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
	}
	return nil
}

// PauseImageName is the sandbox image the CRI tests name in containerd's
// config.
const PauseImageName = "overclone.test/e2e/pause:1"

// BuildPauseImage compiles test/image/pause static and writes the sandbox
// image's archive under dir; it returns the archive's path.
func BuildPauseImage(dir, repoRoot string) (*image.Image, string, error) {
	bin := filepath.Join(dir, "pause")
	if err := GoBuild(repoRoot, bin, "./test/image/pause", "CGO_ENABLED=0"); err != nil {
		return nil, "", err
	}
	b, err := os.ReadFile(bin)
	if err != nil {
		return nil, "", err
	}
	img, err := image.BuildPause(filepath.Join(dir, "pause-layout"), PauseImageName, b)
	if err != nil {
		return nil, "", err
	}
	archive := filepath.Join(dir, "pause.tar")
	if err := img.WriteArchive(archive); err != nil {
		return nil, "", err
	}
	return img, archive, nil
}
