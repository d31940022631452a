package snapshotter

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/overlayutil"
	"github.com/overclone/overclone/test/loopfs"
	"github.com/overclone/overclone/test/remap"
	"github.com/overclone/overclone/test/require"
)

// remapPaths are the files of remap.Layers, and what a container mapped at
// remap.HostRoot must see them owned by (as host root sees them through
// its mounts: the host ids its own ids stand for).
var remapPaths = map[string]string{
	".":   remap.Mapped(0, 0),
	"f":   remap.Mapped(0, 0),
	"d":   remap.Mapped(1000, 1000),
	"d/g": remap.Mapped(1000, 1000),
	"s":   remap.Mapped(0, 0),
}

func pathsOf(m map[string]string) []string {
	var out []string
	for p := range m {
		out = append(out, p)
	}
	return out
}

// TestRemapIDs: a container prepared with containerd's uid/gid mapping
// labels, mounted by containerd's mount code, shows every file owned by the
// mapped ids, its upper's root is the mapped root's, and a file the
// container's root writes lands in the upper as the mapped host ids, in
// overlay mode (idmapped lowers) and in userspace mode (a copy with the
// owners shifted); views of one layer and of two are mapped too, and a
// commit keeps the ids written. The same holds where the kernel has no
// idmapped layers (the probe's answer overridden): then the snapshots
// stand on shifted copies and their mounts carry no uidmap= or gidmap=.
func TestRemapIDs(t *testing.T) {
	require.Root(t, "mounts and chowns")
	base := loopfs.Mount(t, loopfs.XFS)
	f := remap.RequireIdmapped(t, filepath.Join(base, "probe"))
	for _, tc := range []struct {
		mode     Mode
		idmapped bool
	}{{ModeOverlay, true}, {ModeUserspace, true}, {ModeOverlay, false}, {ModeUserspace, false}} {
		name := string(tc.mode)
		if !tc.idmapped {
			name += "-no-idmap"
		}
		t.Run(name, func(t *testing.T) {
			mode := tc.mode
			opts := []Opt{WithMode(mode)}
			if !tc.idmapped {
				opts = append(opts, WithFeatures(withoutIDMap(f)))
			}
			ctx, s := openTest(t, filepath.Join(base, name), opts...)
			remap.Layers(ctx, t, s, "")

			ms, err := s.Prepare(ctx, "c", "l2", snapshots.WithLabels(remap.Labels()))
			if err != nil {
				t.Fatal(err)
			}
			want := map[string]string{"h": remap.Mapped(0, 0), "new": remap.Mapped(0, 0)}
			for p, o := range remapPaths {
				want[p] = o
			}
			if !tc.idmapped {
				checkNoIDMapOptions(t, ms)
			}
			seen, upper := remap.Container(t, ms, "new", "f", "d", "d/g", "s", "h", ".")
			checkOwners(t, "container", seen, want)
			if upper != s.upperPath(mustID(ctx, t, s, "c")) {
				t.Errorf("container writes into %s, not its own fs dir", upper)
			}
			for _, p := range []string{".", "new"} {
				if got := remap.Owner(filepath.Join(upper, p)); got != remap.Mapped(0, 0) {
					t.Errorf("upper %s owned by %s, want the mapped root %s", p, got, remap.Mapped(0, 0))
				}
			}
			// The shifted copy, made with the owners mapped as each
			// inode is created, keeps what chown drops.
			shifted := ""
			switch {
			case mode == ModeUserspace:
				shifted = upper
			case !tc.idmapped:
				copies, _ := filepath.Glob(filepath.Join(s.root, remapCopiesDir, "*"))
				if len(copies) != 1 {
					t.Fatalf("shifted copies %v, want one", copies)
				}
				shifted = copies[0]
			}
			if shifted != "" {
				st, err := os.Stat(filepath.Join(shifted, "s"))
				if err != nil || st.Mode()&os.ModeSetuid == 0 {
					t.Errorf("s lost its setuid bit in the shifted copy: %v %v", st.Mode(), err)
				}
				caps := make([]byte, 64)
				n, err := unix.Lgetxattr(filepath.Join(shifted, "s"), "security.capability", caps)
				// Version 3, owned by the mapped root: what the kernel
				// stores when the container's root sets them.
				want := append([]byte{0x01, 0x00, 0x00, 0x03}, remap.CapNetRaw[4:]...)
				want = binary.LittleEndian.AppendUint32(want, remap.HostRoot)
				if err != nil || !bytes.Equal(caps[:n], want) {
					t.Errorf("s's capabilities in the shifted copy are %x (%v), want %x", caps[:max(n, 0)], err, want)
				}
			}

			for _, parent := range []string{"l1", "l2"} {
				vms, err := s.View(ctx, "v-"+parent, parent, snapshots.WithLabels(remap.Labels()))
				if err != nil {
					t.Fatal(err)
				}
				if !tc.idmapped {
					checkNoIDMapOptions(t, vms)
				}
				checkOwners(t, "view of "+parent, remap.Owners(t, vms, "f", "d/g"), map[string]string{"f": remap.Mapped(0, 0), "d/g": remap.Mapped(1000, 1000)})
			}

			// Commit stores what the container wrote, ids and all; Stat
			// and Usage answer as for any snapshot.
			if err := s.Commit(ctx, "c-committed", "c"); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Stat(ctx, "c-committed"); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Usage(ctx, "c-committed"); err != nil {
				t.Fatal(err)
			}
			ms, err = s.View(ctx, "after", "c-committed")
			if err != nil {
				t.Fatal(err)
			}
			checkOwners(t, "view of the committed container", remap.Owners(t, ms, "new"), map[string]string{"new": remap.Mapped(0, 0)})
		})
	}
}

