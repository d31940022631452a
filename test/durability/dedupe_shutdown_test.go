package durability

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"sort"
	"testing"
	"unsafe"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/overlayutil"
	"github.com/overclone/overclone/snapshotter"
	"github.com/overclone/overclone/test/loopfs"
	"github.com/overclone/overclone/test/require"
)

// dedupeShutdownMinSize indexes most of writeLayer's small files (1 byte
// to 16 KiB), so that a pass has many FIDEDUPERANGE calls to be in the
// middle of.
const dedupeShutdownMinSize = 4096

// TestDedupeSurvivesShutdown shuts an xfs root down (no log flush, as a
// power cut) while a Commit's dedupe is sharing the layer's files with an
// earlier layer's copies ("midway"), or just after the Commit that deduped
// and recorded it returned ("recorded"), mounts it again and opens the
// snapshotter: every layer holds its bytes; midway, the cut-short layer
// has no dedupe record and a dedupe pass finishes it; recorded, the record
// outlived the shutdown, and so did the remaps it counts (the index never
// claims a share the kernel lost); either way each layer's usage then
// lies between its exclusive extents and all of its extents, as FIEMAP
// reads them.
//
// Midway, the shutdown lands at a known point without a sleep: a fanotify
// permission mark on one file of the first layer holds the dedupe's open
// of it (as the copy the third layer's files share with), which only the
// share phase of the third layer's Commit makes; the test shuts the
// filesystem down while that open waits and the other workers are
// remapping, then lets it go on.
func TestDedupeSurvivesShutdown(t *testing.T) {
	if _, err := exec.LookPath("xfs_io"); err != nil {
		require.Skipf(t, "xfs_io (xfsprogs) not installed: %v", err)
	}
	for _, midway := range []bool{true, false} {
		name := map[bool]string{true: "midway", false: "recorded"}[midway]
		t.Run(name, func(t *testing.T) { dedupeShutdownRun(t, midway) })
	}
}

