package fileops

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/overclone/overclone/test/loopfs"
	"github.com/overclone/overclone/test/require"
	"golang.org/x/sys/unix"
)

// testKinds are the backing filesystems the symlink, listing, staging and
// copy-in tests run on: one without reflink and one with.
var testKinds = []loopfs.Kind{loopfs.Ext4, loopfs.XFS}

func mustSymlink(t testing.TB, target, p string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, p); err != nil {
		t.Fatal(err)
	}
}

// linkStack builds three layers (returned top first) shaped like a Debian
// rootfs with merged /usr, plus links that loop, dangle, climb, chain and
// point through whiteouts, opaque dirs and redirects.
func linkStack(t testing.TB, base string) []string {
	t.Helper()
	layers := newLayers(t, base, 3)
	low2, low1, up := layers[0], layers[1], layers[2]
	j := filepath.Join
	mustWrite(t, j(low2, "usr/lib/x86_64-linux-gnu/libc.so.6"), []byte("libc v1"), 0o755)
	mustSymlink(t, "libc.so.6", j(low2, "usr/lib/x86_64-linux-gnu/libc.so"))
	mustWrite(t, j(low2, "usr/bin/sh"), []byte("#!sh"), 0o755)
	mustWrite(t, j(low2, "etc/hostname"), []byte("box"), 0o644)
	mustSymlink(t, "usr/lib", j(low2, "lib"))
	mustSymlink(t, "/usr/bin", j(low2, "bin"))
	mustSymlink(t, "/usr/bin/sh", j(low2, "etc/alternatives/editor"))
	mustSymlink(t, "/etc/alternatives/editor", j(low2, "usr/bin/editor"))
	mustSymlink(t, "/etc/alternatives/pager", j(low2, "usr/bin/pager"))
	mustSymlink(t, "/usr/bin/sh", j(low2, "etc/alternatives/pager"))
	mustSymlink(t, "../../../..", j(low2, "up"))
	mustSymlink(t, "loop2", j(low2, "loop1"))
	mustSymlink(t, "loop1", j(low2, "loop2"))
	mustSymlink(t, "nowhere/at/all", j(low2, "dangling"))
	// n0 -> n1 -> ... -> n40 -> usr: from n1 the walk follows 40 links
	// (the kernel's limit), from n0 41.
	for i := 0; i < 40; i++ {
		mustSymlink(t, fmt.Sprintf("n%d", i+1), j(low2, fmt.Sprintf("n%d", i)))
	}
	mustSymlink(t, "usr", j(low2, "n40"))
	mustWrite(t, j(low2, "opt/hidden"), []byte("hidden"), 0o644)
	mustWrite(t, j(low2, "olddir/f"), []byte("moved"), 0o644)
	mustMkdir(t, j(low2, "srv"))
	os.Chown(j(low2, "srv"), 0, 50)
	os.Chmod(j(low2, "srv"), 0o2775)
	mustWrite(t, j(low2, "gone/f"), []byte("gone"), 0o644)

	// The middle layer replaces libc, whites out the pager's target and
	// makes opt opaque.
	mustWrite(t, j(low1, "usr/lib/x86_64-linux-gnu/libc.so.6"), []byte("libc v2"), 0o755)
	mustWhiteout(t, j(low1, "etc/alternatives/pager"))
	mustWrite(t, j(low1, "opt/shown"), []byte("shown"), 0o644)
	mustXattr(t, j(low1, "opt"), "trusted.overlay.opaque", "y")

	mustWrite(t, j(up, "usr/lib/x86_64-linux-gnu/new.so"), []byte("new"), 0o644)
	mustSymlink(t, "../../lib/x86_64-linux-gnu", j(up, "home/u/link"))
	mustSymlink(t, "opt/hidden", j(up, "optlink"))
	mustMkdir(t, j(up, "renamed"))
	mustXattr(t, j(up, "renamed"), "trusted.overlay.redirect", "/olddir")
	mustWhiteout(t, j(up, "olddir"))
	mustSymlink(t, "renamed/f", j(up, "r"))
	mustWhiteout(t, j(up, "gone"))
	return topFirst(layers)
}

