package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/overclone/overclone/test/e2e/harness"
	"github.com/overclone/overclone/test/image"
	"github.com/overclone/overclone/test/require"
)

const imageName = harness.ImageName

// fixture is built once per test binary and shared by the containerd
// versions: the test image, its archive, the overclone daemon binary and the
// local registry.
type fixture struct {
	dir          string
	img          *image.Image
	archive      string
	overcloneBin string
	cliBin       string // the overclone admin tool
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

// requireEnv skips when the machine cannot run the suite at all. Each
// containerd version's own binaries are checked where it is started
// (newSuite), so that 2.x runs on a machine without Debian's 1.6.
func requireEnv(t *testing.T) {
	t.Helper()
	require.Root(t, "starts containerd, mounts overlays")
	if _, err := exec.LookPath("runc"); err != nil {
		require.Skip(t, "runc not installed (make deps)")
	}
	if _, err := os.Stat(harness.RegistryBin); err != nil {
		require.Skipf(t, "docker-registry missing (make deps)")
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
	if f.img, f.archive, err = harness.BuildImage(dir, repoRoot()); err != nil {
		return nil, err
	}

	f.overcloneBin = os.Getenv("OVERCLONE_BIN")
	if f.overcloneBin == "" {
		f.overcloneBin = filepath.Join(dir, "containerd-overclone-grpc")
		if err := harness.GoBuild(repoRoot(), f.overcloneBin, "./cmd/containerd-overclone-grpc"); err != nil {
			return nil, err
		}
	}
	f.cliBin = filepath.Join(dir, "overclone")
	if err := harness.GoBuild(repoRoot(), f.cliBin, "./cmd/overclone"); err != nil {
		return nil, err
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
