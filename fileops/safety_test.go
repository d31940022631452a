package fileops

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/overclone/overclone/test/loopfs"
	"golang.org/x/sys/unix"
)

// escapeStack is a stack whose layers try to lead out: symlinks to an
// outside dir holding a canary, a dir over a symlink, redirects with "..".
func escapeStack(t testing.TB, base string) (upper, lower, outside string) {
	t.Helper()
	upper, lower, outside = filepath.Join(base, "upper"), filepath.Join(base, "lower"), filepath.Join(base, "outside")
	mustWrite(t, filepath.Join(outside, "canary"), []byte("outside"), 0o644)
	mustWrite(t, filepath.Join(outside, "d", "canary"), []byte("outside"), 0o644)
	mustWrite(t, filepath.Join(lower, "d", "f"), []byte("lower f"), 0o644)
	mustWrite(t, filepath.Join(lower, "d", "sub", "g"), []byte("lower g"), 0o644)
	mustMkdir(t, filepath.Join(upper, "r"))
	mustMkdir(t, filepath.Join(upper, "d"))
	for name, target := range map[string]string{
		"esc": outside, "up": "../../../..", "rel": "../outside", "d/loop": "loop",
	} {
		if err := os.Symlink(target, filepath.Join(upper, name)); err != nil {
			t.Fatal(err)
		}
	}
	// lower "link" is a symlink out, upper "link" a dir over it
	if err := os.Symlink(outside, filepath.Join(lower, "link")); err != nil {
		t.Fatal(err)
	}
	mustMkdir(t, filepath.Join(upper, "link"))
	return upper, lower, outside
}

func TestPathSafety(t *testing.T) {
	needRoot(t)
	base := t.TempDir()
	upper, lower, outside := escapeStack(t, base)
	var canary unix.Stat_t
	if err := unix.Stat(filepath.Join(outside, "canary"), &canary); err != nil {
		t.Fatal(err)
	}
	s, err := NewStack(upper, []string{lower})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{
		"esc/canary", "up/canary", "rel/canary", "link/canary", "link/d/canary",
		"../outside/canary", "../../../../" + outside + "/canary", "d/../../outside/canary",
		"/esc/../outside/canary", "d/loop/x",
	} {
		e, err := s.Resolve(p)
		if err == nil {
			t.Errorf("Resolve(%q) found %s in %s", p, e.RealPath, e.LayerDir)
		}
		if _, err := s.CopyUp(context.Background(), p); err == nil {
			t.Errorf("CopyUp(%q) succeeded", p)
		}
		// Followed, a link's text is a path in the merged view: an outside
		// target names nothing there, and ".." stops at the merged root.
		if e, err := s.ResolveFollow(p); err == nil {
			t.Errorf("ResolveFollow(%q) found %s in %s", p, e.RealPath, e.LayerDir)
		}
		if _, err := s.CopyOut(context.Background(), p, filepath.Join(base, "out-canary")); err == nil {
			t.Errorf("CopyOut(%q) succeeded", p)
		}
		if _, err := s.CopyRange(context.Background(), p, 0, "d/f", 0, 10); err == nil {
			t.Errorf("CopyRange from %q succeeded", p)
		}
	}
	// ".." is cleaned inside the merged root, never above it.
	if e, err := s.Resolve("../../d/../d/f"); err != nil || e.RealPath != "d/f" {
		t.Errorf("Resolve of a path with ..: %v %v", e.RealPath, err)
	}
	// Redirects that try to climb are refused, not followed.
	for _, r := range []string{"/../outside", "../outside", "/d/../../outside", "a/b", "."} {
		mustXattr(t, filepath.Join(upper, "r"), "trusted.overlay.redirect", r)
		if e, err := s.Resolve("r"); err == nil {
			if ents, err := s.ReadDir("r"); err == nil && len(ents) > 0 {
				t.Errorf("redirect %q led to %v (%s)", r, ents[0].Path, e.RealPath)
			}
		}
	}
	if err := unix.Lremovexattr(filepath.Join(upper, "r"), "trusted.overlay.redirect"); err != nil {
		t.Fatal(err)
	}
	// Symlinks are copied up as links, never followed.
	if _, err := s.CopyOut(context.Background(), "esc", filepath.Join(base, "out-esc")); err != nil {
		t.Fatal(err)
	}
	if l, err := os.Readlink(filepath.Join(base, "out-esc")); err != nil || l != outside {
		t.Errorf("copied symlink reads %q, %v", l, err)
	}
	// Whole-tree walks never see the canary.
	flat := filepath.Join(base, "flat")
	if _, err := Flatten(context.Background(), s, flat); err != nil {
		t.Fatal(err)
	}
	filepath.WalkDir(flat, func(p string, d fs.DirEntry, err error) error {
		if strings.HasSuffix(p, "canary") {
			t.Errorf("flatten copied %s", p)
		}
		return nil
	})
}