var linkPaths = []string{
	"lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/libc.so", "lib/x86_64-linux-gnu/",
	"lib", "lib/", "lib/.", "/lib/x86_64-linux-gnu/../x86_64-linux-gnu/new.so",
	"bin/sh", "/bin/../lib/x86_64-linux-gnu/libc.so.6", "bin/editor", "usr/bin/editor", "usr/bin/pager",
	"up/usr/bin/sh", "up/../up/lib/x86_64-linux-gnu/new.so", "../../bin/sh",
	"loop1", "loop1/x", "dangling", "dangling/x",
	"n1/lib/x86_64-linux-gnu/libc.so.6", "n1", "n0/lib", "n0",
	"usr/bin/sh/x", "lib/x86_64-linux-gnu/libc.so/", "lib/../etc/hostname",
	"lib/x86_64-linux-gnu/../../bin/sh", "optlink", "home/u/link/new.so", "home/u/link/../../bin/sh",
	"r", "r/..", "", "/", "..", "missing/x", "lib/missing", "gone/f", "renamed/f",
}

// TestFollowAgainstKernel resolves paths through links with fileops and
// with the kernel, on an overlay mount of the same layers opened with
// RESOLVE_IN_ROOT (the semantics of a process chrooted at the merged
// root), with and without following the last link, and compares errno,
// resolved path, type and content. Then CopyOut through links is compared
// with the kernel's view.
func TestFollowAgainstKernel(t *testing.T) {
	needRoot(t)
	for _, k := range testKinds {
		t.Run(string(k), func(t *testing.T) {
			mnt := loopfs.Mount(t, k)
			layers := linkStack(t, mnt)
			s, err := NewStack(layers[0], layers[1:])
			if err != nil {
				t.Fatal(err)
			}
			merged := mountOverlay(t, "", layers, "redirect_dir=on")
			rootfd, err := openDir(merged)
			if err != nil {
				t.Fatal(err)
			}
			defer closeFD(rootfd)
			for _, p := range linkPaths {
				for _, followLast := range []bool{false, true} {
					compareFollow(t, s, merged, rootfd, p, followLast)
				}
			}
			// The exported form follows the last link like stat(2).
			e, err := s.ResolveFollow("lib/x86_64-linux-gnu/libc.so")
			if err != nil || e.Path != "usr/lib/x86_64-linux-gnu/libc.so.6" || e.Layer != 1 {
				t.Errorf("ResolveFollow(libc.so) = %q layer %d, %v", e.Path, e.Layer, err)
			}
			if _, err := s.ResolveFollow("n0"); !errors.Is(err, unix.ELOOP) || !strings.Contains(err.Error(), "n") {
				t.Errorf("ResolveFollow of 41 links: %v", err)
			}
			if _, err := s.Resolve("lib/x86_64-linux-gnu/libc.so.6"); !errors.Is(err, unix.ENOTDIR) {
				t.Errorf("Resolve still must not follow: %v", err)
			}

			ctx := context.Background()
			out := filepath.Join(mnt, "out")
			mustMkdir(t, out)
			// Through a link in the middle; the last link copied as a link.
			if _, err := s.CopyOut(ctx, "/lib/x86_64-linux-gnu/libc.so.6", filepath.Join(out, "libc")); err != nil {
				t.Fatal(err)
			}
			if got, want := string(readFile(t, filepath.Join(out, "libc"))), string(readFile(t, filepath.Join(merged, "lib/x86_64-linux-gnu/libc.so.6"))); got != want {
				t.Errorf("CopyOut through /lib reads %q, the kernel %q", got, want)
			}
			if _, err := s.CopyOut(ctx, "lib", filepath.Join(out, "lib-link")); err != nil {
				t.Fatal(err)
			}
			if l, err := os.Readlink(filepath.Join(out, "lib-link")); err != nil || l != "usr/lib" {
				t.Errorf("CopyOut of the link lib: %q, %v (want the link itself)", l, err)
			}
			// Into an existing directory, under the name as written; "lib/"
			// follows the link like cp -a lib/ DIR/.
			into := filepath.Join(out, "into")
			mustMkdir(t, into)
			for _, p := range []string{"lib/", "bin/sh", "usr/bin/editor", "home/u/link/."} {
				if _, err := s.CopyOut(ctx, p, into); err != nil {
					t.Fatalf("CopyOut(%q, existing dir): %v", p, err)
				}
			}
			want, _ := walkTree(t, filepath.Join(merged, "usr/lib"), skipOverlayXattrs)
			got, _ := walkTree(t, filepath.Join(into, "lib"), skipOverlayXattrs)
			compareTrees(t, "CopyOut lib/ into a dir vs the kernel's usr/lib", want, got, true, nil)
			got, _ = walkTree(t, filepath.Join(into, "x86_64-linux-gnu"), skipOverlayXattrs)
			want, _ = walkTree(t, filepath.Join(merged, "usr/lib/x86_64-linux-gnu"), skipOverlayXattrs)
			compareTrees(t, "CopyOut home/u/link/.. vs the kernel", want, got, true, nil)
			if string(readFile(t, filepath.Join(into, "sh"))) != "#!sh" {
				t.Error("CopyOut bin/sh into a dir")
			}
			if l, _ := os.Readlink(filepath.Join(into, "editor")); l != "/etc/alternatives/editor" {
				t.Errorf("CopyOut usr/bin/editor into a dir: link %q", l)
			}
			if _, err := s.CopyOut(ctx, "bin/sh", into); !errors.Is(err, fs.ErrExist) {
				t.Errorf("CopyOut over a name already in the dir: %v", err)
			}
			if _, err := s.CopyOut(ctx, "/", into); !errors.Is(err, fs.ErrExist) {
				t.Errorf("CopyOut of the root into a dir: %v", err)
			}
			for _, p := range []string{"n0/lib", "loop1/x", "dangling/x", "usr/bin/sh/x"} {
				if _, err := s.CopyOut(ctx, p, filepath.Join(out, "bad")); err == nil {
					t.Errorf("CopyOut(%q) succeeded", p)
				}
			}
		})
	}
}

