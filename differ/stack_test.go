package differ

import (
	"errors"
	"fmt"
	"io/fs"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"golang.org/x/sys/unix"
)

// A test stack lives as overclone lays one out: every layer dir under
// root/snapshots/<n>/fs, so that the differ takes the mounts for its own.
type testStack struct {
	root   string
	layers []string // bottom first; the last is the container's upper
	work   string
	opts   []string // overlay options of every mount (index=off, redirect_dir=on, ...)
}

func newTestStack(t testing.TB, base string, opts []string) *testStack {
	t.Helper()
	st := &testStack{root: filepath.Join(base, "root"), opts: opts}
	st.work = filepath.Join(st.root, "work")
	if err := os.MkdirAll(st.work, 0o700); err != nil {
		t.Fatal(err)
	}
	return st
}

// addLayer makes the next layer dir and returns it.
func (st *testStack) addLayer(t testing.TB) string {
	t.Helper()
	d := filepath.Join(st.root, "snapshots", fmt.Sprint(len(st.layers)+1), "fs")
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	st.layers = append(st.layers, d)
	return d
}

// lowersOf lists layers[:n] top first, as lowerdir= wants them.
func (st *testStack) lowersOf(n int) []string {
	var out []string
	for i := n - 1; i >= 0; i-- {
		out = append(out, st.layers[i])
	}
	return out
}

// activeMounts are the mounts of the top layer as an active snapshot on
// the others, what overclone's Mounts hands out.
func (st *testStack) activeMounts() []mount.Mount {
	n := len(st.layers)
	o := append(append([]string(nil), st.opts...),
		"workdir="+st.work, "upperdir="+st.layers[n-1], "lowerdir="+strings.Join(st.lowersOf(n-1), ":"))
	return []mount.Mount{{Type: "overlay", Source: "overlay", Options: o}}
}

// committedView are the mounts of a view of the top layer once committed.
func (st *testStack) committedView() []mount.Mount {
	o := append(append([]string(nil), st.opts...), "lowerdir="+strings.Join(st.lowersOf(len(st.layers)), ":"))
	return []mount.Mount{{Type: "overlay", Source: "overlay", Options: o}}
}

// parentView are the mounts of a view of the top layer's parent.
func (st *testStack) parentView() []mount.Mount {
	n := len(st.layers) - 1
	if n == 1 {
		return []mount.Mount{{Type: "bind", Source: st.layers[0], Options: []string{"ro", "rbind"}}}
	}
	o := append(append([]string(nil), st.opts...), "lowerdir="+strings.Join(st.lowersOf(n), ":"))
	return []mount.Mount{{Type: "overlay", Source: "overlay", Options: o}}
}