func dedupeShutdownRun(t *testing.T, midway bool) {
	ctx := namespaces.WithNamespace(context.Background(), "durability")
	// Probed on another xfs: dedupe is on where the probe finds that
	// the filesystem shares extents, and a probe mount left alive on
	// the one shut down would keep it from unmounting.
	features, err := overlayutil.Probe(ctx, loopfs.Mount(t, loopfs.XFS))
	if err != nil {
		t.Fatal(err)
	}
	mnt := loopfs.Mount(t, loopfs.XFS)
	root := filepath.Join(mnt, "root")
	open := func() *snapshotter.Snapshotter {
		s, err := snapshotter.New(ctx, root, snapshotter.WithMode(snapshotter.ModeOverlay), snapshotter.WithSyncOnCommit(true),
			snapshotter.WithDedupe(snapshotter.DedupeCommit, dedupeShutdownMinSize), snapshotter.WithFeatures(features))
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	s := open()
	if s.DedupeMode() != snapshotter.DedupeCommit {
		t.Fatalf("dedupe %s on xfs, want commit", s.DedupeMode())
	}

	// Three layers of the same files (same seed) and one of their own
	// each: the second and third share the first's copies.
	want := map[string]layer{}
	dirs := map[string]string{}
	parent := ""
	for i := 0; i < shutdownLayers; i++ {
		key, name := fmt.Sprintf("layer-%d-active", i), fmt.Sprintf("layer-%d", i)
		m, err := s.Prepare(ctx, key, parent)
		if err != nil {
			t.Fatal(err)
		}
		dir := upperOf(t, m)
		l, err := writeLayer(rand.New(rand.NewPCG(1, 2)), dir, shutdownFiles, shutdownBig)
		if err != nil {
			t.Fatal(err)
		}
		own, err := writeLayer(rand.New(rand.NewPCG(3, uint64(i))), filepath.Join(dir, "d00"), 0, 64<<10)
		if err != nil {
			t.Fatal(err)
		}
		l["d00/big"] = own["big"]
		var cut func()
		if i == shutdownLayers-1 && midway {
			cut = shutdownOnOpen(t, mnt, filepath.Join(dirs["layer-0"], heldFile(t, want["layer-0"])))
		}
		if err := s.Commit(ctx, name, key); err != nil {
			t.Fatal(err)
		}
		if cut != nil {
			cut()
		}
		want[name], dirs[name], parent = l, dir, name
	}
	if !midway {
		if err := shutdownFS(mnt); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	remount(t, loopfs.XFS, mnt)

	s = open()
	defer s.Close()
	checkLayers(ctx, t, s, want)
	if before, err := s.Sharing(ctx); err == nil {
		// What of the cut-short layer's remaps the log kept: any
		// amount is right, as long as the bytes are.
		t.Logf("after the remount, before the pass: %+v", before)
	}
	sum, err := s.Dedupe(ctx, false, nil)
	if err != nil {
		t.Fatalf("dedupe pass after the shutdown: %v", err)
	}
	// The first two layers were deduped (and recorded, after their
	// remaps were on disk) before the shutdown; midway, the third was
	// not.
	if midway && (sum.Layers != 1 || sum.SharedFiles == 0) {
		t.Errorf("dedupe pass after the shutdown: %+v, want the one layer cut short, sharing files", sum)
	}
	if !midway && sum.Layers != 0 {
		t.Errorf("dedupe pass after the shutdown: %+v, want nothing: every layer was recorded", sum)
	}
	checkLayers(ctx, t, s, want)
	if sum, err := s.Dedupe(ctx, false, nil); err != nil || sum.Layers != 0 {
		t.Errorf("second dedupe pass: %+v, %v; want nothing left to do", sum, err)
	}
	sharing, err := s.Sharing(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, sh := range sharing {
		if sh.Kind != snapshots.KindCommitted.String() {
			continue
		}
		u, err := s.Usage(ctx, sh.Key)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: usage %d, exclusive %d, shared %d", sh.Key, u.Size, sh.Exclusive, sh.Shared)
		if u.Size < sh.Exclusive || u.Size > sh.Exclusive+sh.Shared {
			t.Errorf("%s: usage %d outside its exclusive %d and all %d bytes of its extents", sh.Key, u.Size, sh.Exclusive, sh.Exclusive+sh.Shared)
		}
		if sh.Shared < shutdownBig {
			t.Errorf("%s shares %d bytes, want at least the %d of its big file", sh.Key, sh.Shared, shutdownBig)
		}
	}
}

// heldFile picks a file of l that dedupe indexes, past the middle of the
// order a pass shares them in (the walk's), so that it is held while the
// files before it are remapped.
func heldFile(t *testing.T, l layer) string {
	var names []string
	for rel, e := range l {
		if e.size >= dedupeShutdownMinSize && rel != "big" && rel != "d00/big" {
			names = append(names, rel)
		}
	}
	sort.Strings(names)
	if len(names) == 0 {
		t.Fatal("no file to hold")
	}
	return names[len(names)*2/3]
}

// shutdownOnOpen shuts the filesystem at mnt down (xfs_io shutdown, no
// log flush) when path is first opened, before the open goes on, and
// returns a function that waits for that and fails the test if the open
// never came.
func shutdownOnOpen(t *testing.T, mnt, path string) func() {
	t.Helper()
	fan, err := unix.FanotifyInit(unix.FAN_CLASS_CONTENT|unix.FAN_CLOEXEC, unix.O_RDONLY|unix.O_LARGEFILE)
	if err != nil {
		require.Skipf(t, "fanotify permission events: %v", err)
	}
	if err := unix.FanotifyMark(fan, unix.FAN_MARK_ADD, unix.FAN_OPEN_PERM, unix.AT_FDCWD, path); err != nil {
		unix.Close(fan)
		t.Fatalf("fanotify mark %s: %v", path, err)
	}
	done := make(chan error, 1)
	go func() {
		buf := make([]byte, 4096)
		n, err := unix.Read(fan, buf)
		if err != nil || n < int(unsafe.Sizeof(unix.FanotifyEventMetadata{})) {
			done <- fmt.Errorf("read fanotify event: %d bytes, %v", n, err)
			return
		}
		ev := (*unix.FanotifyEventMetadata)(unsafe.Pointer(&buf[0]))
		// Told before the open goes on, so before the Commit returns.
		done <- shutdownFS(mnt)
		resp := unix.FanotifyResponse{Fd: ev.Fd, Response: unix.FAN_ALLOW}
		if _, err := unix.Write(fan, (*[unsafe.Sizeof(resp)]byte)(unsafe.Pointer(&resp))[:]); err != nil {
			t.Errorf("answer fanotify event: %v", err) // the open waits forever
		}
		unix.Close(int(ev.Fd))
	}()
	return func() {
		defer unix.Close(fan)
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		default:
			t.Fatalf("the Commit returned without its dedupe opening %s", path)
		}
	}
}

// checkLayers views every layer and compares it with what was written.
func checkLayers(ctx context.Context, t *testing.T, s *snapshotter.Snapshotter, want map[string]layer) {
	t.Helper()
	for name, l := range want {
		key := name + "-check"
		m, err := s.View(ctx, key, name)
		if err != nil {
			t.Fatalf("view of %s after the shutdown: %v", name, err)
		}
		got, err := readLayer(topOf(t, m))
		if err != nil {
			t.Fatalf("read %s: %v", name, err)
		}
		if b, f, d := diff(l, got); b != 0 {
			t.Errorf("%s lost %d bytes in %d files: %s", name, b, f, d)
		}
		if err := s.Remove(ctx, key); err != nil {
			t.Fatal(err)
		}
	}
}
