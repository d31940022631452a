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
var capCache sync.Map // uint64 dev -> *Caps guarded by capMu

var capMu sync.Mutex

func capsFor(dev uint64) Caps {
	if c, ok := capCache.Load(dev); ok {
		return *c.(*Caps)
	}
	return Caps{}
}

func learnCaps(dev uint64, f func(*Caps)) {
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
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return Caps{}, fmt.Errorf("probe %s: %w", dir, err)
	}
	if c := capsFor(st.Dev); c.Reflink != Unknown && c.CopyFileRange != Unknown &&
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
	capCache.Store(st.Dev, &c)
	capMu.Unlock()
	return c, nil
}

// unsupported reports errors that mean "this filesystem cannot do that at
// all", as opposed to a failure of this one call.
func unsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTTY) ||
		errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EINVAL)
}