// TestRemapIDsLikeBuiltin runs the container of TestRemapIDs on
// containerd's built-in overlayfs snapshotter (as its plugin opens it) and
// on overclone side by side: both show the same owners through the mount
// and in the upper.
func TestRemapIDsLikeBuiltin(t *testing.T) {
	require.Root(t, "mounts and chowns")
	base := loopfs.Mount(t, loopfs.XFS)
	remap.RequireIdmapped(t, filepath.Join(base, "probe"))
	ctx, ours := openTest(t, filepath.Join(base, "ours"), WithMode(ModeOverlay))
	// As containerd's plugin opens it where the kernel has idmapped
	// layers (test/builtin.Overlay, which imports this package).
	theirs, err := overlay.NewSnapshotter(filepath.Join(base, "builtin"), overlay.AsynchronousRemove, overlay.WithRemapIDs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { theirs.Close() })
	seen := map[string]map[string]string{}
	for name, sn := range map[string]snapshots.Snapshotter{"overclone": ours, "built-in": theirs} {
		remap.Layers(ctx, t, sn, "")
		ms, err := sn.Prepare(ctx, "c", "l2", snapshots.WithLabels(remap.Labels()))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		got, upper := remap.Container(t, ms, "new", pathsOf(remapPaths)...)
		got["upper/."], got["upper/new"] = remap.Owner(upper), remap.Owner(filepath.Join(upper, "new"))
		seen[name] = got
	}
	checkOwners(t, "overclone against the built-in", seen["overclone"], seen["built-in"])
	if seen["built-in"]["f"] != remap.Mapped(0, 0) {
		t.Errorf("the built-in shows f as %s: the comparison proves nothing", seen["built-in"]["f"])
	}
}

// TestRemapIDsRefused: labels containerd's code would fail on are
// InvalidArgument and leave no snapshot behind; several ranges, as
// containerd 2.1+ writes them, are taken, and a container with no parent
// needs no idmapped mount.
func TestRemapIDsRefused(t *testing.T) {
	require.Root(t, "mounts")
	root := t.TempDir()
	real, err := overlayutil.Probe(context.Background(), root)
	if err != nil {
		t.Fatal(err)
	}
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithFeatures(withoutIDMap(real)))
	remap.Layers(ctx, t, s, "")

	const uidL, gidL = snapshots.LabelSnapshotUIDMapping, snapshots.LabelSnapshotGIDMapping
	for name, labels := range map[string]map[string]string{
		"uid only":        {uidL: "0:100000:65536"},
		"not a range":     {uidL: "0:100000", gidL: "0:100000:65536"},
		"empty range":     {uidL: "0:100000:0", gidL: "0:100000:65536"},
		"past the end":    {uidL: "0:4294967000:65536", gidL: "0:100000:65536"},
		"root not mapped": {uidL: "1:100000:65536", gidL: "0:100000:65536"},
	} {
		if _, err := s.Prepare(ctx, "bad", "l2", snapshots.WithLabels(labels)); !errdefs.IsInvalidArgument(err) {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
		}
	}
	if _, err := s.Stat(ctx, "bad"); !errdefs.IsNotFound(err) {
		t.Errorf("a refused Prepare left a snapshot: %v", err)
	}
	// Several ranges, as containerd 2.1+ writes them.
	multi := map[string]string{uidL: "0:100000:1000,1000:200000:64536", gidL: "0:100000:65536"}
	ms, err := s.Prepare(ctx, "alone", "", snapshots.WithLabels(multi))
	if err != nil {
		t.Fatal(err)
	}
	seen, upper := remap.Container(t, ms, "new")
	checkOwners(t, "parentless container", seen, map[string]string{"new": remap.Mapped(0, 0)})
	if got := remap.Owner(upper); got != remap.Mapped(0, 0) {
		t.Errorf("parentless container's root owned by %s, want %s", got, remap.Mapped(0, 0))
	}
}

