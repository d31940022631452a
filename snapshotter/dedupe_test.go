package snapshotter

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"

	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/loopfs"
)

// dedupeFileSize spans many blocks and more than one extent batch of
// FIEMAP never matters: what counts is that every extent is compared.
const dedupeFileSize = 1<<20 + 123 // a partial last block too

func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// extentMap is the kernel's FIEMAP of a file: physical offsets and flags.
type extentMap []fiemapExtent

func fiemapOf(t *testing.T, path string) extentMap {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out extentMap
	fm := &fiemap{}
	for start := uint64(0); ; {
		*fm = fiemap{Start: start, Length: ^uint64(0) - start, Flags: fiemapFlagSync, ExtentCount: fiemapBatch}
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(fm))); errno != 0 {
			t.Fatalf("FIEMAP %s: %v", path, errno)
		}
		if fm.MappedExtents == 0 {
			return out
		}
		for _, e := range fm.Extents[:fm.MappedExtents] {
			out = append(out, e)
			if e.Flags&fiemapExtentLast != 0 {
				return out
			}
			start = e.Logical + e.Length
		}
	}
}

// sameExtents reports whether a and b map every logical offset to the same
// physical one: the two files share all their blocks.
func sameExtents(t *testing.T, a, b string) bool {
	t.Helper()
	ea, eb := fiemapOf(t, a), fiemapOf(t, b)
	phys := func(m extentMap, off uint64) (uint64, bool) {
		for _, e := range m {
			if off >= e.Logical && off < e.Logical+e.Length {
				return e.Physical + off - e.Logical, true
			}
		}
		return 0, false
	}
	if len(ea) == 0 || len(eb) == 0 {
		return false
	}
	for off := uint64(0); off < dedupeFileSize; off += 4096 {
		pa, oka := phys(ea, off)
		pb, okb := phys(eb, off)
		if !oka || !okb || pa != pb {
			return false
		}
	}
	return true
}

// sharesAny reports whether any of a's extents is at a physical place of
// b's.
func sharesAny(t *testing.T, a, b string) bool {
	t.Helper()
	for _, x := range fiemapOf(t, a) {
		for _, y := range fiemapOf(t, b) {
			if x.Physical < y.Physical+y.Length && y.Physical < x.Physical+x.Length {
				return true
			}
		}
	}
	return false
}

// commitLayer commits a parentless layer holding files (path: content) and
// returns its fs dir.
func commitLayer(ctx context.Context, t *testing.T, s *Snapshotter, name string, files map[string][]byte) string {
	t.Helper()
	key := name + "-active"
	dir := activeWith(ctx, t, s, key, files)
	if err := s.Commit(ctx, name, key); err != nil {
		t.Fatal(err)
	}
	return dir
}

