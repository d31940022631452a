package fileops

import (
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// Support is a three-valued answer: not yet known, yes, no.
type Support int8

const (
	Unknown Support = iota
	Yes
	No
)

func (s Support) String() string { return [...]string{"unknown", "yes", "no"}[s] }

// Caps is what one filesystem (one st_dev) can do for fileops.
type Caps struct {
	Reflink       Support // FICLONE / FICLONERANGE
	CopyFileRange Support // copy_file_range within the filesystem
	TrustedXattr  Support // trusted.* (overlay's default namespace)
	UserXattr     Support // user.* (overlay's userxattr namespace)
}

// capCache is process wide: a filesystem's abilities do not change while it
// is mounted, and a failed FICLONE per file would cost a syscall each.
var capCache sync.Map // fsKey -> *Caps, written under capMu

var capMu sync.Mutex

// fsKey names one mounted filesystem. st_dev alone is not enough: a loop
// device number comes back for the next filesystem attached to it, so the
// unique mount id (statx STATX_MNT_ID_UNIQUE, never reused while the
// system runs) goes with it.
type fsKey struct {
	dev uint64
	mnt uint64
}

func fsKeyOf(fd int) (fsKey, error) {
	var stx unix.Statx_t
	if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_MNT_ID_UNIQUE|unix.STATX_MNT_ID, &stx); err != nil {
		return fsKey{}, err
	}
	return fsKey{dev: unix.Mkdev(stx.Dev_major, stx.Dev_minor), mnt: stx.Mnt_id}, nil
}

func capsFor(dev fsKey) Caps {
	if c, ok := capCache.Load(dev); ok {
		return *c.(*Caps)
	}
	return Caps{}
}

func learnCaps(dev fsKey, f func(*Caps)) {
	capMu.Lock()
	defer capMu.Unlock()
	c := capsFor(dev)
	f(&c)
	capCache.Store(dev, &c)
}

// ProbeCaps tests the filesystem holding dir with two unnamed temporary
// files (O_TMPFILE, so nothing is left behind) and caches the answer for
// every later operation on that filesystem.
func ProbeCaps(dir string) (Caps, error) {
	dfd, err := openDir(dir)
	if err != nil {
		return Caps{}, fmt.Errorf("probe %s: %w", dir, err)
	}
	defer closeFD(dfd)
	key, err := fsKeyOf(dfd)
	if err != nil {
		return Caps{}, fmt.Errorf("probe %s: %w", dir, err)
	}
	if c := capsFor(key); c.Reflink != Unknown && c.CopyFileRange != Unknown &&
		c.TrustedXattr != Unknown && c.UserXattr != Unknown {
		return c, nil
	}
	tmp := func() (int, error) {
		return unix.Open(dir, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	}
	a, err := tmp()
	if err != nil {
		return Caps{}, fmt.Errorf("probe %s: O_TMPFILE: %w", dir, err)
	}
	defer closeFD(a)
	b, err := tmp()
	if err != nil {
		return Caps{}, fmt.Errorf("probe %s: O_TMPFILE: %w", dir, err)
	}
	defer closeFD(b)
	block := make([]byte, 64<<10)
	block[0] = 1
	if _, err := unix.Pwrite(a, block, 0); err != nil {
		return Caps{}, fmt.Errorf("probe %s: write: %w", dir, err)
	}
	c := Caps{Reflink: No, CopyFileRange: No, TrustedXattr: No, UserXattr: No}
	if unix.IoctlFileClone(b, a) == nil {
		c.Reflink = Yes
	}
	var off0, off1 int64
	if n, err := unix.CopyFileRange(a, &off0, b, &off1, 1, 0); err == nil && n == 1 {
		c.CopyFileRange = Yes
	}
	if unix.Fsetxattr(a, "trusted.overclone.probe", []byte("1"), 0) == nil {
		c.TrustedXattr = Yes
	}
	if unix.Fsetxattr(a, "user.overclone.probe", []byte("1"), 0) == nil {
		c.UserXattr = Yes
	}
	capMu.Lock()
	capCache.Store(key, &c)
	capMu.Unlock()
	return c, nil
}

// unsupported reports errors that mean "this filesystem cannot do that at
// all", as opposed to a failure of this one call. EINVAL is not one: btrfs
// refuses a clone between files of different checksum modes with it.
func unsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTTY) ||
		errors.Is(err, unix.ENOSYS)
}
