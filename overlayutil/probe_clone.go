package overlayutil

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// Contents of the intercept probe's file before and after its copy-up. They
// differ in every byte so that any mix of the two is caught.
const (
	staleBytes = "lower layer bytes, stale after copy-up"
	freshBytes = "UPPER LAYER BYTES, WRITTEN THROUGH MERGED"
)

// checkReflink clones one file into another under the root with FICLONE.
// It is what makes a full copy-up or a flatten cheap (xfs with reflink=1,
// btrfs); ext4 and tmpfs answer EOPNOTSUPP.
func (p *prober) checkReflink() Check {
	return p.run(Check{Name: CheckReflink}, func(s *scratch, c *Check) error {
		if err := s.writeFile("src", freshBytes); err != nil {
			return err
		}
		if err := s.writeFile("dst", ""); err != nil {
			return err
		}
		src, err := os.Open(s.path("src"))
		if err != nil {
			return err
		}
		defer src.Close()
		dst, err := os.OpenFile(s.path("dst"), os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		defer dst.Close()
		if err := unix.IoctlFileClone(int(dst.Fd()), int(src.Fd())); err != nil {
			return fmt.Errorf("FICLONE between two files on %s: %w", fsTypeName(p.root), err)
		}
		got, err := os.ReadFile(s.path("dst"))
		if err != nil || string(got) != freshBytes {
			return fmt.Errorf("FICLONE succeeded but the clone reads %q, %v", got, err)
		}
		c.OK = true
		return nil
	})
}

// checkIntercepts asks whether the kernel's overlay serves range operations
// on a merged file from the file's current layer. A source fd is opened
// while the file is still only in the lower layer, the file is then copied
// up by writing new bytes through another fd, and the probe copies from the
// old fd with copy_file_range and FICLONE, into a file on the same overlay
// and into a file on the backing filesystem, and reads it.
//
// What counts: the bug that matters is an operation that succeeds and
// hands back the lower's stale bytes. An operation that fails (EXDEV,
// EOPNOTSUPP: a caller falls back to read and write) is not a failure, as
// long as reading through the merged fd and at least one range copy
// within the overlay return the new bytes. On 6.18 every range op from a
// merged file to another filesystem, even the overlay's own upper fs,
// fails with EXDEV.
//
// The check's value lists each outcome: cfr/overlay and clone/overlay are
// copy_file_range and FICLONE into a file on the same overlay, cfr/backing
// and clone/backing into a file on the backing filesystem, read a pread
// through the old fd; each is "new", "STALE" or the errno.
func (p *prober) checkIntercepts() Check {
	return p.needsMount(Check{Name: CheckIntercepts}, func(s *scratch, c *Check) error {
		opts, err := p.layers(s, 1, true)
		if err != nil {
			return err
		}
		if err := s.writeFile("l0/f", staleBytes); err != nil {
			return err
		}
		if err := s.overlay("merged", 0, opts...); err != nil {
			return err
		}
		src, err := os.Open(s.path("merged/f"))
		if err != nil {
			return err
		}
		defer src.Close()
		if err := os.WriteFile(s.path("merged/f"), []byte(freshBytes), 0o644); err != nil {
			return fmt.Errorf("copy up %s by writing: %w", s.path("merged/f"), err)
		}

		type outcome struct{ name, result string }
		var results []outcome
		stale, inOverlayOK := false, false
		for _, op := range []struct {
			name    string
			dst     string
			overlay bool
			clone   bool
		}{
			{"cfr/overlay", "merged/cfr", true, false},
			{"clone/overlay", "merged/clone", true, true},
			{"cfr/backing", "cfr", false, false},
			{"clone/backing", "clone", false, true},
		} {
			got, err := rangeCopy(src, s.path(op.dst), op.clone)
			switch {
			case err != nil:
				results = append(results, outcome{op.name, errnoName(err)})
			case got == freshBytes:
				results = append(results, outcome{op.name, "new"})
				inOverlayOK = inOverlayOK || op.overlay
			case got == staleBytes:
				results = append(results, outcome{op.name, "STALE"})
				stale = true
			default:
				results = append(results, outcome{op.name, fmt.Sprintf("garbage %q", got)})
				stale = true
			}
		}
		buf := make([]byte, len(freshBytes)+8)
		n, err := src.ReadAt(buf, 0)
		readOK := string(buf[:n]) == freshBytes
		read := "new"
		if !readOK {
			read = fmt.Sprintf("%q (%v)", buf[:n], err)
		}
		results = append(results, outcome{"read", read})

		var parts []string
		for _, r := range results {
			parts = append(parts, r.name+"="+r.result)
		}
		c.Value = strings.Join(parts, " ")
		switch {
		case stale:
			return errors.New("a range copy from a copied-up merged file returned the lower's bytes: " + c.Value)
		case !readOK:
			return errors.New("reading a copied-up file through an fd opened before copy-up returns old bytes: " + c.Value)
		case !inOverlayOK:
			return errors.New("no range copy from a merged file succeeded, even within the overlay: " + c.Value)
		}
		c.OK = true
		return nil
	})
}

// rangeCopy copies all of src into a new file at dst with copy_file_range,
// or FICLONE when clone is set, and returns what dst then holds.
func rangeCopy(src *os.File, dst string, clone bool) (string, error) {
	d, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return "", err
	}
	defer d.Close()
	if clone {
		if err := unix.IoctlFileClone(int(d.Fd()), int(src.Fd())); err != nil {
			return "", err
		}
	} else {
		var off, doff int64
		for {
			n, err := unix.CopyFileRange(int(src.Fd()), &off, int(d.Fd()), &doff, len(freshBytes), 0)
			if err != nil {
				return "", err
			}
			if n == 0 {
				break
			}
		}
	}
	var b bytes.Buffer
	if _, err := b.ReadFrom(d); err != nil {
		return "", err
	}
	// d's offset is still 0: range ops and ioctls do not move it.
	return b.String(), nil
}

// errnoName gives the symbolic name of a syscall error (EXDEV rather than
// "invalid cross-device link"), which is what an operator looks up.
func errnoName(err error) string {
	var errno unix.Errno
	if errors.As(err, &errno) {
		if errno == unix.EOPNOTSUPP {
			// Same number as ENOTSUP on Linux; the kernel's name for it.
			return "EOPNOTSUPP"
		}
		if name := unix.ErrnoName(errno); name != "" {
			return name
		}
	}
	return err.Error()
}
