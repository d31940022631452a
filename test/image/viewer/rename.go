package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
)

// rename renames old to new as mv does. An overlay mounted without
// redirect_dir=on (containerd's built-in snapshotter, when the kernel's
// default is off) refuses to rename a directory that comes from a lower
// layer with EXDEV, and mv then copies the tree and removes the old one; so
// does this, so that the same exec runs on every snapshotter and the test
// compares the trees that result.
func rename(old, new string) error {
	err := os.Rename(old, new)
	if !errors.Is(err, syscall.EXDEV) {
		return err
	}
	if err := copyTree(old, new); err != nil {
		return fmt.Errorf("rename %s %s: copy after EXDEV: %w", old, new, err)
	}
	return os.RemoveAll(old)
}

// copyTree copies what the test image's renamed dirs hold: dirs, regular
// files and symlinks, with mode and owner.
func copyTree(src, dst string) error {
	return filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		st := fi.Sys().(*syscall.Stat_t)
		switch {
		case fi.IsDir():
			if err := os.Mkdir(target, 0o700); err != nil {
				return err
			}
		case fi.Mode()&os.ModeSymlink != 0:
			link, err := os.Readlink(p)
			if err != nil {
				return err
			}
			if err := os.Symlink(link, target); err != nil {
				return err
			}
			// A symlink's mode means nothing on Linux.
			return os.Lchown(target, int(st.Uid), int(st.Gid))
		case fi.Mode().IsRegular():
			if err := copyFile(p, target); err != nil {
				return err
			}
		default:
			return fmt.Errorf("%s: cannot copy %s", p, fi.Mode().Type())
		}
		// chown before chmod: chown clears setuid and setgid bits.
		if err := os.Lchown(target, int(st.Uid), int(st.Gid)); err != nil {
			return err
		}
		return os.Chmod(target, fi.Mode()&(os.ModePerm|os.ModeSetuid|os.ModeSetgid|os.ModeSticky))
	})
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// fill writes size bytes to path and fsyncs them, so that the blocks are
// allocated when the test reads the writable layer's usage. The bytes are
// not zeros, which a filesystem could leave unallocated.
func fill(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i%251 + 1)
	}
	for left := size; left > 0 && err == nil; {
		n := int64(len(buf))
		if left < n {
			n = left
		}
		_, err = f.Write(buf[:n])
		left -= n
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("fill %s: %w", path, err)
	}
	return nil
}