func writeFiles(t *testing.T, dir string, files map[string][]byte) {
	t.Helper()
	for p, data := range files {
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func assertContent(t *testing.T, dir string, files map[string][]byte) {
	t.Helper()
	for p, want := range files {
		got, err := os.ReadFile(filepath.Join(dir, p))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s/%s: content changed", dir, p)
		}
	}
}

func usageOf(ctx context.Context, t *testing.T, s *Snapshotter, key string) int64 {
	t.Helper()
	u, err := s.Usage(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	return u.Size
}

// TestDedupeCommit, on xfs (reflink=1) and btrfs with dedupe = "commit":
// a file that a later layer holds again, under another name, ends up
// sharing every extent with the first copy (the kernel's FIEMAP says so),
// both read as written; a file differing in its last byte, a file below
// the size threshold and a running container's upper never share; the
// later layer's usage stops counting what the first counts, and takes it
// back when the first layer is removed, which leaves its files intact;
// a layer committed after that shares with the survivor.
func TestDedupeCommit(t *testing.T) {
	for _, kind := range []loopfs.Kind{loopfs.XFS, loopfs.Btrfs} {
		t.Run(string(kind), func(t *testing.T) {
			root := filepath.Join(loopfs.Mount(t, kind), "root")
			ctx, s := openTest(t, root, WithMode(ModeOverlay), WithSyncOnCommit(true), WithDedupe(DedupeCommit, 0))
			if s.DedupeMode() != DedupeCommit {
				t.Fatalf("dedupe %s on %s, want commit", s.DedupeMode(), kind)
			}
			same := randomBytes(1, dedupeFileSize)
			diff := randomBytes(2, dedupeFileSize)
			diff2 := bytes.Clone(diff)
			diff2[len(diff2)-1] ^= 1
			small := randomBytes(3, 8<<10)
			filesA := map[string][]byte{"usr/lib/libsame.so": same, "usr/lib/libdiff.so": diff, "etc/small": small}
			filesB := map[string][]byte{"opt/app/copy.so": same, "usr/lib/libdiff.so": diff2, "etc/small": small}

			// A container writing the same bytes is not a layer: its
			// upper is never touched.
			if _, err := s.Prepare(ctx, "running", ""); err != nil {
				t.Fatal(err)
			}
			running := bindSource(ctx, t, s, "running")
			writeFiles(t, running, map[string][]byte{"copy.so": same})

			dirA := commitLayer(ctx, t, s, "a", filesA)
			usageA := usageOf(ctx, t, s, "a")
			dirB, fullB := commitLayerUsage(ctx, t, s, "b", filesB)

			if !sameExtents(t, filepath.Join(dirA, "usr/lib/libsame.so"), filepath.Join(dirB, "opt/app/copy.so")) {
				t.Errorf("identical files in layers a and b do not share their extents")
			}
			if sharesAny(t, filepath.Join(dirA, "usr/lib/libdiff.so"), filepath.Join(dirB, "usr/lib/libdiff.so")) {
				t.Errorf("files differing in one byte share extents")
			}
			if sharesAny(t, filepath.Join(dirA, "etc/small"), filepath.Join(dirB, "etc/small")) {
				t.Errorf("a file below dedupe_min_size was deduped")
			}
			if sharesAny(t, filepath.Join(dirA, "usr/lib/libsame.so"), filepath.Join(running, "copy.so")) {
				t.Errorf("a running container's upper was deduped")
			}
			assertContent(t, dirA, filesA)
			assertContent(t, dirB, filesB)

			// b no longer counts the shared file; a still does.
			if got := usageOf(ctx, t, s, "a"); got != usageA {
				t.Errorf("usage of a changed from %d to %d", usageA, got)
			}
			usageB := usageOf(ctx, t, s, "b")
			if usageB > fullB-dedupeFileSize || usageB <= 0 {
				t.Errorf("usage of b %d, want about %d less the %d shared bytes", usageB, fullB, dedupeFileSize)
			}

			if err := s.Remove(ctx, "a"); err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil { // waits for the trash
				t.Fatal(err)
			}
			ctx, s = openTest(t, root, WithMode(ModeOverlay), WithDedupe(DedupeCommit, 0))
			assertContent(t, dirB, filesB)
			if got := usageOf(ctx, t, s, "b"); got != fullB {
				t.Errorf("usage of b after a went: %d, want its full %d", got, fullB)
			}
			dirC := commitLayer(ctx, t, s, "c", map[string][]byte{"same": same})
			if !sameExtents(t, filepath.Join(dirB, "opt/app/copy.so"), filepath.Join(dirC, "same")) {
				t.Errorf("a layer committed after the first copy went does not share with the second")
			}
			assertContent(t, dirC, map[string][]byte{"same": same})
			assertContent(t, dirB, filesB)
		})
	}
}

// TestDedupeLater: layers committed with dedupe off are deduped by a later
// pass (overclone dedupe); a dry run shares nothing and reports what the
// pass then shares. An index entry whose file was swapped for a symlink to
// a host file with the same bytes is not followed out of its layer.
func TestDedupeLater(t *testing.T) {
	root := filepath.Join(loopfs.Mount(t, loopfs.XFS), "root")
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithDedupe(DedupeOff, 0))
	same := randomBytes(4, dedupeFileSize)
	dirA := commitLayer(ctx, t, s, "a", map[string][]byte{"lib/x.so": same})
	dirB := commitLayer(ctx, t, s, "b", map[string][]byte{"lib/y.so": same})
	if sharesAny(t, filepath.Join(dirA, "lib/x.so"), filepath.Join(dirB, "lib/y.so")) {
		t.Fatal("shared with dedupe off")
	}

	dry, err := s.Dedupe(ctx, true, nil)
	if err != nil {
		t.Fatal(err)
	}
	if sharesAny(t, filepath.Join(dirA, "lib/x.so"), filepath.Join(dirB, "lib/y.so")) {
		t.Fatal("a dry run shared extents")
	}
	var lines []DedupeResult
	sum, err := s.Dedupe(ctx, false, func(r DedupeResult) { lines = append(lines, r) })
	if err != nil {
		t.Fatal(err)
	}
	if dry.SharedBytes != dedupeFileSize || sum.SharedBytes != dedupeFileSize || sum.Layers != 2 || len(lines) != 2 || lines[1].Done != 2 || lines[1].Total != 2 {
		t.Errorf("dry run %+v, pass %+v, progress %+v: want %d bytes shared over 2 layers", dry, sum, lines, dedupeFileSize)
	}
	if !sameExtents(t, filepath.Join(dirA, "lib/x.so"), filepath.Join(dirB, "lib/y.so")) {
		t.Error("the pass did not share the two copies")
	}
	if again, err := s.Dedupe(ctx, false, nil); err != nil || again.Layers != 0 {
		t.Errorf("a second pass did %+v, %v: want nothing to do", again, err)
	}

	// a's indexed file becomes a symlink to a host file with the same
	// bytes, on the same filesystem: a new layer with that content must
	// not share with the host file.
	host := filepath.Join(filepath.Dir(root), "host.so")
	writeFiles(t, filepath.Dir(host), map[string][]byte{"host.so": same})
	if err := os.Remove(filepath.Join(dirB, "lib/y.so")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(host, filepath.Join(dirB, "lib/y.so")); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dirA, "lib/x.so")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(host, filepath.Join(dirA, "lib/x.so")); err != nil {
		t.Fatal(err)
	}
	s.dedupe.mode = DedupeCommit
	dirC := commitLayer(ctx, t, s, "c", map[string][]byte{"z.so": same})
	if sharesAny(t, host, filepath.Join(dirC, "z.so")) {
		t.Error("dedupe followed a layer's symlink to a file outside it")
	}
	assertContent(t, dirC, map[string][]byte{"z.so": same})
	assertContent(t, filepath.Dir(host), map[string][]byte{"host.so": same})
}

// TestDedupeBackground: in background mode a pass runs after Commit; an
// explicit pass waits for the one running and finds nothing left, and the
// copies share.
func TestDedupeBackground(t *testing.T) {
	root := filepath.Join(loopfs.Mount(t, loopfs.Btrfs), "root")
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithDedupe(DedupeBackground, 0))
	same := randomBytes(5, dedupeFileSize)
	dirA := commitLayer(ctx, t, s, "a", map[string][]byte{"x": same})
	dirB := commitLayer(ctx, t, s, "b", map[string][]byte{"y": same})
	if _, err := s.Dedupe(ctx, false, nil); err != nil {
		t.Fatal(err)
	}
	if !sameExtents(t, filepath.Join(dirA, "x"), filepath.Join(dirB, "y")) {
		t.Error("background dedupe did not share the two copies")
	}
	assertContent(t, dirB, map[string][]byte{"y": same})
}