func checkOwners(t *testing.T, what string, got, want map[string]string) {
	t.Helper()
	for p, w := range want {
		if got[p] != w {
			t.Errorf("%s: %s owned by %s, want %s", what, p, got[p], w)
		}
	}
}

func mustID(ctx context.Context, t *testing.T, s *Snapshotter, key string) string {
	t.Helper()
	var id string
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		id, _, _, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// TestRemapIDsDeepStack: a stack too long for its layers' own paths is
// named by its short links, relative symlinks into snapshots/; the mapped
// mount gets the empty dir as its bottom layer, so that the common
// directory containerd idmaps is the root, from where the links resolve.
func TestRemapIDsDeepStack(t *testing.T) {
	require.Root(t, "mounts")
	const depth = 150
	root := t.TempDir()
	remap.RequireIdmapped(t, root)
	ctx, s := openTest(t, root, WithMode(ModeOverlay))
	// Short links are taken where the compacted plain paths pass a page,
	// near 450 layers; a quarter page brings that to fewer than 150.
	s.overlay.PageSize = 1024
	top := buildChain(ctx, t, s, "deep", depth)
	ms, err := s.Prepare(ctx, "c", top, snapshots.WithLabels(remap.Labels()))
	if err != nil {
		t.Fatal(err)
	}
	var lowers string
	for _, o := range ms[0].Options {
		if v, ok := strings.CutPrefix(o, "lowerdir="); ok {
			lowers = v
		}
	}
	if !strings.Contains(lowers, filepath.Join(root, linksDir)+"/") || false {
		t.Fatalf("lowerdir of a %d-layer mapped stack is not short links over the empty dir: %.200s...", depth, lowers)
	}
	seen, _ := remap.Container(t, ms, "new", "top", "layer-0")
	checkOwners(t, "deep container", seen, map[string]string{"top": remap.Mapped(0, 0), "layer-0": remap.Mapped(0, 0), "new": remap.Mapped(0, 0)})
}

// TestRemapIDsClientCopy: where containerd's config does not list
// remap-ids, containerd's client chowns a copy of the image itself, names
// it by a digest of its parent and the mapping, and prepares the container
// on it with the mapping labels all the same. The copy must not be mapped
// a second time.
//
// containerd 1.7's client names its copy "<parent>-<host uid>-<host gid>"
// instead, and its CRI runs user-namespaced pods with the labels too.
func TestRemapIDsClientCopy(t *testing.T) {
	require.Root(t, "mounts and chowns")
	// What client.resolveSnapshotOptions does, with the 2.x name's JSON
	// written out as containerd marshals it.
	rsn := `{"Parent":"l2","IDMap":{"UidMap":[{"containerID":0,"hostID":100000,"size":65536}],"GidMap":[{"containerID":0,"hostID":100000,"size":65536}]}}`
	names := map[string]string{
		"2.x": fmt.Sprintf("sha256:%x", sha256.Sum256([]byte(rsn))),
		"1.7": fmt.Sprintf("l2-%d-%d", remap.HostRoot, remap.HostRoot),
	}
	for _, tc := range []struct {
		mode       Mode
		containerd string
	}{{ModeOverlay, "2.x"}, {ModeUserspace, "2.x"}, {ModeOverlay, "1.7"}, {ModeUserspace, "1.7"}} {
		t.Run(string(tc.mode)+"-"+tc.containerd, func(t *testing.T) {
			ctx, s := openTest(t, t.TempDir(), WithMode(tc.mode))
			remap.Layers(ctx, t, s, "")
			name := names[tc.containerd]
			ms, err := s.Prepare(ctx, name+"-remap", "l2")
			if err != nil {
				t.Fatal(err)
			}
			err = mount.WithTempMount(ctx, ms, func(root string) error {
				return filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
					if err != nil {
						return err
					}
					st := fi.Sys().(*syscall.Stat_t)
					return os.Lchown(p, remap.HostRoot+int(st.Uid), remap.HostRoot+int(st.Gid))
				})
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Commit(ctx, name, name+"-remap"); err != nil {
				t.Fatal(err)
			}
			ms, err = s.Prepare(ctx, "c", name, snapshots.WithLabels(remap.Labels()))
			if err != nil {
				t.Fatal(err)
			}
			seen, upper := remap.Container(t, ms, "new", "f", "d/g", ".")
			checkOwners(t, "container on the client's copy", seen, map[string]string{
				".": remap.Mapped(0, 0), "f": remap.Mapped(0, 0), "d/g": remap.Mapped(1000, 1000), "new": remap.Mapped(0, 0),
			})
			if got := remap.Owner(filepath.Join(upper, "new")); got != remap.Mapped(0, 0) {
				t.Errorf("new in the upper owned by %s, want %s", got, remap.Mapped(0, 0))
			}
		})
	}
}

// withoutIDMap is f with the idmapped-mounts probe failed, as on a kernel
// without idmapped overlay layers.
func withoutIDMap(f *overlayutil.Features) *overlayutil.Features {
	out := *f
	out.Checks = nil
	for _, c := range f.Checks {
		if c.Name == overlayutil.CheckIDMapped {
			c.OK, c.Reason = false, "test: pretend the kernel has none"
		}
		out.Checks = append(out.Checks, c)
	}
	return &out
}

// checkNoIDMapOptions fails if ms asks containerd for an idmapped mount.
func checkNoIDMapOptions(t *testing.T, ms []mount.Mount) {
	t.Helper()
	for _, m := range ms {
		for _, o := range m.Options {
			if strings.HasPrefix(o, "uidmap=") || strings.HasPrefix(o, "gidmap=") {
				t.Errorf("mount %s %s asks for an idmapped mount where the kernel has none: %v", m.Type, m.Source, m.Options)
			}
		}
	}
}

// TestRemapIDsRecreated: a mapped container whose directory a power cut
// took is made again at start with its mapped owners: the upper's root in
// overlay mode, the whole shifted copy in userspace mode.
func TestRemapIDsRecreated(t *testing.T) {
	require.Root(t, "mounts and chowns")
	for _, mode := range []Mode{ModeOverlay, ModeUserspace} {
		t.Run(string(mode), func(t *testing.T) {
			root := t.TempDir()
			ctx, s := openTest(t, root, WithMode(mode))
			remap.Layers(ctx, t, s, "")
			if _, err := s.Prepare(ctx, "c", "l2", snapshots.WithLabels(remap.Labels())); err != nil {
				t.Fatal(err)
			}
			id := mustID(ctx, t, s, "c")
			s.Close()
			if err := os.Rename(filepath.Join(root, "snapshots", id), filepath.Join(root, "snapshots", "new-"+id)); err != nil {
				t.Fatal(err)
			}
			ctx, s = openTest(t, root, WithMode(mode))
			if got := remap.Owner(s.upperPath(id)); got != remap.Mapped(0, 0) {
				t.Errorf("the upper made again is owned by %s, want the mapped root %s", got, remap.Mapped(0, 0))
			}
			if mode == ModeUserspace {
				if got := remap.Owner(filepath.Join(s.upperPath(id), "d", "g")); got != remap.Mapped(1000, 1000) {
					t.Errorf("d/g in the copy made again is owned by %s, want %s", got, remap.Mapped(1000, 1000))
				}
			}
			ms, err := s.Mounts(ctx, "c")
			if err != nil {
				t.Fatal(err)
			}
			seen, _ := remap.Container(t, ms, "new", "f", "d/g")
			checkOwners(t, "container made again", seen, map[string]string{"f": remap.Mapped(0, 0), "d/g": remap.Mapped(1000, 1000), "new": remap.Mapped(0, 0)})
		})
	}
}

// TestRemapCopyShared: where the kernel has no idmapped layers, snapshots
// on one parent with one mapping stand on one shifted copy, built once; a
// mapping of its own gets a copy of its own; a copy goes with the last
// snapshot that stands on it, and a start removes copies no snapshot needs.
func TestRemapCopyShared(t *testing.T) {
	require.Root(t, "mounts and chowns")
	root := t.TempDir()
	real, err := overlayutil.Probe(context.Background(), root)
	if err != nil {
		t.Fatal(err)
	}
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithFeatures(withoutIDMap(real)))
	remap.Layers(ctx, t, s, "")
	other := map[string]string{snapshots.LabelSnapshotUIDMapping: "0:300000:65536", snapshots.LabelSnapshotGIDMapping: "0:300000:65536"}
	copies := func() []string {
		t.Helper()
		entries, err := os.ReadDir(filepath.Join(root, remapCopiesDir))
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		// The trash is emptied in the background: wait for it, so that
		// a copy trashed is a copy gone.
		s.deletions.wait()
		return names
	}
	lower := func(ms []mount.Mount) string {
		for _, o := range ms[0].Options {
			if v, ok := strings.CutPrefix(o, "lowerdir="); ok {
				return v
			}
		}
		return ""
	}
	a1, err := s.Prepare(ctx, "a1", "l2", snapshots.WithLabels(remap.Labels()))
	if err != nil {
		t.Fatal(err)
	}
	a2, err := s.Prepare(ctx, "a2", "l2", snapshots.WithLabels(remap.Labels()))
	if err != nil {
		t.Fatal(err)
	}
	if got := copies(); len(got) != 1 || lower(a1) != lower(a2) {
		t.Fatalf("two containers with one mapping: copies %v, lowers %q and %q, want one shared", got, lower(a1), lower(a2))
	}
	b, err := s.Prepare(ctx, "b", "l2", snapshots.WithLabels(other))
	if err != nil {
		t.Fatal(err)
	}
	if got := copies(); len(got) != 2 || lower(b) == lower(a1) {
		t.Fatalf("a mapping of its own: copies %v, lower %q", got, lower(b))
	}
	checkOwners(t, "container mapped at 300000", remap.Owners(t, b, ".", "f"), map[string]string{".": "300000:300000", "f": "300000:300000"})

	if err := s.Remove(ctx, "a1"); err != nil {
		t.Fatal(err)
	}
	if got := copies(); len(got) != 2 {
		t.Fatalf("a copy went while a2 still stands on it: %v", got)
	}
	checkOwners(t, "a2 after a1 went", remap.Owners(t, a2, "f"), map[string]string{"f": remap.Mapped(0, 0)})
	if err := s.Remove(ctx, "a2"); err != nil {
		t.Fatal(err)
	}
	if got := copies(); len(got) != 1 {
		t.Fatalf("the copy of a1 and a2 outlived them: %v", got)
	}
	// A copy left by a crash between a Remove and its release.
	if err := os.Mkdir(filepath.Join(root, remapCopiesDir, "9999-0000000000000000"), 0o700); err != nil {
		t.Fatal(err)
	}
	s.Close()
	ctx, s = openTest(t, root, WithMode(ModeOverlay), WithFeatures(withoutIDMap(real)))
	if got := copies(); len(got) != 1 {
		t.Fatalf("after a start: copies %v, want only b's", got)
	}
	if err := s.Remove(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	if got := copies(); len(got) != 0 {
		t.Fatalf("copies left with no snapshot: %v", got)
	}
}

// TestRemapCopyConcurrently: containers on one parent with one mapping
// prepared at once build their shifted copy once, and each mounts it.
func TestRemapCopyConcurrently(t *testing.T) {
	require.Root(t, "mounts and chowns")
	root := t.TempDir()
	real, err := overlayutil.Probe(context.Background(), root)
	if err != nil {
		t.Fatal(err)
	}
	ctx, s := openTest(t, root, WithMode(ModeOverlay), WithFeatures(withoutIDMap(real)))
	remap.Layers(ctx, t, s, "")
	var builds atomic.Int32
	s.OnCopy(func(reason, _ string, _ int64) {
		if reason == "remap" {
			builds.Add(1)
		}
	})
	const n = 6
	mounts := make([][]mount.Mount, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			mounts[i], errs[i] = s.Prepare(ctx, fmt.Sprintf("c%d", i), "l2", snapshots.WithLabels(remap.Labels()))
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		checkOwners(t, fmt.Sprintf("container %d", i), remap.Owners(t, mounts[i], "f"), map[string]string{"f": remap.Mapped(0, 0)})
	}
	if got := builds.Load(); got != 1 {
		t.Errorf("%d containers on one parent with one mapping built the shifted copy %d times, want once", n, got)
	}
}
