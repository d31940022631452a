package durability

import (
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/loopfs"
)

const (
	// costFiles and costBig are the two layer shapes the issue names.
	costFiles = 1000
	costBig   = 64 << 20
	// costNoise is unrelated dirty data on the same filesystem (another
	// container's writes, another pull), which a syncfs must flush too
	// and a per-file fsync does not.
	costNoise = 64 << 20
)

// syncMethod makes the layer in dir durable.
type syncMethod struct {
	name string
	sync func(dir string) error
}

var syncMethods = []syncMethod{
	{"syncfs", syncfs},
	{"fsync each", fsyncEach},
	{"writeback, then fsync each", writebackThenFsync},
}

// TestCommitSyncCost measures what making a layer durable costs with one
// syncfs of the root's filesystem against an fsync of every file and
// directory the layer wrote, on xfs and ext4, for a layer of many small
// files and one of a single big file, on a quiet filesystem and on one
// with other dirty data. It logs and asserts nothing: the figures chose
// the method Commit uses (see snapshotter/durable.go).
func TestCommitSyncCost(t *testing.T) {
	if os.Getenv("OVERCLONE_MEASURE") == "" {
		t.Skip("a measurement, not a check: set OVERCLONE_MEASURE=1 to run it")
	}
	var report strings.Builder
	fmt.Fprintf(&report, "%-5s %-22s %-28s %12s\n", "fs", "layer", "method", "time")
	for _, kind := range []loopfs.Kind{loopfs.XFS, loopfs.Ext4} {
		mnt := loopfs.Mount(t, kind)
		rng := rand.New(rand.NewPCG(3, 4))
		for _, shape := range []struct {
			name       string
			files, big int
			noise      int
		}{
			{fmt.Sprintf("%d files", costFiles), costFiles, 0, 0},
			{"64 MiB file", 0, costBig, 0},
			{fmt.Sprintf("%d files + noise", costFiles), costFiles, 0, costNoise},
		} {
			for i, m := range syncMethods {
				// Start from a clean filesystem each time.
				if err := syncfs(mnt); err != nil {
					t.Fatal(err)
				}
				dir := filepath.Join(mnt, fmt.Sprintf("%s-%d", strings.ReplaceAll(shape.name, " ", "-"), i))
				if err := os.Mkdir(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				if _, err := writeLayer(rng, dir, shape.files, shape.big); err != nil {
					t.Fatal(err)
				}
				if shape.noise > 0 {
					noise := make([]byte, shape.noise)
					fillRandom(rng, noise)
					if err := os.WriteFile(dir+".noise", noise, 0o644); err != nil {
						t.Fatal(err)
					}
				}
				start := time.Now()
				if err := m.sync(dir); err != nil {
					t.Fatal(err)
				}
				fmt.Fprintf(&report, "%-5s %-22s %-28s %12v\n", kind, shape.name, m.name, time.Since(start).Round(10*time.Microsecond))
			}
		}
	}
	t.Logf("making a layer durable:\n%s", report.String())
}

func syncfs(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Syncfs(fd)
}

// fsyncEach fsyncs every file and directory under dir, as a per-layer
// alternative to syncfs would.
func fsyncEach(dir string) error {
	return filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && !d.Type().IsRegular() {
			return nil
		}
		return fsyncPath(path)
	})
}

// writebackThenFsync starts writeback of every file first
// (sync_file_range), so that the fsyncs that follow wait for I/O already
// under way instead of starting it one file at a time.
func writebackThenFsync(dir string) error {
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.SyncFileRange(fd, 0, 0, unix.SYNC_FILE_RANGE_WRITE)
	})
	if err != nil {
		return err
	}
	return fsyncEach(dir)
}

func fsyncPath(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Fsync(fd)
}
