package snapshotter

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/loopfs"
)

// TestUserspaceUsage: in userspace mode a container's snapshot is a
// reflinked copy of its image on xfs and btrfs, so its usage is what it
// writes, not the image again; on ext4 it is a real copy and counts so.
func TestUserspaceUsage(t *testing.T) {
	const image = 16 << 20
	for _, kind := range []loopfs.Kind{loopfs.XFS, loopfs.Btrfs, loopfs.Ext4} {
		t.Run(string(kind), func(t *testing.T) {
			ctx := namespaces.WithNamespace(context.Background(), "test")
			s, err := New(ctx, filepath.Join(loopfs.Mount(t, kind), "root"), WithMode(ModeUserspace))
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			copied := map[string]int64{}
			s.OnCopy(func(_, method string, n int64) { copied[method] += n })
			m, err := s.Prepare(ctx, "image-active", "")
			if err != nil {
				t.Fatal(err)
			}
			data := bytes.Repeat([]byte("overclone"), image/9)
			if err := os.WriteFile(filepath.Join(m[0].Source, "big"), data, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := s.Commit(ctx, "image", "image-active"); err != nil {
				t.Fatal(err)
			}
			m, err = s.Prepare(ctx, "container", "image")
			if err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(filepath.Join(m[0].Source, "big"))
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("materialized file differs (%v)", err)
			}
			wantMethod := "copy_file_range"
			if kind.Reflinks() {
				wantMethod = "reflink"
			}
			if copied[wantMethod] != int64(len(data)) {
				t.Errorf("materializing on %s: copied %v, want the image's %d bytes by %s", kind, copied, len(data), wantMethod)
			}
			fresh, err := s.Usage(ctx, "container")
			if err != nil {
				t.Fatal(err)
			}
			f, err := os.OpenFile(filepath.Join(m[0].Source, "big"), os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt(bytes.Repeat([]byte("x"), 1<<20), 0); err != nil {
				t.Fatal(err)
			}
			f.Close()
			written, err := s.Usage(ctx, "container")
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: fresh container %d bytes, after a 1 MiB write %d bytes (image %d)", kind, fresh.Size, written.Size, image)
			if kind.Reflinks() {
				if fresh.Size >= 1<<20 {
					t.Errorf("a fresh container on %s counts %d bytes: the image's shared extents were counted", kind, fresh.Size)
				}
				if d := written.Size - fresh.Size; d < 1<<20 || d > 2<<20 {
					t.Errorf("a 1 MiB write added %d bytes of usage", d)
				}
			} else if fresh.Size < image {
				t.Errorf("a copied container on %s counts only %d bytes", kind, fresh.Size)
			}
		})
	}
}

// TestUserspaceUsageOfCopies: where materialize could not reflink a file
// (btrfs refuses to clone between a NOCOW file and a COW one) the copy is
// the container's own, and its usage counts it although the container
// never touched it.
func TestUserspaceUsageOfCopies(t *testing.T) {
	const size = 4 << 20
	ctx := namespaces.WithNamespace(context.Background(), "test")
	s, err := New(ctx, filepath.Join(loopfs.Mount(t, loopfs.Btrfs), "root"), WithMode(ModeUserspace))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	copied := map[string]int64{}
	s.OnCopy(func(_, method string, n int64) { copied[method] += n })
	m, err := s.Prepare(ctx, "image-active", "")
	if err != nil {
		t.Fatal(err)
	}
	// NOCOW must be set while the file is empty.
	f, err := os.Create(filepath.Join(m[0].Source, "nocow"))
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, fsNocowFl); err != nil {
		t.Fatalf("chattr +C: %v", err)
	}
	if _, err := f.Write(bytes.Repeat([]byte("nocow"), size/5)); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := s.Commit(ctx, "image", "image-active"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prepare(ctx, "container", "image"); err != nil {
		t.Fatal(err)
	}
	if copied["reflink"] != 0 {
		t.Fatalf("materialize reflinked a NOCOW file (%v): this test no longer covers a copy", copied)
	}
	u, err := s.Usage(ctx, "container")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("copied %v; fresh container's usage %d bytes", copied, u.Size)
	if u.Size < size-size/5 {
		t.Fatalf("a container holding a %d-byte copy of its image's file counts %d bytes", size, u.Size)
	}
}

// fsNocowFl is FS_NOCOW_FL from linux/fs.h; x/sys/unix lacks it.
const fsNocowFl = 0x00800000
