package overlayutil

import (
	"errors"
	"fmt"
	"os"

	"github.com/containerd/continuity/fs"
	"golang.org/x/sys/unix"
)

// probeTrustedXattr writes a trusted.overlay.* xattr on a file under the
// root, which is what overlayfs does in its upper layer unless it runs with
// userxattr. Only a task with CAP_SYS_ADMIN in the initial user namespace
// may write trusted.* xattrs, so this fails in a rootless or user-namespaced
// daemon, and on filesystems without xattrs.
func probeTrustedXattr(p *prober) error {
	var result error
	p.run(Check{Name: "trusted-xattr"}, func(s *scratch, _ *Check) error {
		if err := s.writeFile("f", ""); err != nil {
			result = err
			return err
		}
		if err := unix.Lsetxattr(s.path("f"), "trusted.overlay.probe", []byte("y"), 0); err != nil {
			result = fmt.Errorf("set trusted.overlay.probe on %s: %w", s.path("f"), err)
		}
		return result
	})
	return result
}

// checkUserXattr answers "does overlay need userxattr here", as containerd's
// NeedsUserXAttr does, but from what the kernel does rather than whether we
// run in a user namespace and how old the kernel is: userxattr is needed
// when trusted.overlay.* cannot be written, and then only if an overlay
// with userxattr really mounts.
func (p *prober) checkUserXattr() Check {
	c := Check{Name: CheckUserXattrNeeded}
	if p.trustedErr == nil {
		c.Reason = "trusted.overlay.* xattrs are writable under the root (privileged in the initial user namespace)"
		return c
	}
	return p.run(c, func(s *scratch, c *Check) error {
		opts, err := p.layers(s, 2, true, "userxattr")
		if err != nil {
			return err
		}
		if err := s.overlay("merged", 0, opts...); err != nil {
			return fmt.Errorf("trusted xattrs not writable (%v), and overlay with userxattr does not mount: %w", p.trustedErr, err)
		}
		c.OK = true
		c.Value = "userxattr"
		c.Reason = fmt.Sprintf("trusted xattrs not writable: %v", p.trustedErr)
		return nil
	})
}

// checkOverlay mounts a writable overlay on the backing filesystem, writes
// and deletes through it, and when that fails tells why in words an
// operator can act on.
func (p *prober) checkOverlay() Check {
	return p.run(Check{Name: CheckOverlay}, func(s *scratch, c *Check) error {
		dtype, err := fs.SupportsDType(s.dir)
		if err != nil {
			return fmt.Errorf("check d_type on %s: %w", s.dir, err)
		}
		if !dtype {
			// overlay still mounts without d_type, with a warning in the
			// kernel log, but it cannot tell whiteouts from files then.
			return fmt.Errorf("the filesystem under %s does not report d_type (an xfs needs ftype=1)", p.root)
		}
		opts, err := p.layers(s, 1, true)
		if err != nil {
			return err
		}
		if err := s.writeFile("l0/f", "lower"); err != nil {
			return err
		}
		if err := s.overlay("merged", 0, opts...); err != nil {
			return p.whyNoOverlay(err)
		}
		if err := os.WriteFile(s.path("merged/new"), []byte("x"), 0o644); err != nil {
			return fmt.Errorf("write through the overlay: %w", err)
		}
		if err := os.Remove(s.path("merged/f")); err != nil {
			return fmt.Errorf("delete a lower file through the overlay: %w", err)
		}
		if _, err := os.Lstat(s.path("merged/f")); !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("a deleted lower file is still visible in %s: %v", s.path("merged"), err)
		}
		c.OK = true
		if fsTypeName(p.root) == "tmpfs" {
			c.Reason = "root on tmpfs: snapshots do not survive a reboot"
		}
		return nil
	})
}

func (p *prober) whyNoOverlay(err error) error {
	switch {
	case fsTypeName(p.root) == "overlay":
		return fmt.Errorf("root %s is itself on overlayfs, which the kernel does not take as upper layer: %w", p.root, err)
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("no permission to mount (needs CAP_SYS_ADMIN over the mount namespace): %w", err)
	case errors.Is(err, unix.ENODEV):
		return fmt.Errorf("the kernel has no overlay filesystem (modprobe overlay): %w", err)
	}
	return err
}

// checkMultipleLowers mounts a read-only stack of two lowers, the shape of
// every committed view with a parent.
func (p *prober) checkMultipleLowers() Check {
	return p.needsMount(Check{Name: CheckMultipleLowers}, func(s *scratch, c *Check) error {
		opts, err := p.layers(s, 2, false)
		if err != nil {
			return err
		}
		if err := s.writeFile("l1/bottom", "b"); err != nil {
			return err
		}
		if err := s.overlay("merged", unix.MS_RDONLY, opts...); err != nil {
			return err
		}
		if _, err := os.Stat(s.path("merged/bottom")); err != nil {
			return fmt.Errorf("the bottom lower is not visible through the mount: %w", err)
		}
		c.OK = true
		return nil
	})
}