// TestDedupeUnableIsOff: on ext4 and tmpfs, which cannot share extents, a
// configured dedupe is off with a log line saying why, Commit works as
// without it, and a requested pass is refused with FailedPrecondition.
func TestDedupeUnableIsOff(t *testing.T) {
	for _, kind := range []loopfs.Kind{loopfs.Ext4, loopfs.Tmpfs} {
		t.Run(string(kind), func(t *testing.T) {
			root := filepath.Join(loopfs.Mount(t, kind), "root")
			ctx, logs := captureLog(namespaces.WithNamespace(context.Background(), "test"))
			s, err := New(ctx, root, WithMode(ModeOverlay), WithDedupe(DedupeCommit, 0))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			if s.DedupeMode() != DedupeOff {
				t.Fatalf("dedupe %s on %s", s.DedupeMode(), kind)
			}
			if !strings.Contains(logs.String(), "dedupe is off") || !strings.Contains(logs.String(), "operation not supported") {
				t.Errorf("no log line saying dedupe is off and why:\n%s", logs)
			}
			commitLayer(ctx, t, s, "a", map[string][]byte{"x": randomBytes(6, dedupeFileSize)})
			commitLayer(ctx, t, s, "b", map[string][]byte{"x": randomBytes(6, dedupeFileSize)})
			if _, err := s.Dedupe(ctx, false, nil); !errdefs.IsFailedPrecondition(err) {
				t.Errorf("dedupe pass on %s: %v, want FailedPrecondition", kind, err)
			}
		})
	}
}

