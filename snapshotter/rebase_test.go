package snapshotter

import (
	"archive/tar"
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff/apply"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// TestRebaseKeepsWhiteouts unpacks a layer the way containerd 2.2+ does in
// parallel when the snapshotter advertises "rebase": prepared with no
// parent, applied by containerd's own applier, given its parent at Commit.
// Its whiteout and opaque directory must still hide the parent's files.
func TestRebaseKeepsWhiteouts(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "test")
	s, err := New(ctx, t.TempDir(), WithMode(ModeOverlay))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	cs, err := local.NewStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	applier := apply.NewFileSystemApplier(cs)
	unpack := func(key, parent string, layer []byte, rebaseOnto string) {
		t.Helper()
		desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: digest.FromBytes(layer), Size: int64(len(layer))}
		if err := content.WriteBlob(ctx, cs, key, bytes.NewReader(layer), desc); err != nil {
			t.Fatal(err)
		}
		mounts, err := s.Prepare(ctx, key+"-extract", parent, snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotRef: key}))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := applier.Apply(ctx, desc, mounts); err != nil {
			t.Fatal(err)
		}
		var opts []snapshots.Opt
		if rebaseOnto != "" {
			opts = append(opts, snapshots.WithParent(rebaseOnto))
		}
		if err := s.Commit(ctx, key, key+"-extract", opts...); err != nil {
			t.Fatal(err)
		}
	}
	unpack("base", "", tarOf(t, map[string]string{"a": "from base", "d/x": "from base", "keep": "kept"}), "")
	unpack("top", "", tarOf(t, map[string]string{".wh.a": "", "d/.wh..wh..opq": "", "d/y": "from top"}), "base")

	mounts, err := s.View(ctx, "view", "top")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := mount.All(mounts, dir); err != nil {
		t.Fatal(err)
	}
	defer mount.UnmountAll(dir, 0)
	for name, want := range map[string]string{"a": "", "d/x": "", "d/y": "from top", "keep": "kept"} {
		got, err := os.ReadFile(filepath.Join(dir, name))
		switch {
		case want == "" && err == nil:
			t.Errorf("%s shows through the rebased layer's whiteout", name)
		case want != "" && string(got) != want:
			t.Errorf("%s: %q (%v), want %q", name, got, err, want)
		}
	}
}

// TestRebaseRefusedInUserspace: a userspace snapshot is its whole view, so
// a layer unpacked alone cannot be given a parent afterwards.
func TestRebaseRefusedInUserspace(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "test")
	s, err := New(ctx, t.TempDir(), WithMode(ModeUserspace))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Prepare(ctx, "p-a", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, "p", "p-a"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prepare(ctx, "l-a", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, "l", "l-a", snapshots.WithParent("p")); err == nil {
		t.Fatal("rebase in userspace mode must be refused")
	}
}

// tarOf makes an uncompressed layer tar; parent dirs come implicitly.
func tarOf(t *testing.T, files map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for name, content := range files {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(content)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(content)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}
