package fileops

import (
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// OCI image-layer whiteout names, honoured only with WithTarWhiteouts.
const (
	tarWhiteoutPrefix = ".wh."
	tarOpaqueMarker   = ".wh..wh..opq"
)

type probeState uint8

const (
	absent probeState = iota
	whitedOut
	present
)

// probe looks name up in one layer directory and classifies it.
//
// A whiteout is a 0/0 character device (hard links of one another are
// normal) or, since Linux 6.7, a zero-size regular file carrying
// overlay.whiteout. The kernel's lookup honours the xattr form wherever it
// is (measured here: stat hides the name even in the upper or in a lower
// dir not marked opaque=x), while its readdir only filters it in marked
// lower dirs. fileops follows lookup everywhere, so Resolve and ReadDir
// always agree: such a name is hidden from both.
func (v *view) probe(dirfd int, name string) (unix.Stat_t, probeState, error) {
	var st unix.Stat_t
	if v.s.cfg.tarWhiteouts && strings.HasPrefix(name, tarWhiteoutPrefix) {
		return st, absent, nil
	}
	// An interrupted copy's staging name is not content (CleanStaging).
	if isStagingName(name) {
		return st, absent, nil
	}
	if err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if !notHere(err) {
			return st, absent, err
		}
		if v.s.cfg.tarWhiteouts {
			var wst unix.Stat_t
			if unix.Fstatat(dirfd, tarWhiteoutPrefix+name, &wst, unix.AT_SYMLINK_NOFOLLOW) == nil {
				return st, whitedOut, nil
			}
		}
		return st, absent, nil
	}
	wo, err := v.isWhiteout(dirfd, name, &st)
	if err != nil {
		return st, absent, err
	}
	if wo {
		return st, whitedOut, nil
	}
	return st, present, nil
}

func (v *view) isWhiteout(dirfd int, name string, st *unix.Stat_t) (bool, error) {
	if v.s.cfg.verbatim {
		return false, nil
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFCHR:
		return st.Rdev == 0, nil
	case unix.S_IFREG:
		if st.Size != 0 {
			return false, nil
		}
		_, ok, err := getXattr(procPath(dirfd, name), v.s.prefix()+"whiteout")
		return ok, err
	}
	return false, nil
}

// dirMeta reads what makes a layer directory stop or redirect a lookup:
// opaque ('y' hides the layers below; 'x' only marks xattr whiteouts
// inside) and the redirect target.
func (v *view) dirMeta(dirfd int, name string) (opaque bool, redirect string, err error) {
	if v.s.cfg.verbatim {
		return false, "", nil
	}
	p := procPath(dirfd, name)
	val, _, err := getXattr(p, v.s.prefix()+"opaque")
	if err != nil {
		return false, "", err
	}
	opaque = string(val) == "y"
	if !opaque && v.s.cfg.tarWhiteouts {
		fd, err := openBeneath(dirfd, name+"/"+tarOpaqueMarker, unix.O_PATH|unix.O_NOFOLLOW, 0)
		if err == nil {
			closeFD(fd)
			opaque = true
		}
	}
	if opaque {
		return opaque, "", nil
	}
	r, ok, err := getXattr(p, v.s.prefix()+"redirect")
	if err != nil || !ok {
		return opaque, "", err
	}
	return opaque, string(r), nil
}

// validRedirect checks a redirect the way the kernel does: an absolute path
// of valid names, or a single name for a rename inside the same parent.
// The kernel fails the lookup of a dir with an invalid redirect with
// EINVAL (measured here), and so does fileops.
func validRedirect(r string) (string, error) {
	if r == "" || strings.IndexByte(r, 0) >= 0 {
		return "", fmt.Errorf("redirect %q: %w: %w", r, ErrInvalidPath, unix.EINVAL)
	}
	if r[0] == '/' {
		for _, c := range strings.Split(r[1:], "/") {
			if c == "" || c == "." || c == ".." {
				return "", fmt.Errorf("redirect %q: %w: %w", r, ErrInvalidPath, unix.EINVAL)
			}
		}
		return r, nil
	}
	if strings.IndexByte(r, '/') >= 0 || r == "." || r == ".." {
		return "", fmt.Errorf("redirect %q: %w: %w", r, ErrInvalidPath, unix.EINVAL)
	}
	return r, nil
}

// isMetacopy reports overlay.metacopy on a regular file: its data is in
// the next regular file below (any value, even empty, marks it).
func (v *view) isMetacopy(dirfd int, name string) (bool, error) {
	if v.s.cfg.verbatim {
		return false, nil
	}
	_, ok, err := getXattr(procPath(dirfd, name), v.s.prefix()+"metacopy")
	return ok, err
}