// TestDedupeIndexPruned: a layer removed by an overclone that did not know
// the index (its entries left behind) is dropped from the index at the
// next start, and the layer that shared its file counts it again.
func TestDedupeIndexPruned(t *testing.T) {
	root := filepath.Join(loopfs.Mount(t, loopfs.XFS), "root")
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithDedupe(DedupeCommit, 0))
	same := randomBytes(9, dedupeFileSize)
	commitLayer(ctx, t, s, "a", map[string][]byte{"x": same})
	_, full := commitLayerUsage(ctx, t, s, "b", map[string][]byte{"y": same})
	if got := usageOf(ctx, t, s, "b"); got >= full {
		t.Fatalf("usage of b %d after dedupe, %d before", got, full)
	}
	// As the metadata's own Remove, without overclone's hook.
	if err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, _, err := storage.Remove(ctx, "a")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	ctx, s = openTest(t, root, WithMode(ModeOverlay), WithDedupe(DedupeCommit, 0))
	if got := usageOf(ctx, t, s, "b"); got != full {
		t.Errorf("usage of b %d after a's entries were pruned, want %d", got, full)
	}
}

// TestDedupeStaleEntry: an index entry whose file no longer holds the
// content it names (changed behind overclone's back, same size) is never
// trusted: the kernel refuses to share, the file is hashed again, the
// entry is dropped, and the new layer's copy counts its own blocks.
func TestDedupeStaleEntry(t *testing.T) {
	root := filepath.Join(loopfs.Mount(t, loopfs.XFS), "root")
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithDedupe(DedupeCommit, 0))
	same := randomBytes(10, dedupeFileSize)
	dirA := commitLayer(ctx, t, s, "a", map[string][]byte{"x": same})
	other := bytes.Clone(same)
	other[dedupeFileSize/2] ^= 0xff
	if err := os.WriteFile(filepath.Join(dirA, "x"), other, 0o644); err != nil {
		t.Fatal(err)
	}
	dirB, full := commitLayerUsage(ctx, t, s, "b", map[string][]byte{"y": same})
	if sharesAny(t, filepath.Join(dirA, "x"), filepath.Join(dirB, "y")) {
		t.Error("a file shared with one that differs")
	}
	assertContent(t, dirA, map[string][]byte{"x": other})
	assertContent(t, dirB, map[string][]byte{"y": same})
	if got := usageOf(ctx, t, s, "b"); got != full {
		t.Errorf("usage of b %d, want its full %d", got, full)
	}
	var holders []indexEntry
	if err := transact(ctx, s.ms, false, func(ctx context.Context) error {
		ix, err := openIndex(ctx, false)
		if err == nil {
			f, _ := os.Open(filepath.Join(dirB, "y"))
			defer f.Close()
			h, _ := hashContent(f, dedupeFileSize)
			holders, err = ix.holders(h)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if len(holders) != 1 || holders[0].Path != "y" || holders[0].Source != "" {
		t.Errorf("index holds %+v for the content, want only b's copy, as its own source", holders)
	}
}

// TestDedupeByPath: a rebuilt layer's file at the path, and with the size,
// of a copy in an earlier layer is shared with it without being hashed,
// and indexed under the copy's hash, so that a later layer finds it by
// content from another path once the first copy is gone. A file at the
// same path and size with other bytes is no stale entry: it is hashed and
// shares with the copy of its own content, and the earlier layer's file
// keeps its entry for the next layer that holds it. Only sources are
// listed by path: b's shared copy is once a is gone.
func TestDedupeByPath(t *testing.T) {
	root := filepath.Join(loopfs.Mount(t, loopfs.XFS), "root")
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithDedupe(DedupeOff, 0))
	lib, conf, moved := randomBytes(20, dedupeFileSize), randomBytes(21, dedupeFileSize), randomBytes(22, dedupeFileSize)
	filesA := map[string][]byte{"usr/lib/x.so": lib, "etc/conf": conf, "opt/moved": moved}
	filesB := map[string][]byte{"usr/lib/x.so": lib, "etc/conf": moved}
	dirA := commitLayer(ctx, t, s, "a", filesA)
	dirB := commitLayer(ctx, t, s, "b", filesB)
	var results []DedupeResult
	if _, err := s.Dedupe(ctx, false, func(r DedupeResult) { results = append(results, r) }); err != nil {
		t.Fatal(err)
	}
	if len(results) != 2 || results[1].Key != "b" {
		t.Fatalf("dedupe pass: %+v, want a then b", results)
	}
	if b := results[1]; b.pathFiles != 1 || b.SharedFiles != 2 || b.Files != 2 {
		t.Errorf("layer b: %d files shared by path, %d of %d shared; want 1 (usr/lib/x.so), 2 of 2", b.pathFiles, b.SharedFiles, b.Files)
	}
	if !sameExtents(t, filepath.Join(dirA, "usr/lib/x.so"), filepath.Join(dirB, "usr/lib/x.so")) {
		t.Error("a file at the same path with the same bytes does not share its extents")
	}
	if !sameExtents(t, filepath.Join(dirA, "opt/moved"), filepath.Join(dirB, "etc/conf")) {
		t.Error("a file whose path holds other bytes in a does not share with a's copy of its own bytes")
	}
	if sharesAny(t, filepath.Join(dirA, "etc/conf"), filepath.Join(dirB, "etc/conf")) {
		t.Error("files differing at the same path share extents")
	}
	assertContent(t, dirA, filesA)
	assertContent(t, dirB, filesB)
	if got := atPath(ctx, t, s, "usr/lib/x.so"); len(got) != 1 || got[0].ID != s.idOf(ctx, t, "a") {
		t.Errorf("by path, usr/lib/x.so is %+v, want a's copy (b's borrows from it)", got)
	}

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	ctx, s = openTest(t, root, WithMode(ModeOverlay), WithDedupe(DedupeCommit, 0))
	// a's etc/conf kept its entry: c finds it at its path.
	dirC := commitLayer(ctx, t, s, "c", map[string][]byte{"etc/conf": conf})
	if !sameExtents(t, filepath.Join(dirA, "etc/conf"), filepath.Join(dirC, "etc/conf")) {
		t.Error("a's etc/conf, refused at the same path by b, lost its entry")
	}
	// b's x.so, never read, is indexed under lib's hash: with a gone,
	// d finds it by content from another path.
	if err := s.Remove(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if got := atPath(ctx, t, s, "usr/lib/x.so"); len(got) != 1 || got[0].Source != "" || got[0].ID != s.idOf(ctx, t, "b") {
		t.Errorf("by path, usr/lib/x.so is %+v once a is gone, want b's copy as the source", got)
	}
	dirD := commitLayer(ctx, t, s, "d", map[string][]byte{"lib/elsewhere.so": lib})
	if !sameExtents(t, filepath.Join(dirB, "usr/lib/x.so"), filepath.Join(dirD, "lib/elsewhere.so")) {
		t.Error("a file shared by path is not found by its content once the copy it shared with is gone")
	}
	assertContent(t, dirB, filesB)
	assertContent(t, dirD, map[string][]byte{"lib/elsewhere.so": lib})
}

// atPath lists the index's entries at path of dedupeFileSize bytes.
func atPath(ctx context.Context, t *testing.T, s *Snapshotter, path string) []indexEntry {
	t.Helper()
	var out []indexEntry
	if err := transact(ctx, s.ms, false, func(ctx context.Context) error {
		ix, err := openIndex(ctx, false)
		if err == nil {
			out, err = ix.atPath(path, dedupeFileSize)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return out
}
