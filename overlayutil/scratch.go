package overlayutil

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// scratchPrefix names the probes' directories under the root. The leading
// dot keeps them out of the snapshotter's own names; a crash mid-probe
// leaves one behind, which the next probe does not reuse.
const scratchPrefix = ".overlayutil-probe-"

// staleScratchAge is how old a probe dir must be before a later probe
// removes it as left by a crash. Probes take well under a minute; the
// margin keeps one `overclone check` from removing the dir of another that
// runs at the same time.
const staleScratchAge = time.Hour

// removeStaleScratch removes probe dirs a crashed probe left under root,
// unless something is still mounted below one (then it is left alone:
// removing through a mount would delete the mounted layers' files).
func removeStaleScratch(root string) error {
	dirs, err := filepath.Glob(filepath.Join(root, scratchPrefix+"*"))
	if err != nil {
		return err
	}
	var errs []error
	for _, d := range dirs {
		fi, err := os.Lstat(d)
		if err != nil || !fi.IsDir() || time.Since(fi.ModTime()) < staleScratchAge {
			continue
		}
		if left, err := mountsBelow(d); err != nil || len(left) > 0 {
			errs = append(errs, fmt.Errorf("leaving stale probe dir %s: mounts below it %v (%v)", d, left, err))
			continue
		}
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, fmt.Errorf("remove stale probe dir: %w", err))
		}
	}
	return errors.Join(errs...)
}

// scratch is a directory under the root where a probe builds layers and
// mounts them. It remembers its mounts so that close can take them down
// before removing anything: a RemoveAll through a live overlay would delete
// the lower layers' files.
type scratch struct {
	dir    string
	mounts []string
}

func newScratch(root string) (*scratch, error) {
	dir, err := os.MkdirTemp(root, scratchPrefix)
	if err != nil {
		return nil, fmt.Errorf("make probe dir under %s: %w", root, err)
	}
	return &scratch{dir: dir}, nil
}

func (s *scratch) path(elem ...string) string {
	return filepath.Join(append([]string{s.dir}, elem...)...)
}

// mkdirs makes each named directory (relative to the scratch dir).
func (s *scratch) mkdirs(names ...string) error {
	for _, n := range names {
		if err := os.MkdirAll(s.path(n), 0o755); err != nil {
			return fmt.Errorf("mkdir %s: %w", s.path(n), err)
		}
	}
	return nil
}

// writeFile writes data to name (relative to the scratch dir).
func (s *scratch) writeFile(name, data string) error {
	p := s.path(name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return fmt.Errorf("mkdir %s: %w", filepath.Dir(p), err)
	}
	if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	return nil
}

// overlay mounts an overlay on target (relative to the scratch dir) with the
// given options, as containerd's core/mount would with mount(2). When the
// kernel refuses, the error carries the kernel's own words, replayed
// through fsopen/fsconfig where that API exists.
func (s *scratch) overlay(target string, flags uintptr, opts ...string) error {
	t := s.path(target)
	if err := os.MkdirAll(t, 0o755); err != nil {
		return fmt.Errorf("mkdir %s: %w", t, err)
	}
	data := strings.Join(opts, ",")
	if err := unix.Mount("overlay", t, "overlay", flags, data); err != nil {
		// The option string is left out: it is long, and the kernel's
		// message names the path it refused.
		err = fmt.Errorf("mount overlay on %s: %w", t, err)
		if msg := kernelSays("overlay", opts); msg != "" {
			err = fmt.Errorf("%w (kernel: %s)", err, msg)
		}
		return err
	}
	s.mounts = append(s.mounts, t)
	return nil
}

// track records a mount made by other means so that close takes it down.
func (s *scratch) track(target string) { s.mounts = append(s.mounts, target) }

// unmount takes down the mount on target (relative to the scratch dir).
func (s *scratch) unmount(target string) error {
	t := s.path(target)
	for i := len(s.mounts) - 1; i >= 0; i-- {
		if s.mounts[i] == t {
			s.mounts = append(s.mounts[:i], s.mounts[i+1:]...)
			break
		}
	}
	return unmount(t)
}

func unmount(t string) error {
	if err := unix.Unmount(t, 0); err != nil {
		// A probe that still holds a file open makes the mount busy;
		// detaching lets the kernel finish when the last fd closes.
		if err2 := unix.Unmount(t, unix.MNT_DETACH); err2 != nil {
			return fmt.Errorf("unmount %s: %w", t, err)
		}
	}
	return nil
}

