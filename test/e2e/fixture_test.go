package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"

	"github.com/overclone/overclone/test/e2e/harness"
	"github.com/overclone/overclone/test/image"
)

// imageName is what the archive's annotations name the test image.
const imageName = "overclone.test/e2e/viewer:1"

// fixture is built once per test binary and shared by the containerd
// versions: the test image, its archive, the overclone daemon binary and the
// local registry.
type fixture struct {
	dir          string
	img          *image.Image
	archive      string
	overcloneBin string // "" when the daemon is not in the tree yet
	noOverclone  string // why overcloneBin is empty
	registry     *harness.Registry
}

var (
	fixtureOnce sync.Once
	shared      *fixture
	fixtureErr  error
	timings     harness.Timings
)

// repoRoot is the module root, two levels above this package.
func repoRoot() string {
	root, err := filepath.Abs("../..")
	if err != nil {
		panic(err)
	}
	return root
}

func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}

func goBuild(out, pkg string, env ...string) error {
	cmd := exec.Command(goTool(), "build", "-o", out, pkg)
	cmd.Dir = repoRoot()
	cmd.Env = append(os.Environ(), env...)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
	}
	return nil
}

// requireEnv skips when the machine cannot run the suite at all.
func requireEnv(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: starts containerd, mounts overlays")
	}
	if _, err := exec.LookPath("runc"); err != nil {
		t.Skip("runc not installed (make deps)")
	}
	if m := harness.Missing(harness.Containerd16Bin, harness.ContainerdTools...); m != "" {
		t.Skipf("containerd 1.6 missing: %s (make deps)", m)
	}
	if _, err := os.Stat(harness.RegistryBin); err != nil {
		t.Skipf("docker-registry missing (make deps)")
	}
}

func getFixture(t *testing.T) *fixture {
	t.Helper()
	requireEnv(t)
	fixtureOnce.Do(func() { shared, fixtureErr = newFixture() })
	if fixtureErr != nil {
		t.Fatal(fixtureErr)
	}
	return shared
}

func newFixture() (*fixture, error) {
	dir, err := harness.TempDir("oc-e2e-")
	if err != nil {
		return nil, err
	}
	f := &fixture{dir: dir}
	viewer := filepath.Join(dir, "viewer")
	if err := goBuild(viewer, "./test/image/viewer", "CGO_ENABLED=0"); err != nil {
		return nil, err
	}
	viewerBin, err := os.ReadFile(viewer)
	if err != nil {
		return nil, err
	}
	if f.img, err = image.Build(filepath.Join(dir, "layout"), imageName, viewerBin); err != nil {
		return nil, err
	}
	f.archive = filepath.Join(dir, "image.tar")
	if err := f.img.WriteArchive(f.archive); err != nil {
		return nil, err
	}

	switch bin := os.Getenv("OVERCLONE_BIN"); {
	case bin != "":
		f.overcloneBin = bin
	default:
		if _, err := os.Stat(filepath.Join(repoRoot(), "cmd", "containerd-overclone-grpc")); err != nil {
			f.noOverclone = "overclone daemon not yet on main"
			break
		}
		f.overcloneBin = filepath.Join(dir, "containerd-overclone-grpc")
		if err := goBuild(f.overcloneBin, "./cmd/containerd-overclone-grpc"); err != nil {
			return nil, err
		}
	}

	if f.registry, err = harness.StartRegistry(context.Background(), dir, func(string, ...any) {}); err != nil {
		return nil, err
	}
	return f, nil
}

func (f *fixture) close() {
	if f == nil {
		return
	}
	_ = f.registry.Stop()
	_ = harness.UnmountUnder(f.dir)
	_ = os.RemoveAll(f.dir)
}

func TestMain(m *testing.M) {
	code := m.Run()
	shared.close()
	if !timings.Empty() {
		table := timings.Table()
		path := os.Getenv("OVERCLONE_E2E_TIMINGS")
		if path == "" {
			path = filepath.Join(repoRoot(), "results", "e2e-timings.txt")
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err == nil {
			_ = os.WriteFile(path, []byte(table), 0o644)
		}
		fmt.Print(table)
	}
	os.Exit(code)
}
