package snapshotter

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"

	"github.com/overclone/overclone/test/loopfs"
)

// TestModeRecorded: a root remembers the mode it was created in; the other
// mode is refused with a message, and auto keeps the recorded one.
func TestModeRecorded(t *testing.T) {
	root := t.TempDir()
	ctx, s := openTest(t, root, WithMode(ModeUserspace))
	s.Close()

	_, err := New(ctx, root, WithMode(ModeOverlay))
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "created in userspace mode") {
		t.Fatalf("overlay on a userspace root: %v", err)
	}
	s, err = New(ctx, root)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Mode() != ModeUserspace {
		t.Fatalf("auto on a userspace root chose %s", s.Mode())
	}
	if _, err := ParseMode("kernel"); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("bad mode name: %v", err)
	}
}

// TestAutoMode: on a root where overlay serves and intercepts file ops
// (every filesystem here), auto picks overlay; on a root that lives on
// overlayfs, where overlay cannot serve, it picks userspace and works.
func TestAutoMode(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "test")
	s, err := New(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if s.Mode() != ModeOverlay {
		t.Errorf("auto on ext4 chose %s", s.Mode())
	}
	s.Close()

	// A root inside an overlay mount, as in a container without a
	// volume for the snapshotter's state.
	base := loopfs.Mount(t, loopfs.Tmpfs)
	for _, d := range []string{"lower", "upper", "work", "merged"} {
		if err := os.Mkdir(filepath.Join(base, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	merged := filepath.Join(base, "merged")
	if err := mountOverlay(base, merged); err != nil {
		t.Fatal(err)
	}
	defer unmount(merged)
	s, err = New(ctx, filepath.Join(merged, "root"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Mode() != ModeUserspace {
		t.Fatalf("auto on an overlayfs root chose %s", s.Mode())
	}
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, "a-c", "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prepare(ctx, "b", "a-c"); err != nil {
		t.Fatal(err)
	}
	_, err = New(ctx, filepath.Join(merged, "root2"), WithMode(ModeOverlay))
	if err == nil || !strings.Contains(err.Error(), "overlay cannot serve") {
		t.Fatalf("overlay mode on an overlayfs root: %v", err)
	}
}
