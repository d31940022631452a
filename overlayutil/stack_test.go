package overlayutil

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"golang.org/x/sys/unix"
)

// layerStack is a root laid out the way the snapshotter will lay it out:
// ROOT/snapshots/<id>/fs per layer, and ROOT/l/<link> -> ../snapshots/<id>/fs
// so that the lowerdir option names each layer in a few bytes. Layer id i
// holds a file layer-<i> and a file shared containing i.
type layerStack struct {
	root  string
	links []string // links[i-1] is layer i's link path
	fs    []string // fs[i-1] is layer i's fs dir, as the built-in names it
}

// makeLayerStack builds layers 1..n under root, linked with name(i).
func makeLayerStack(t *testing.T, root string, n int, name func(int) string) *layerStack {
	t.Helper()
	s := &layerStack{root: root}
	if err := os.MkdirAll(filepath.Join(root, "l"), 0o755); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= n; i++ {
		id := strconv.Itoa(i)
		fs := filepath.Join(root, "snapshots", id, "fs")
		if err := os.MkdirAll(fs, 0o755); err != nil {
			t.Fatal(err)
		}
		for f, data := range map[string]string{"layer-" + id: id, "shared": id} {
			if err := os.WriteFile(filepath.Join(fs, f), []byte(data), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		link := filepath.Join(root, "l", name(i))
		if err := os.Symlink(filepath.Join("..", "snapshots", id, "fs"), link); err != nil {
			t.Fatal(err)
		}
		s.links = append(s.links, link)
		s.fs = append(s.fs, fs)
	}
	return s
}

// top returns the top n of paths (layer n first), as lowerdir wants them.
func top(paths []string, n int) []string {
	out := make([]string, n)
	for i := range n {
		out[i] = paths[n-1-i]
	}
	return out
}

// active makes a fresh upper and work dir called name.
func (s *layerStack) active(t *testing.T, name string) (upper, work string) {
	t.Helper()
	dir := filepath.Join(s.root, "snapshots", "active-"+name)
	upper, work = filepath.Join(dir, "fs"), filepath.Join(dir, "work")
	for _, d := range []string{upper, work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return upper, work
}

// mountAndVerify mounts ms with containerd's core/mount, checks the merged
// view of a stack of n (every layer's file, the top's shared, a write), and
// returns the lowerdir the kernel reports for the mount.
func mountAndVerify(t *testing.T, ms []mount.Mount, n int) (string, error) {
	t.Helper()
	target := t.TempDir()
	if err := mount.All(ms, target); err != nil {
		return "", err
	}
	defer func() {
		if err := mount.UnmountAll(target, 0); err != nil {
			t.Errorf("unmount %s: %v", target, err)
		}
	}()
	ents, err := os.ReadDir(target)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != n+1 {
		t.Errorf("merged view of %d layers has %d entries, want %d", n, len(ents), n+1)
	}
	for _, f := range []string{"layer-1", "layer-" + strconv.Itoa(n)} {
		if _, err := os.Stat(filepath.Join(target, f)); err != nil {
			t.Errorf("merged view: %v", err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(target, "shared")); err != nil || string(b) != strconv.Itoa(n) {
		t.Errorf("merged shared = %q, %v; want the top layer's %d", b, err, n)
	}
	if err := os.WriteFile(filepath.Join(target, "new"), []byte("x"), 0o644); err != nil {
		t.Errorf("write to the merged view: %v", err)
	}
	return kernelLowerdir(t, target), nil
}

// kernelLowerdir reads the lowerdir= super option of the mount on target
// from mountinfo: since 6.5 overlay shows each lower as it was given, so
// this is the string containerd's core/mount really passed.
func kernelLowerdir(t *testing.T, target string) string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 || unescapeMountinfo(f[4]) != target {
			continue
		}
		for _, o := range strings.Split(f[len(f)-1], ",") {
			if v, ok := strings.CutPrefix(o, "lowerdir="); ok {
				return unescapeMountinfo(v)
			}
		}
	}
	t.Fatalf("no lowerdir for %s in mountinfo", target)
	return ""
}

// TestDeepStacks mounts stacks of 50, 128, 256 and 500 layers with
// containerd's core/mount, in overclone's shape (short links, as built by
// OverlayMount) and in the built-in overlayfs snapshotter's shape
// (ROOT/snapshots/<id>/fs), and logs the option lengths and where each
// shape fails. At 501 OverlayMount refuses before the kernel does.
func TestDeepStacks(t *testing.T) {
	root := t.TempDir()
	st := makeLayerStack(t, root, DefaultMaxLowers+1, func(i int) string { return strconv.FormatInt(int64(i), 36) })
	opts := Options{IndexOff: true}
	page := os.Getpagesize()
	t.Logf("%6s  %-30s  %-30s", "layers", "overclone (l/<base36>)", "built-in shape (snapshots/<id>/fs)")
	for _, n := range []int{50, 128, 256, 500, 501} {
		upper, work := st.active(t, fmt.Sprintf("ours-%d", n))
		lowers := top(st.links, n)

		var ours string
		m, err := OverlayMount(lowers, upper, work, opts)
		switch {
		case n > DefaultMaxLowers:
			var fe *FitError
			if !errors.As(err, &fe) || !errors.Is(err, ErrStackTooDeep) || fe.Fits != DefaultMaxLowers {
				t.Fatalf("%d layers: err = %v, want ErrStackTooDeep fitting %d", n, err, DefaultMaxLowers)
			}
			ours = fmt.Sprintf("ErrStackTooDeep, %d fit", fe.Fits)
		case err != nil:
			t.Fatalf("%d layers: %v", n, err)
		default:
			chdir, data := MountData(m, page)
			got, err := mountAndVerify(t, []mount.Mount{m}, n)
			if err != nil {
				t.Fatalf("%d layers: mount.All of OverlayMount's mount: %v", n, err)
			}
			want := strings.TrimPrefix(data[strings.LastIndex(data, "lowerdir="):], "lowerdir=")
			if got != want {
				t.Errorf("%d layers: kernel got lowerdir %.80q..., the model says %.80q... (chdir %q)", n, got, want, chdir)
			}
			ours = fmt.Sprintf("ok, %d bytes", len(data))
		}

		// The built-in's mount, one option list, absolute lowers; mounted
		// regardless of depth to see where containerd's own shape breaks.
		upper, work = st.active(t, fmt.Sprintf("builtin-%d", n))
		builtin := mount.Mount{Type: "overlay", Source: "overlay", Options: overlayOptions(top(st.fs, n), upper, work, opts)}
		_, bdata := MountData(builtin, page)
		theirs := fmt.Sprintf("ok, %d bytes", len(bdata))
		if _, err := mountAndVerify(t, []mount.Mount{builtin}, n); err != nil {
			theirs = fmt.Sprintf("fails, %d bytes: %s", len(bdata), lastWords(err))
			if n <= DefaultMaxLowers {
				t.Errorf("built-in shape of %d layers failed: %v", n, err)
			}
		} else if n > DefaultMaxLowers {
			t.Errorf("the kernel mounted %d lowers", n)
		}
		t.Logf("%6d  %-30s  %s", n, ours, theirs)
	}
}

// TestOptionsTooLong uses link names too long for a page at 500 layers:
// OverlayMount must refuse with the depth that fits, that depth must mount
// through containerd's core/mount, and one more must not.
func TestOptionsTooLong(t *testing.T) {
	// A root path of fixed length makes every option length below the
	// same on each run (t.TempDir's names vary in length).
	const rootLen = 96
	root := t.TempDir()
	if len(root) >= rootLen {
		t.Fatalf("temp dir %s longer than %d", root, rootLen)
	}
	root = filepath.Join(root, strings.Repeat("r", rootLen-len(root)-1))
	const n = 400
	st := makeLayerStack(t, root, n, func(i int) string { return fmt.Sprintf("layer%07d", i) })
	upper, work := st.active(t, "top")
	opts := Options{IndexOff: true}
	_, err := OverlayMount(top(st.links, n), upper, work, opts)
	var fe *FitError
	if !errors.As(err, &fe) || !errors.Is(err, ErrOptionsTooLong) {
		t.Fatalf("err = %v, want ErrOptionsTooLong", err)
	}
	t.Logf("%v", err)
	if fe.Fits < 2 || fe.Fits >= n || fe.Bytes <= maxData(os.Getpagesize()) {
		t.Fatalf("FitError = %+v", fe)
	}
	if got := FitDepth(top(st.links, n), upper, work, opts); got != fe.Fits {
		t.Errorf("FitDepth = %d, FitError.Fits = %d", got, fe.Fits)
	}
	// The top Fits of the same stack, as the snapshotter would mount them
	// after flattening the rest (here: without the flattened layer).
	fitTop := top(st.links, n)[:fe.Fits]
	m, err := OverlayMount(fitTop, upper, work, opts)
	if err != nil {
		t.Fatalf("OverlayMount of the %d that fit: %v", fe.Fits, err)
	}
	target := t.TempDir()
	if err := mount.All([]mount.Mount{m}, target); err != nil {
		t.Fatalf("mount.All of the %d lowers that fit: %v", fe.Fits, err)
	}
	if err := mount.UnmountAll(target, 0); err != nil {
		t.Fatal(err)
	}
	over := top(st.links, n)[:fe.Fits+1]
	tooLong := mount.Mount{Type: "overlay", Source: "overlay", Options: overlayOptions(over, upper, work, opts)}
	if _, data := MountData(tooLong, os.Getpagesize()); len(data) == os.Getpagesize() {
		// containerd would pass it and the kernel drop its last byte;
		// TestPageBoundary covers that case, this one must not hit it.
		t.Fatalf("one more lower lands exactly on a page: change the layout")
	}
	if err := mount.All([]mount.Mount{tooLong}, target); err == nil {
		_ = mount.UnmountAll(target, 0)
		t.Errorf("containerd mounted %d lowers that OverlayMount says do not fit", fe.Fits+1)
	} else {
		t.Logf("%d lowers through core/mount: %v", fe.Fits+1, lastWords(err))
	}
}

// TestPageBoundary shows why the limit is a page minus one: mount(2)
// copies one page of data and overwrites its last byte with NUL, so an
// option string of exactly a page loses its last character. Here that turns
// lowerdir "...:xy" into "...:x", a different directory.
func TestPageBoundary(t *testing.T) {
	dir := t.TempDir()
	page := os.Getpagesize()
	for _, d := range []string{"x", "xy", "merged"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, d, "in-"+d), nil, 0o644); err != nil && d != "merged" {
			t.Fatal(err)
		}
	}
	// Fill the page with long lower names ahead of xy.
	build := func(size int) string {
		data := "lowerdir="
		for i := 0; len(data)+len(":xy") < size; i++ {
			name := fmt.Sprintf("%03d", i)
			room := size - len(data) - len(":xy") - 1
			if room < len(name) {
				t.Fatalf("cannot pad to %d", size)
			}
			name += strings.Repeat("p", min(room-len(name), 200))
			if len(data)+1+len(name)+len(":xy") > size && i > 0 {
				break
			}
			if i > 0 {
				data += ":"
			}
			data += name
			if err := os.MkdirAll(filepath.Join(dir, name), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		data += ":xy"
		if len(data) != size {
			t.Fatalf("built %d bytes, want %d", len(data), size)
		}
		return data
	}
	merged := filepath.Join(dir, "merged")
	for _, tc := range []struct {
		size   int
		wantXY bool
	}{{page - 1, true}, {page, false}} {
		data := build(tc.size)
		err := mountIn(dir, merged, unix.MS_RDONLY, data)
		sawXY := false
		if err == nil {
			_, statErr := os.Stat(filepath.Join(merged, "in-xy"))
			sawXY = statErr == nil
			if err := unmount(merged); err != nil {
				t.Fatal(err)
			}
		}
		t.Logf("%d bytes of options: mount err %v, bottom layer xy visible %t", tc.size, err, sawXY)
		if sawXY != tc.wantXY {
			t.Errorf("%d bytes: xy visible = %t, want %t", tc.size, sawXY, tc.wantXY)
		}
	}
}
