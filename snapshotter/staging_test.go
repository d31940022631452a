package snapshotter

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/overclone/overclone/test/require"
)

// TestStagingLeftoversRemovedAtStart: what an `overclone cp` killed in the
// middle of a copy leaves in an active snapshot is removed when the
// snapshotter next starts; files of the snapshot and the entry of a copy
// still running stay.
func TestStagingLeftoversRemovedAtStart(t *testing.T) {
	require.Root(t, "the overlay probe")
	root := t.TempDir()
	ctx, s := openTest(t, root)
	if _, err := s.Prepare(ctx, "base-active", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, "base", "base-active"); err != nil {
		t.Fatal(err)
	}
	mounts, err := s.Prepare(ctx, "ctr", "base")
	if err != nil {
		t.Fatal(err)
	}
	upper := mounts[0].Source
	for _, o := range mounts[0].Options {
		if v, ok := strings.CutPrefix(o, "upperdir="); ok {
			upper = v
		}
	}
	id := filepath.Base(filepath.Dir(upper))

	// A writer that is gone (no pid is that large), and one still
	// running: another process, its entry fresh.
	live := exec.Command("sleep", "600")
	if err := live.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { live.Process.Kill(); live.Wait() }()
	dead := ".overclone-tmp-999999999-1"
	running := ".overclone-tmp-" + strconv.Itoa(live.Process.Pid) + "-1"

	plant := func(p string, dir bool) string {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if dir {
			if err := os.MkdirAll(filepath.Join(p, "sub"), 0o755); err != nil {
				t.Fatal(err)
			}
			p = filepath.Join(p, "sub", "f")
		}
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	gone := []string{filepath.Join(upper, dead), filepath.Join(upper, "etc", dead)}
	plant(gone[0], true)
	plant(gone[1], false)
	if s.mode == ModeOverlay {
		gone = append(gone, filepath.Join(s.workPath(id), dead))
		plant(gone[2], true)
	}
	kept := []string{filepath.Join(upper, running), filepath.Join(upper, "etc", "passwd"), filepath.Join(upper, ".overclone-tmp-notapid")}
	for _, p := range kept {
		plant(p, false)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	_, s = openTest(t, root)
	s.Close() // waits for the background walk
	for _, p := range gone {
		if _, err := os.Lstat(p); !os.IsNotExist(err) {
			t.Errorf("leftover %s still there: %v", p, err)
		}
	}
	for _, p := range kept {
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("%s was removed: %v", p, err)
		}
	}
}