// compareFollow checks one path against the kernel.
func compareFollow(t *testing.T, s *Stack, merged string, rootfd int, p string, followLast bool) {
	t.Helper()
	what := fmt.Sprintf("%q (follow last %v)", p, followLast)
	how := unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC, Resolve: unix.RESOLVE_IN_ROOT}
	if !followLast {
		how.Flags |= unix.O_NOFOLLOW
	}
	kp := p
	if kp == "" {
		kp = "."
	}
	kfd, kerr := unix.Openat2(rootfd, kp, &how)
	for kerr == unix.EAGAIN || kerr == unix.EINTR {
		kfd, kerr = unix.Openat2(rootfd, kp, &how)
	}
	v := s.newView()
	defer v.close()
	r, err := v.walk(p, followLast, nil)
	if kerr != nil {
		want := kerr.(unix.Errno)
		ok := errors.Is(err, want) || want == unix.ENOENT && errors.Is(err, fs.ErrNotExist)
		if !ok {
			t.Errorf("%s: kernel %v, fileops %v (%q)", what, want, err, r.e.Path)
		}
		return
	}
	defer closeFD(kfd)
	if err != nil {
		t.Errorf("%s: kernel finds it, fileops: %v", what, err)
		return
	}
	kpath, _ := os.Readlink(fdPath(kfd))
	kpath = strings.TrimPrefix(strings.TrimPrefix(kpath, merged), "/")
	if r.e.Path != kpath || r.canon != kpath {
		t.Errorf("%s: kernel resolves to %q, fileops %q", what, kpath, r.e.Path)
	}
	var st unix.Stat_t
	if err := unix.Fstat(kfd, &st); err != nil {
		t.Fatal(err)
	}
	if kindOf(st.Mode) != r.e.Kind {
		t.Errorf("%s: kernel shows a %s, fileops a %s", what, kindOf(st.Mode), r.e.Kind)
		return
	}
	switch r.e.Kind {
	case KindFile:
		kdata := string(readFile(t, fdPath(kfd)))
		fdata := string(readFile(t, filepath.Join(s.layers[r.e.DataLayer], r.e.DataPath)))
		if kdata != fdata {
			t.Errorf("%s: kernel reads %q, fileops %q", what, kdata, fdata)
		}
	case KindSymlink:
		kl, _ := readlinkAt(kfd, "")
		fl, _ := v.readlink(r.e)
		if kl != fl {
			t.Errorf("%s: kernel link %q, fileops %q", what, kl, fl)
		}
	case KindDir:
		ents, err := os.ReadDir(fdPath(kfd))
		if err != nil {
			t.Fatal(err)
		}
		var kn, fn []string
		for _, e := range ents {
			if _, err := os.Lstat(filepath.Join(fdPath(kfd), e.Name())); err == nil {
				kn = append(kn, e.Name())
			}
		}
		fents, err := v.readDir(r.e)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range fents {
			fn = append(fn, e.Info.Name())
		}
		sort.Strings(kn)
		if fmt.Sprint(kn) != fmt.Sprint(fn) {
			t.Errorf("%s: kernel lists %v, fileops %v", what, kn, fn)
		}
	}
}