// mountTop mounts the top layer over the others, runs fn on the merged
// dir and unmounts it, as a container writes its upper through the kernel.
func (st *testStack) mountTop(t testing.TB, fn func(merged string)) {
	t.Helper()
	merged, err := os.MkdirTemp(st.root, "merged")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(st.work); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(st.work, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := mount.All(st.activeMounts(), merged); err != nil {
		t.Fatalf("mount %v: %v", st.activeMounts(), err)
	}
	defer func() {
		if err := mount.UnmountAll(merged, 0); err != nil {
			t.Fatal(err)
		}
		os.Remove(merged)
	}()
	fn(merged)
}

// genBase fills the bottom layer: dirs, files of several sizes (some with
// whole-second times, so that the walking differ compares their bytes),
// symlinks, hard links, fifos, owners, modes and file capabilities.
func genBase(t testing.TB, rng *rand.Rand, dir string, n int) {
	t.Helper()
	dirs := []string{dir}
	var files []string
	for i := 0; i < n; i++ {
		parent := dirs[rng.Intn(len(dirs))]
		p := filepath.Join(parent, fmt.Sprintf("n%d", i))
		switch r := rng.Intn(20); {
		case r < 5:
			must(t, os.Mkdir(p, 0o755))
			dirs = append(dirs, p)
		case r < 15:
			writeRandom(t, rng, p)
			files = append(files, p)
		case r < 17:
			must(t, os.Symlink([]string{"n1", "../n2", "/etc/passwd", "x/y"}[rng.Intn(4)], p))
		case r < 19 && len(files) > 0:
			must(t, os.Link(files[rng.Intn(len(files))], p))
		default:
			must(t, unix.Mkfifo(p, 0o640))
		}
		randomMeta(t, rng, p)
	}
}

func writeRandom(t testing.TB, rng *rand.Rand, p string) {
	t.Helper()
	data := make([]byte, []int{0, 1, 100, 5000, 70000}[rng.Intn(5)])
	rng.Read(data)
	must(t, os.WriteFile(p, data, 0o644))
}

// randomMeta gives p an owner and mode, sometimes a capability and
// sometimes a whole-second mtime.
func randomMeta(t testing.TB, rng *rand.Rand, p string) {
	t.Helper()
	fi, err := os.Lstat(p)
	must(t, err)
	must(t, os.Lchown(p, []int{0, 1000, 65534}[rng.Intn(3)], []int{0, 100, 1000}[rng.Intn(3)]))
	if fi.Mode()&fs.ModeSymlink != 0 {
		return
	}
	if fi.IsDir() {
		must(t, unix.Chmod(p, []uint32{0o755, 0o700, 0o1777, 0o2775}[rng.Intn(4)]))
	} else {
		must(t, unix.Chmod(p, []uint32{0o644, 0o755, 0o600, 0o4755}[rng.Intn(4)]))
		if fi.Mode().IsRegular() && rng.Intn(6) == 0 {
			must(t, unix.Lsetxattr(p, capabilityXattr, capV2, 0))
		}
	}
	if rng.Intn(3) == 0 {
		tm := time.Unix(1_600_000_000+int64(rng.Intn(1000)), 0)
		must(t, unix.Lutimes(p, []unix.Timeval{unix.NsecToTimeval(tm.UnixNano()), unix.NsecToTimeval(tm.UnixNano())}))
	}
}

// capV2 is a valid security.capability (v2, effective, cap_net_bind_service).
var capV2 = []byte{0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}

// mutate does what a container does to its root, through the mount, so
// that the kernel writes the upper: new, appended, rewritten, touched,
// chmod'ed and chown'ed files (metacopy copy-ups where the mount has it),
// deletions of files and trees, renames of files and of lower directories
// (redirects), a tree removed and made again (opaque), hard links,
// symlinks, fifos, capabilities, a file replaced by a dir and back.
func mutate(t testing.TB, rng *rand.Rand, merged string, ops int) {
	t.Helper()
	for i := 0; i < ops; i++ {
		all := listTree(t, merged)
		var dirs, files []string
		dirs = append(dirs, merged)
		for _, p := range all {
			fi, err := os.Lstat(p)
			must(t, err)
			switch {
			case fi.IsDir():
				dirs = append(dirs, p)
			case fi.Mode().IsRegular():
				files = append(files, p)
			}
		}
		pick := func(l []string) string { return l[rng.Intn(len(l))] }
		newName := func() string { return filepath.Join(pick(dirs), fmt.Sprintf("m%d", rng.Intn(1e9))) }
		switch r := rng.Intn(17); {
		case r == 0:
			p := newName()
			writeRandom(t, rng, p)
			randomMeta(t, rng, p)
		case r == 1 && len(files) > 0:
			f, err := os.OpenFile(pick(files), os.O_WRONLY|os.O_APPEND, 0)
			must(t, err)
			f.WriteString("appended")
			f.Close()
		case r == 2 && len(files) > 0:
			p := pick(files)
			writeRandom(t, rng, p)
		case r == 3 && len(all) > 0:
			p := pick(all)
			if fi, _ := os.Lstat(p); fi.Mode()&fs.ModeSymlink == 0 {
				must(t, unix.Chmod(p, []uint32{0o700, 0o751, 0o640}[rng.Intn(3)]))
			}
		case r == 4 && len(all) > 0:
			// chown to the owner it has: a copy-up that changes nothing
			// the walking differ compares, but the bytes of a file
			// with a whole-second time.
			p := pick(all)
			fi, _ := os.Lstat(p)
			s := fi.Sys().(*syscall.Stat_t)
			uid, gid := int(s.Uid), int(s.Gid)
			if rng.Intn(2) == 0 {
				uid = 4242
			}
			must(t, os.Lchown(p, uid, gid))
		case r == 5 && len(files) > 0:
			must(t, os.Remove(pick(files)))
		case r == 6 && len(dirs) > 1:
			must(t, os.RemoveAll(pick(dirs[1:])))
		case r == 7 && len(files) > 0:
			must(t, os.Rename(pick(files), newName()))
		case r == 8 && len(dirs) > 1:
			src, dst := pick(dirs[1:]), newName()
			if strings.HasPrefix(dst, src+"/") {
				continue
			}
			// Without redirect_dir (userxattr) the kernel refuses to
			// rename a lower dir, as mv would then copy.
			if err := os.Rename(src, dst); !errors.Is(err, syscall.EXDEV) {
				must(t, err)
			}
		case r == 9:
			p := newName()
			must(t, os.Mkdir(p, 0o755))
			writeRandom(t, rng, filepath.Join(p, "inner"))
		case r == 10 && len(dirs) > 1:
			p := pick(dirs[1:])
			must(t, os.RemoveAll(p))
			must(t, os.Mkdir(p, 0o750))
			writeRandom(t, rng, filepath.Join(p, "again"))
		case r == 11 && len(files) > 0:
			must(t, os.Link(pick(files), newName()))
		case r == 12:
			must(t, os.Symlink("../target", newName()))
		case r == 13:
			must(t, unix.Mkfifo(newName(), 0o600))
		case r == 14 && len(files) > 0:
			must(t, unix.Lsetxattr(pick(files), capabilityXattr, capV2, 0))
		case r == 15 && len(files) > 0:
			tm := time.Unix(1_700_000_000+int64(rng.Intn(1000)), int64(rng.Intn(2))*500_000_000)
			must(t, os.Chtimes(pick(files), tm, tm))
		case r == 16 && len(files) > 0:
			p := pick(files)
			must(t, os.Remove(p))
			must(t, os.Mkdir(p, 0o711))
		}
	}
}

// listTree lists every path under root, sorted.
func listTree(t testing.TB, root string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != root {
			out = append(out, p)
		}
		return nil
	})
	must(t, err)
	sort.Strings(out)
	return out
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
