package snapshotter

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/overclone/overclone/test/loopfs"
)

// TestDedupeCommitSplit: with dedupe = "commit", dedupe_min_size 1 and
// dedupe_commit_min_size 64 KiB, Commit shares a large file and leaves a
// small one, while an unpack (an "extract-" snapshot) is under way the
// worker leaves it too, and once the unpack is gone the worker shares it,
// lowers the layer's usage by it and records the layer as done for every
// size, across a restart. Both layers read as written throughout.
func TestDedupeCommitSplit(t *testing.T) {
	done := watchIdleDedupe(t)

	root := filepath.Join(loopfs.Mount(t, loopfs.XFS), "root")
	opts := []Opt{WithMode(ModeOverlay), WithSyncOnCommit(true), WithDedupe(DedupeCommit, 1), WithDedupeCommitMinSize(64 << 10)}
	ctx, s := openTest(t, root, opts...)
	if !s.dedupe.split() {
		t.Fatalf("dedupe %s, min %d, commit min %d: want commit split at 64 KiB", s.dedupe.mode, s.dedupe.minSize, s.dedupe.commitMin)
	}
	big := randomBytes(11, dedupeFileSize)
	small := randomBytes(12, 8<<10)
	filesA := map[string][]byte{"lib/big.so": big, "etc/small.conf": small}
	filesB := map[string][]byte{"lib/big.so": big, "etc/small.conf": small}

	// An unpack under way holds the worker off, however long it takes.
	hold := "extract-1 sha256:hold"
	if _, err := s.Prepare(ctx, hold, ""); err != nil {
		t.Fatal(err)
	}
	dirA := commitLayer(ctx, t, s, "a", filesA)
	dirB, fullB := commitLayerUsage(ctx, t, s, "b", filesB)
	if !sameExtents(t, filepath.Join(dirA, "lib/big.so"), filepath.Join(dirB, "lib/big.so")) {
		t.Error("Commit did not share the large file")
	}
	if sharesAny(t, filepath.Join(dirA, "etc/small.conf"), filepath.Join(dirB, "etc/small.conf")) {
		t.Error("the small file was shared while an unpack was under way")
	}
	afterCommit := usageOf(ctx, t, s, "b")
	if afterCommit > fullB-dedupeFileSize {
		t.Errorf("usage of b after Commit %d, want at most %d less the large file's %d", afterCommit, fullB, dedupeFileSize)
	}
	assertContent(t, dirA, filesA)
	assertContent(t, dirB, filesB)

	// The unpack ends: the worker does both layers' small files (a's
	// indexes the first copy, b's shares with it).
	if err := s.Remove(ctx, hold); err != nil {
		t.Fatal(err)
	}
	awaitIdleSmallFiles(t, done, "", "a", "b")
	if !sameExtents8k(t, filepath.Join(dirA, "etc/small.conf"), filepath.Join(dirB, "etc/small.conf")) {
		t.Error("the idle worker did not share the small file")
	}
	if got := usageOf(ctx, t, s, "b"); got != afterCommit-8<<10 {
		t.Errorf("usage of b after the idle pass %d, want %d less the small file's 8 KiB", got, afterCommit)
	}
	assertContent(t, dirA, filesA)
	assertContent(t, dirB, filesB)
	if sum, err := s.Dedupe(ctx, false, nil); err != nil || sum.Layers != 0 {
		t.Errorf("a pass after the worker did %+v, %v: want nothing left", sum, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	ctx, s = openTest(t, root, opts...)
	if sum, err := s.Dedupe(ctx, false, nil); err != nil || sum.Layers != 0 {
		t.Errorf("a pass after a restart did %+v, %v: want nothing left", sum, err)
	}
	assertContent(t, dirB, filesB)
}

// TestDedupeSplitAfterRestart: layers whose Commit left the small files
// (an unpack held the worker off) and a snapshotter closed before the
// worker ran: at the next start the worker finds them by their records and
// shares the small files.
func TestDedupeSplitAfterRestart(t *testing.T) {
	done := watchIdleDedupe(t)

	root := filepath.Join(loopfs.Mount(t, loopfs.XFS), "root")
	opts := []Opt{WithMode(ModeOverlay), WithSyncOnCommit(true), WithDedupe(DedupeCommit, 1), WithDedupeCommitMinSize(64 << 10)}
	ctx, s := openTest(t, root, opts...)
	small := randomBytes(13, 12<<10)
	files := map[string][]byte{"etc/small.conf": small}
	if _, err := s.Prepare(ctx, "extract-2 sha256:hold", ""); err != nil {
		t.Fatal(err)
	}
	dirA := commitLayer(ctx, t, s, "a", files)
	dirB := commitLayer(ctx, t, s, "b", files)
	if sharesAny(t, filepath.Join(dirA, "etc/small.conf"), filepath.Join(dirB, "etc/small.conf")) {
		t.Fatal("the small file was shared while an unpack was under way")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-done:
		t.Fatalf("the idle worker did %+v while an unpack was under way", r)
	default:
	}

	openTest(t, root, opts...)
	awaitIdleSmallFiles(t, done, " after a restart", "a", "b")
	if !sameExtents8k(t, filepath.Join(dirA, "etc/small.conf"), filepath.Join(dirB, "etc/small.conf")) {
		t.Error("the idle worker did not share the small file after a restart")
	}
	assertContent(t, dirA, files)
	assertContent(t, dirB, files)
}

// sameExtents8k is sameExtents for a file of two blocks.
func sameExtents8k(t *testing.T, a, b string) bool {
	t.Helper()
	ea, eb := fiemapOf(t, a), fiemapOf(t, b)
	return len(ea) > 0 && len(ea) == len(eb) && ea[0].Physical == eb[0].Physical && ea[len(ea)-1].Physical == eb[len(eb)-1].Physical
}

// TestIdleGate: the worker waits while an unpack's snapshot is prepared
// and for dedupeIdleDelay after the last Commit; other keys do not hold
// it.
func TestIdleGate(t *testing.T) {
	var g idleGate
	now := time.Now()
	if d := g.quietFor(now); d != 0 {
		t.Errorf("a fresh gate waits %v", d)
	}
	g.prepare("ctr-rootfs") // a container's snapshot is no unpack
	if d := g.quietFor(now); d != 0 {
		t.Errorf("a container's Prepare holds the gate for %v", d)
	}
	g.prepare("extract-123 sha256:abc")
	if d := g.quietFor(time.Now().Add(time.Hour)); d != dedupeIdleDelay {
		t.Errorf("an unpack under way an hour later: wait %v, want %v", d, dedupeIdleDelay)
	}
	g.done("extract-123 sha256:abc", true)
	at := time.Now()
	if d := g.quietFor(at); d <= 0 || d > dedupeIdleDelay {
		t.Errorf("just after a Commit: wait %v, want up to %v", d, dedupeIdleDelay)
	}
	if d := g.quietFor(at.Add(dedupeIdleDelay)); d != 0 {
		t.Errorf("%v after the last Commit: wait %v", dedupeIdleDelay, d)
	}
	// Through containerd, the unpacker's key comes behind the metadata
	// store's namespace and sequence number.
	g.prepare("default/42/extract-456 sha256:def")
	if d := g.quietFor(time.Now().Add(time.Hour)); d != dedupeIdleDelay {
		t.Errorf("an unpack through containerd an hour later: wait %v, want %v", d, dedupeIdleDelay)
	}
	g.done("default/42/extract-456 sha256:def", false)
	g.prepare("default/43/ctr-rootfs")
	if d := g.quietFor(time.Now().Add(time.Hour)); d != 0 {
		t.Errorf("a container's Prepare through containerd holds the gate for %v", d)
	}
}