// TestCopyInThroughLinks writes with CopyIn through links and missing
// directories, and does the same through the kernel (mkdir -p and cp -a
// in the directory the kernel resolves in-root) into a copy of the upper;
// the two uppers must match.
func TestCopyInThroughLinks(t *testing.T) {
	needRoot(t)
	if _, err := exec.LookPath("cp"); err != nil {
		require.Skip(t, err)
	}
	for _, k := range testKinds {
		t.Run(string(k), func(t *testing.T) {
			ctx := context.Background()
			mnt := loopfs.Mount(t, k)
			layers := linkStack(t, mnt)
			upper, lowers := layers[0], layers[1:]
			upperB := filepath.Join(mnt, "upperB")
			if out, err := exec.Command("cp", "-a", upper, upperB).CombinedOutput(); err != nil {
				t.Fatalf("cp -a: %v: %s", err, out)
			}
			host := filepath.Join(mnt, "host")
			mustWrite(t, filepath.Join(host, "f"), []byte("from the host"), 0o640)
			mustWrite(t, filepath.Join(host, "tree/a"), []byte("a"), 0o600)
			mustSymlink(t, "a", filepath.Join(host, "tree/s"))
			mustWhiteout(t, filepath.Join(upper, "opt2"))
			mustWhiteout(t, filepath.Join(upperB, "opt2"))
			mustWrite(t, filepath.Join(lowers[1], "opt2/old"), []byte("old"), 0o644)

			// Each case: fileops' destination, and for the kernel the
			// existing part (resolved in-root) and the new part below it.
			cases := []struct{ src, dst, kDir, kNew string }{
				{"f", "lib/x86_64-linux-gnu/plugins/new/f", "lib/x86_64-linux-gnu", "plugins/new/f"},
				{"tree", "/bin/../lib/x86_64-linux-gnu/tree", "lib/x86_64-linux-gnu", "tree"},
				{"f", "opt2/deep/f", "", "opt2/deep/f"},
				{"f", "srv/a/b/f", "srv", "a/b/f"},
				{"tree", "home/u/link/plugins/t2", "home/u/link", "plugins/t2"},
			}
			s, err := NewStack(upper, lowers)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range cases {
				if _, err := s.CopyIn(ctx, filepath.Join(host, c.src), c.dst); err != nil {
					t.Fatalf("CopyIn(%s, %s): %v", c.src, c.dst, err)
				}
			}
			merged := mountOverlay(t, upperB, lowers, "redirect_dir=on,index=off,metacopy=off")
			rootfd, err := openDir(merged)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range cases {
				kdir := c.kDir
				if kdir == "" {
					kdir = "."
				}
				fd, err := unix.Openat2(rootfd, kdir, &unix.OpenHow{Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC, Resolve: unix.RESOLVE_IN_ROOT})
				if err != nil {
					t.Fatalf("kernel in-root %s: %v", kdir, err)
				}
				dir, _ := parentName(c.kNew)
				cmd := exec.Command("sh", "-c", `umask 022 && mkdir -p "/proc/self/fd/3/$1" && cp -a "$2" "/proc/self/fd/3/$3"`, "sh", dir, filepath.Join(host, c.src), c.kNew)
				// The *os.File owns fd from here: closing fd by number too
				// would close whatever reuses it once the finalizer runs.
				df := os.NewFile(uintptr(fd), kdir)
				cmd.ExtraFiles = []*os.File{df}
				out, err := cmd.CombinedOutput()
				df.Close()
				if err != nil {
					t.Fatalf("kernel mkdir -p/cp -a for %s: %v: %s", c.dst, err, out)
				}
			}
			closeFD(rootfd)
			unmountOverlay(t, merged)
			noTime := map[string]bool{}
			for _, p := range []string{"usr/lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu/plugins", "usr/lib/x86_64-linux-gnu/plugins/new",
				"opt2", "opt2/deep", "srv", "srv/a", "srv/a/b"} {
				noTime[p] = true
			}
			ua, _ := walkTree(t, upperB, skipOverlayXattrs)
			ub, _ := walkTree(t, upper, skipOverlayXattrs)
			compareTrees(t, "upper after mkdir -p/cp -a through the kernel vs after CopyIn", ua, ub, true, noTime)
			for _, u := range []string{upper, upperB} {
				if v, _, _ := getXattr(filepath.Join(u, "opt2"), "trusted.overlay.opaque"); string(v) != "y" {
					t.Errorf("%s: new opt2 over a whiteout not opaque (%q)", u, v)
				}
			}

			// A last link to a file is written through; one that dangles
			// is refused; names out of a link's text are never made.
			if _, err := s.CopyIn(ctx, filepath.Join(host, "f"), "lib/x86_64-linux-gnu/libc.so"); err != nil {
				t.Fatal(err)
			}
			if _, err := s.CopyIn(ctx, filepath.Join(host, "f"), "dangling"); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("CopyIn through a dangling link: %v", err)
			}
			if _, err := s.CopyIn(ctx, filepath.Join(host, "f"), "dangling/x"); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("CopyIn below a dangling link: %v", err)
			}
			if _, err := s.CopyIn(ctx, filepath.Join(host, "f"), "usr/bin/sh/x"); !errors.Is(err, unix.ENOTDIR) {
				t.Errorf("CopyIn below a file: %v", err)
			}
			if _, err := s.CopyIn(ctx, filepath.Join(host, "f"), "newfile/"); !errors.Is(err, unix.ENOTDIR) {
				t.Errorf("CopyIn of a file to a path ending in /: %v", err)
			}
			if _, err := s.CopyIn(ctx, filepath.Join(host, "f"), ".overclone-tmp-1-1"); !errors.Is(err, ErrInvalidPath) {
				t.Errorf("CopyIn to a staging name: %v", err)
			}
			m2 := mountOverlay(t, "", []string{upper, lowers[0], lowers[1]}, "")
			if got := string(readFile(t, filepath.Join(m2, "usr/lib/x86_64-linux-gnu/libc.so.6"))); got != "from the host" {
				t.Errorf("libc.so.6 after CopyIn onto the libc.so link reads %q", got)
			}
			if l, err := os.Readlink(filepath.Join(m2, "usr/lib/x86_64-linux-gnu/libc.so")); err != nil || l != "libc.so.6" {
				t.Errorf("libc.so after CopyIn onto it: %q %v, want the link kept", l, err)
			}
			for _, p := range []string{"nowhere", "dangling/x", "newfile"} {
				if _, err := os.Lstat(filepath.Join(m2, p)); err == nil {
					t.Errorf("%s made by a refused CopyIn", p)
				}
			}
		})
	}
}
