package fileops

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// stagingPrefix starts every staging name: ".overclone-tmp-PID-SEQ".
const stagingPrefix = ".overclone-tmp-"

// stagedHook, when set by a test, runs with a staged entry complete and
// not yet renamed into place: the moment a crash leaves a staging name.
var stagedHook func()

// createdHook, when set by a test, runs once an entry has been created and
// before its owner, xattrs, mode and times are set: the window in which a
// process that can write the directory may swap the name for a symlink.
var createdHook func(dirfd int, name string)

func created(dirfd int, name string) {
	if createdHook != nil {
		createdHook(dirfd, name)
	}
}

// inFlight holds the staging names this process is building now, so that
// CleanStaging never removes one of its own live entries.
var inFlight sync.Map

func newStagingName() string {
	n := tmpName()
	inFlight.Store(n, struct{}{})
	return n
}

func releaseStagingName(n string) { inFlight.Delete(n) }

// isStagingName reports the exact form tmpName makes. Layer content never
// uses it, so a name of that form is a staging leftover wherever it is
// (an upper with a leftover may have been committed into a lower since)
// and the merged view hides it in every layer.
func isStagingName(name string) bool {
	_, ok := stagingPID(name)
	return ok
}

// stagingPID returns the writer's pid out of a staging name.
func stagingPID(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, stagingPrefix)
	if !ok {
		return 0, false
	}
	pid, seq, ok := strings.Cut(rest, "-")
	if !ok || !allDigits(pid) || !allDigits(seq) {
		return 0, false
	}
	n, err := strconv.Atoi(pid)
	if err != nil || n <= 0 {
		return 0, false
	}
	return n, true
}

func allDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// stagingStale reports whether a staging entry is a leftover no writer
// will finish: this process's own names are stale unless being built now;
// another process's are stale once that process is gone, or, since its
// pid may have been reused by an unrelated process, once the entry has
// not changed for minAge.
func stagingStale(name string, st *unix.Stat_t, minAge time.Duration, now time.Time) bool {
	pid, ok := stagingPID(name)
	if !ok {
		return false
	}
	if pid == os.Getpid() {
		_, busy := inFlight.Load(name)
		return !busy
	}
	if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) {
		return true
	}
	changed := time.Unix(st.Ctim.Unix())
	return now.Sub(changed) >= minAge
}

// CleanStaging removes the staging entries that an interrupted copy left
// in the upper layer (a crash between building an entry and renaming it
// into place; regular files, made with O_TMPFILE, leave none) and in the
// work dir, and returns their paths, relative to the upper or absolute in
// the work dir. It walks the whole upper, so it belongs at start-up or in
// maintenance rather than on every write.
//
// An entry is removed when its writer is gone: written by this process
// and not being built now, or by a process that no longer exists, or by
// any process but unchanged (ctime) for minAge, which should exceed the
// longest copy. Removing a live writer's entry makes that copy fail; it
// cannot damage what the merged view shows. The merged view never shows
// staging names, left over or not.
func (s *Stack) CleanStaging(ctx context.Context, minAge time.Duration) ([]string, error) {
	if !s.hasUpper {
		return nil, fmt.Errorf("clean staging: %w", ErrReadOnly)
	}
	c := &cleaner{minAge: minAge, now: time.Now()}
	root, err := openDir(s.layers[0])
	if err != nil {
		return nil, fmt.Errorf("clean staging: open upper %s: %w", s.layers[0], err)
	}
	err = c.dir(ctx, root, "", true)
	closeFD(root)
	if err != nil {
		return c.removed, fmt.Errorf("clean staging in upper %s: %w", s.layers[0], err)
	}
	if s.cfg.workDir != "" {
		wd, err := openDir(s.cfg.workDir)
		if err != nil {
			return c.removed, fmt.Errorf("clean staging: open work dir %s: %w", s.cfg.workDir, err)
		}
		c.prefix = s.cfg.workDir + "/"
		err = c.dir(ctx, wd, "", false)
		closeFD(wd)
		if err != nil {
			return c.removed, fmt.Errorf("clean staging in work dir %s: %w", s.cfg.workDir, err)
		}
	}
	return c.removed, nil
}

type cleaner struct {
	minAge  time.Duration
	now     time.Time
	prefix  string // put before the relative paths reported
	removed []string
}

// dir removes stale staging entries in the directory open as dirfd and,
// with recurse, looks into its other subdirectories.
func (c *cleaner) dir(ctx context.Context, dirfd int, rel string, recurse bool) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	fd, err := unix.Openat(dirfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", rel, err)
	}
	f := os.NewFile(uintptr(fd), rel)
	ents, err := f.ReadDir(-1)
	f.Close()
	if err != nil {
		return fmt.Errorf("read dir %s: %w", rel, err)
	}
	for _, de := range ents {
		name := de.Name()
		p := joinRel(rel, name)
		if isStagingName(name) {
			var st unix.Stat_t
			if err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				if errors.Is(err, unix.ENOENT) {
					continue // its writer finished or cleaned it meanwhile
				}
				return fmt.Errorf("stat %s: %w", p, err)
			}
			if !stagingStale(name, &st, c.minAge, c.now) {
				continue
			}
			if st.Mode&unix.S_IFMT == unix.S_IFDIR {
				err = os.RemoveAll(procPath(dirfd, name))
			} else {
				err = unix.Unlinkat(dirfd, name, 0)
			}
			if err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("remove %s: %w", p, err)
			}
			c.removed = append(c.removed, c.prefix+p)
			continue
		}
		if !recurse || !de.IsDir() {
			continue
		}
		sub, err := openBeneath(dirfd, name, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
		if err != nil {
			if notHere(err) {
				continue
			}
			return fmt.Errorf("open %s: %w", p, err)
		}
		err = c.dir(ctx, sub, p, true)
		closeFD(sub)
		if err != nil {
			return err
		}
	}
	return nil
}