// checkIndexOff mounts with index=off, which containerd passes so that one
// lower can be in several overlays at once (with index=on the kernel
// refuses a lower already used by another mount's index).
func (p *prober) checkIndexOff() Check {
	return p.needsMount(Check{Name: CheckIndexOff}, func(s *scratch, c *Check) error {
		opts, err := p.layers(s, 2, true, "index=off")
		if err != nil {
			return err
		}
		if err := s.overlay("merged", 0, opts...); err != nil {
			return err
		}
		c.OK = true
		return nil
	})
}

// checkRedirectDir renames a lower directory through a mount with
// redirect_dir=on. Without redirects the kernel answers EXDEV; with them
// the renamed directory in the upper layer carries a redirect xattr naming
// where its lower contents are.
func (p *prober) checkRedirectDir() Check {
	return p.needsMount(Check{Name: CheckRedirectDir}, func(s *scratch, c *Check) error {
		opts, err := p.layers(s, 1, true, "redirect_dir=on")
		if err != nil {
			return err
		}
		if err := s.writeFile("l0/a/f", "x"); err != nil {
			return err
		}
		if err := s.overlay("merged", 0, opts...); err != nil {
			return p.userxattrConflict("redirect_dir", err)
		}
		if err := os.Rename(s.path("merged/a"), s.path("merged/b")); err != nil {
			return fmt.Errorf("rename a lower dir through the mount: %w", err)
		}
		if _, err := os.Stat(s.path("merged/b/f")); err != nil {
			return fmt.Errorf("renamed lower dir lost its contents: %w", err)
		}
		v, err := privateXattr(s.path("upper/b"), "redirect", p.base)
		if err != nil {
			return fmt.Errorf("renamed dir has no redirect xattr: %w", err)
		}
		c.OK = true
		c.Value = "redirect=" + v
		return nil
	})
}

// checkMetacopy changes the mode of a lower file through a mount with
// metacopy=on: the kernel should copy up metadata only, marking the upper
// file with a metacopy xattr and leaving its data in the lower.
func (p *prober) checkMetacopy() Check {
	return p.needsMount(Check{Name: CheckMetacopy}, func(s *scratch, c *Check) error {
		opts, err := p.layers(s, 1, true, "redirect_dir=on", "metacopy=on")
		if err != nil {
			return err
		}
		if err := s.writeFile("l0/f", "lower data"); err != nil {
			return err
		}
		if err := s.overlay("merged", 0, opts...); err != nil {
			return p.userxattrConflict("metacopy", err)
		}
		if err := os.Chmod(s.path("merged/f"), 0o600); err != nil {
			return fmt.Errorf("chmod a lower file through the mount: %w", err)
		}
		if _, err := privateXattr(s.path("upper/f"), "metacopy", p.base); err != nil {
			return fmt.Errorf("chmod copied up the whole file, no metacopy xattr: %w", err)
		}
		data, err := os.ReadFile(s.path("merged/f"))
		if err != nil || string(data) != "lower data" {
			return fmt.Errorf("metacopy file reads %q, %v; want the lower data", data, err)
		}
		c.OK = true
		return nil
	})
}

// userxattrConflict explains a refused redirect_dir or metacopy mount under
// userxattr: the kernel turns both off there (a user could otherwise forge
// user.overlay.redirect to reach files it may not read) and says so only
// in the kernel log, not to the mounting task.
func (p *prober) userxattrConflict(option string, err error) error {
	for _, o := range p.base {
		if o == "userxattr" {
			return fmt.Errorf("the kernel refuses %s with userxattr: %w", option, err)
		}
	}
	return err
}

// checkVolatile mounts with volatile, which skips every sync to the upper
// layer; the kernel marks the workdir so that a later mount knows the upper
// may be inconsistent after a crash.
func (p *prober) checkVolatile() Check {
	return p.needsMount(Check{Name: CheckVolatile}, func(s *scratch, c *Check) error {
		opts, err := p.layers(s, 1, true, "volatile")
		if err != nil {
			return err
		}
		if err := s.overlay("merged", 0, opts...); err != nil {
			return err
		}
		if _, err := os.Stat(s.path("work/work/incompat/volatile")); err != nil {
			c.Reason = "mounted, but the kernel left no work/incompat/volatile marker"
		}
		c.OK = true
		return nil
	})
}

// xattrValueMax bounds the private xattrs a probe reads: a redirect holds
// at most a path (PATH_MAX), a metacopy a few bytes.
const xattrValueMax = unix.PathMax

// privateXattr reads overlay's private xattr name (redirect, metacopy...)
// from the namespace the mount uses.
func privateXattr(path, name string, base []string) (string, error) {
	prefix := "trusted.overlay."
	for _, o := range base {
		if o == "userxattr" {
			prefix = "user.overlay."
		}
	}
	buf := make([]byte, xattrValueMax)
	n, err := unix.Lgetxattr(path, prefix+name, buf)
	if err != nil {
		return "", fmt.Errorf("get %s%s on %s: %w", prefix, name, path, err)
	}
	return string(buf[:n]), nil
}
