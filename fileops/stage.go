package fileops

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// noTmpfile makes copy-ups stage regular files by name, as on a
// filesystem without O_TMPFILE; tests set it to cover that path.
var noTmpfile bool

// stagedFile is a regular file being built for the upper: an O_TMPFILE
// (no name until linked in, so a crash leaves nothing) or, where the
// filesystem has no O_TMPFILE, a staging name in the work dir or next to
// the target.
type stagedFile struct {
	fd    int
	sd    int    // staging dir when named
	named string // staging name, "" for an O_TMPFILE
	// reserved is the staging name this process holds until close, so
	// that CleanStaging leaves it alone.
	reserved string
}

func (v *view) stageFile(pfd int) (*stagedFile, error) {
	if !noTmpfile {
		fd, err := unix.Openat(pfd, ".", unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
		if err == nil {
			return &stagedFile{fd: fd, sd: -1}, nil
		}
		if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EISDIR) {
			return nil, fmt.Errorf("create O_TMPFILE in upper: %w", err)
		}
	}
	sd, err := v.stageDir(pfd)
	if err != nil {
		return nil, fmt.Errorf("open staging dir: %w", err)
	}
	name := newStagingName()
	f := &stagedFile{sd: sd, named: name, reserved: name}
	f.fd, err = unix.Openat(sd, f.named, unix.O_CREAT|unix.O_EXCL|unix.O_RDWR|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		releaseStagingName(name)
		closeFD(sd)
		return nil, fmt.Errorf("create staging file: %w", err)
	}
	created(sd, name)
	return f, nil
}

// place links or renames the finished file to pfd/name, never replacing
// anything there.
func (f *stagedFile) place(pfd int, name string) error {
	if f.named == "" {
		if err := unix.Linkat(unix.AT_FDCWD, fdPath(f.fd), pfd, name, unix.AT_SYMLINK_FOLLOW); err != nil {
			return fmt.Errorf("link into upper: %w", err)
		}
		return nil
	}
	// A staging name next to the target is in the upper, where a running
	// container can swap it: only the file written here goes into place.
	if err := checkEntry(f.sd, f.named, f.fd); err != nil {
		return fmt.Errorf("staged file %w", err)
	}
	if err := unix.Renameat2(f.sd, f.named, pfd, name, unix.RENAME_NOREPLACE); err != nil {
		return fmt.Errorf("link into upper: %w", err)
	}
	f.named = ""
	return checkEntry(pfd, name, f.fd)
}

// close drops the file and, if it never got placed, its staging name.
func (f *stagedFile) close() {
	if f.named != "" {
		removeStaged(f.sd, f.named, f.fd)
	}
	closeFD(f.fd)
	if f.reserved != "" {
		releaseStagingName(f.reserved)
	}
	closeFD(f.sd)
}

// stageDir is where non-regular entries are built before the rename: the
// work dir when set, else the target directory itself.
func (v *view) stageDir(pfd int) (int, error) {
	if v.s.cfg.workDir == "" {
		return unix.Dup(pfd)
	}
	return openDir(v.s.cfg.workDir)
}