// close unmounts everything the probe mounted and removes the scratch dir,
// unless something is still mounted below it.
func (s *scratch) close() error {
	var errs []error
	for i := len(s.mounts) - 1; i >= 0; i-- {
		if err := unmount(s.mounts[i]); err != nil {
			errs = append(errs, err)
		}
	}
	s.mounts = nil
	left, err := mountsBelow(s.dir)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	if len(left) > 0 {
		return errors.Join(append(errs, fmt.Errorf("not removing %s: still mounted below it: %s", s.dir, strings.Join(left, " ")))...)
	}
	if err := os.RemoveAll(s.dir); err != nil {
		errs = append(errs, fmt.Errorf("remove probe dir: %w", err))
	}
	return errors.Join(errs...)
}

// mountinfoLineMax is the longest mountinfo line read: a deep overlay's
// line lists each lower (500 of up to 4 KiB paths, escaped).
const mountinfoLineMax = 8 << 20

// mountsBelow lists the mount points at or below dir.
func mountsBelow(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mount table: %w", err)
	}
	defer f.Close()
	var below []string
	sc := bufio.NewScanner(f)
	// A mountinfo line holds every lowerdir of an overlay: up to 500 paths.
	sc.Buffer(make([]byte, 0, 64<<10), mountinfoLineMax)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountinfo(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			below = append(below, mp)
		}
	}
	return below, sc.Err()
}

// unescapeMountinfo undoes the octal escapes (\040 for a space) the kernel
// writes in mountinfo paths.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + byte(c-'0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// kernelSays replays a refused mount through fsopen/fsconfig, which hands
// back the filesystem's own error messages (the ones mount(2) only writes
// to the kernel log), such as "overlayfs: too many lower directories". It
// returns "" where the new mount API is missing or says nothing.
func kernelSays(fstype string, opts []string) string {
	fd, err := unix.Fsopen(fstype, unix.FSOPEN_CLOEXEC)
	if err != nil {
		return ""
	}
	defer unix.Close(fd)
	for _, o := range opts {
		k, v, hasValue := strings.Cut(o, "=")
		switch {
		case k == "lowerdir" && len(v) > fsconfigValueMax:
			// fsconfig takes at most 256 bytes per value; a long stack
			// is replayed one layer at a time (kernel 6.8+).
			for _, l := range strings.Split(v, ":") {
				if err = unix.FsconfigSetString(fd, "lowerdir+", l); err != nil {
					break
				}
			}
		case hasValue:
			err = unix.FsconfigSetString(fd, k, v)
		default:
			err = unix.FsconfigSetFlag(fd, k)
		}
		if err != nil {
			return fsLog(fd, fstype)
		}
	}
	if err := unix.FsconfigCreate(fd); err != nil {
		return fsLog(fd, fstype)
	}
	return ""
}

// fsconfigValueMax is the longest string value fsconfig(2) copies in.
const fsconfigValueMax = 255

// The kernel keeps at most 8 messages per fs context, each a line with a
// path or two in it.
const (
	fsLogMessages   = 8
	fsLogMessageMax = 2 * unix.PathMax
)

// fsLog drains the message log of an fsopen fd of fstype, each message
// without the prefix the log adds (see trimFSLogPrefix).
func fsLog(fd int, fstype string) string {
	var msgs []string
	buf := make([]byte, fsLogMessageMax)
	for range fsLogMessages {
		n, err := unix.Read(fd, buf)
		if err != nil || n <= 0 {
			break
		}
		msgs = append(msgs, trimFSLogPrefix(string(buf[:n]), fstype))
	}
	return strings.Join(msgs, "; ")
}

// trimFSLogPrefix returns one fs_context log message as the filesystem
// wrote it. The kernel (logfc in fs/fs_context.c) formats each as
// "<level> <source>: <message>\n", the level "e", "w" or "i" and the source
// the filesystem's name, which an operator reading "kernel: ..." after a
// failed overlay mount has no use for: "e overlay: too many lower
// directories" reads as a typo.
func trimFSLogPrefix(msg, fstype string) string {
	msg = strings.TrimSpace(msg)
	if len(msg) > 2 && msg[1] == ' ' && strings.IndexByte("ewi", msg[0]) >= 0 {
		msg = msg[2:]
	}
	return strings.TrimPrefix(msg, fstype+": ")
}