func TestBadInput(t *testing.T) {
	needRoot(t)
	ctx := context.Background()
	base := t.TempDir()
	layer := filepath.Join(base, "l")
	mustWrite(t, filepath.Join(layer, "f"), []byte("x"), 0o644)
	mustMkdir(t, filepath.Join(layer, "dir"))
	file := filepath.Join(layer, "f")
	upper := filepath.Join(base, "u")
	mustMkdir(t, upper)

	if _, err := NewStack("", nil); err == nil {
		t.Error("NewStack with no layers succeeded")
	}
	if _, err := NewStack("", []string{filepath.Join(base, "missing")}); !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "missing") {
		t.Errorf("missing layer: %v", err)
	}
	if _, err := NewStack("", []string{file}); !errors.Is(err, unix.ENOTDIR) || !strings.Contains(err.Error(), file) {
		t.Errorf("layer that is a file: %v", err)
	}
	if _, err := NewStack(file, []string{layer}); err == nil {
		t.Error("upper that is a file accepted")
	}
	if _, err := NewStack(upper, []string{layer}, WithDataMethods(MethodHardLink)); err == nil {
		t.Error("WithDataMethods(hardlink) accepted")
	}
	other := loopfs.Mount(t, loopfs.Tmpfs)
	if _, err := NewStack(upper, []string{layer}, WithWorkDir(other)); !errors.Is(err, unix.EXDEV) {
		t.Errorf("work dir on another filesystem: %v", err)
	}
	ro, err := NewStack("", []string{layer})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ro.CopyUp(ctx, "f"); !errors.Is(err, ErrReadOnly) {
		t.Errorf("CopyUp on a read-only stack: %v", err)
	}
	if _, err := ro.CopyIn(ctx, file, "g"); !errors.Is(err, ErrReadOnly) {
		t.Errorf("CopyIn on a read-only stack: %v", err)
	}
	s, err := NewStack(upper, []string{layer})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"f\x00", "\x00", "dir/\x00/f"} {
		if _, err := s.Resolve(p); !errors.Is(err, ErrInvalidPath) {
			t.Errorf("Resolve(%q): %v", p, err)
		}
		if _, err := s.ReadDir(p); !errors.Is(err, ErrInvalidPath) {
			t.Errorf("ReadDir(%q): %v", p, err)
		}
		if _, err := s.CopyUp(ctx, p); !errors.Is(err, ErrInvalidPath) {
			t.Errorf("CopyUp(%q): %v", p, err)
		}
		if _, err := s.CopyRange(ctx, "f", 0, p, 0, 1); !errors.Is(err, ErrInvalidPath) {
			t.Errorf("CopyRange to %q: %v", p, err)
		}
		if _, err := s.ResolveFollow(p); !errors.Is(err, ErrInvalidPath) {
			t.Errorf("ResolveFollow(%q): %v", p, err)
		}
		if _, err := s.CopyOut(ctx, p, filepath.Join(base, "out")); !errors.Is(err, ErrInvalidPath) {
			t.Errorf("CopyOut(%q): %v", p, err)
		}
		if _, err := s.CopyIn(ctx, file, p); !errors.Is(err, ErrInvalidPath) {
			t.Errorf("CopyIn to %q: %v", p, err)
		}
	}
	if _, err := s.Resolve("nope"); !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "nope") {
		t.Errorf("Resolve of a missing name: %v", err)
	}
	if _, err := s.Resolve("f/below"); !errors.Is(err, unix.ENOTDIR) {
		t.Errorf("Resolve below a file: %v", err)
	}
	if _, err := s.ReadDir("f"); !errors.Is(err, unix.ENOTDIR) {
		t.Errorf("ReadDir of a file: %v", err)
	}
	if _, err := s.CopyRange(ctx, "f", -1, "f", 0, 1); !errors.Is(err, unix.EINVAL) {
		t.Errorf("negative offset: %v", err)
	}
	if _, err := s.CopyRange(ctx, "dir", 0, "f", 0, 1); !errors.Is(err, unix.EINVAL) {
		t.Errorf("range from a dir: %v", err)
	}
	if _, err := s.CopyRange(ctx, "f", 0, "dir", 0, 1); !errors.Is(err, unix.EINVAL) {
		t.Errorf("range into a dir: %v", err)
	}
	if _, err := s.CopyRange(ctx, "f", 0, "missing", 0, 1); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("range into a missing file: %v", err)
	}
	if _, err := Flatten(ctx, s, layer); !errors.Is(err, fs.ErrExist) {
		t.Errorf("Flatten into a non-empty dir: %v", err)
	}
	if _, err := s.CopyOut(ctx, "f", file); !errors.Is(err, fs.ErrExist) {
		t.Errorf("CopyOut over an existing file: %v", err)
	}
	if _, err := s.CopyIn(ctx, filepath.Join(base, "missing"), "x"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("CopyIn of a missing host file: %v", err)
	}
	if _, err := s.CopyIn(ctx, layer, "f"); !errors.Is(err, unix.ENOTDIR) {
		t.Errorf("CopyIn of a dir over a file: %v", err)
	}
	if _, err := s.CopyIn(ctx, file, "dir"); !errors.Is(err, unix.EISDIR) {
		t.Errorf("CopyIn of a file over a dir: %v", err)
	}
}
