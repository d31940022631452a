package overlayutil

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// depthProbeLimit bounds the search for the deepest stack. The kernel's
// OVL_MAX_STACK has been 500 since 4.x; 1024 leaves room for a kernel that
// raises it while keeping the probe to about ten mounts.
const depthProbeLimit = 1024

// checkLowerdirPlus mounts through the new mount API, adding one lower per
// fsconfig call with "lowerdir+" (kernel 6.8+). That API has no page limit
// on the whole option string, only 256 bytes per value.
func (p *prober) checkLowerdirPlus() Check {
	return p.needsMount(Check{Name: CheckLowerdirPlus}, func(s *scratch, c *Check) error {
		if _, err := p.layers(s, 2, true); err != nil {
			return err
		}
		if err := s.writeFile("l1/bottom", "b"); err != nil {
			return err
		}
		var params [][2]string
		for _, o := range p.base {
			params = append(params, [2]string{o, ""})
		}
		params = append(params,
			[2]string{"lowerdir+", s.path("l0")},
			[2]string{"lowerdir+", s.path("l1")},
			[2]string{"upperdir", s.path("upper")},
			[2]string{"workdir", s.path("work")},
		)
		if err := s.mkdirs("merged"); err != nil {
			return err
		}
		if err := fsmount("overlay", s.path("merged"), params); err != nil {
			return err
		}
		s.track(s.path("merged"))
		if _, err := os.Stat(s.path("merged/bottom")); err != nil {
			return fmt.Errorf("the bottom lower is not visible through the mount: %w", err)
		}
		c.OK = true
		return nil
	})
}

// fsmount mounts fstype on target with the new mount API, one fsconfig call
// per parameter (an empty value sets a flag). Errors carry the kernel's log.
func fsmount(fstype, target string, params [][2]string) error {
	fd, err := unix.Fsopen(fstype, unix.FSOPEN_CLOEXEC)
	if err != nil {
		return fmt.Errorf("fsopen %s: %w", fstype, err)
	}
	defer unix.Close(fd)
	for _, kv := range params {
		if kv[1] == "" {
			err = unix.FsconfigSetFlag(fd, kv[0])
		} else {
			err = unix.FsconfigSetString(fd, kv[0], kv[1])
		}
		if err != nil {
			return fmt.Errorf("fsconfig %s=%s: %w (kernel: %s)", kv[0], kv[1], err, fsLog(fd, fstype))
		}
	}
	if err := unix.FsconfigCreate(fd); err != nil {
		return fmt.Errorf("fsconfig create %s: %w (kernel: %s)", fstype, err, fsLog(fd, fstype))
	}
	mfd, err := unix.Fsmount(fd, unix.FSMOUNT_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("fsmount %s: %w", fstype, err)
	}
	defer unix.Close(mfd)
	if err := unix.MoveMount(mfd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("move mount %s to %s: %w", fstype, target, err)
	}
	return nil
}

// checkMaxLowers finds the deepest read-only stack the kernel mounts, by
// binary search with real mounts. The lowers are named in base 36 and
// passed relative to their parent dir (as containerd's core/mount does
// after compaction) so that even 1024 of them fit in one page: the page
// must not be what limits this answer.
func (p *prober) checkMaxLowers() (Check, int) {
	depth := 0
	c := p.needsMount(Check{Name: CheckMaxLowers}, func(s *scratch, c *Check) error {
		names := make([]string, depthProbeLimit)
		for i := range names {
			names[i] = strconv.FormatInt(int64(i), 36)
			if err := s.mkdirs("d/" + names[i]); err != nil {
				return err
			}
		}
		if err := s.mkdirs("merged"); err != nil {
			return err
		}
		target := s.path("merged")
		try := func(n int) error {
			opts := append(append([]string{}, p.base...), "lowerdir="+strings.Join(names[:n], ":"))
			if err := mountIn(s.path("d"), target, unix.MS_RDONLY, strings.Join(opts, ",")); err != nil {
				return err
			}
			return unmount(target)
		}
		// Two lowers is the least a read-only overlay takes.
		if err := try(2); err != nil {
			return fmt.Errorf("two lowers do not mount: %w", err)
		}
		lo, hi := 2, depthProbeLimit+1 // lo mounts, hi does not
		if err := try(depthProbeLimit); err == nil {
			lo = depthProbeLimit
			c.Reason = fmt.Sprintf("the probe stops at %d", depthProbeLimit)
		}
		var refusal error
		for hi-lo > 1 && lo < depthProbeLimit {
			mid := (lo + hi) / 2
			if err := try(mid); err != nil {
				hi, refusal = mid, err
			} else {
				lo = mid
			}
		}
		depth = lo
		c.OK = true
		c.Value = strconv.Itoa(lo)
		if refusal != nil {
			c.Reason = fmt.Sprintf("%d lowers refused: %s", lo+1, lastWords(refusal))
		}
		return nil
	})
	return c, depth
}

// errTailLen is how much of an error without a known marker lastWords
// keeps: about two lines of a terminal.
const errTailLen = 160

// lastWords keeps the end of a long mount error, which is where the errno
// and the kernel's message are; the option string before it is noise.
func lastWords(err error) string {
	s := err.Error()
	if i := strings.LastIndex(s, "err: "); i >= 0 {
		return s[i+len("err: "):]
	}
	if len(s) > errTailLen {
		return "..." + s[len(s)-errTailLen:]
	}
	return s
}

// mountIn calls mount(2) from dir as working directory, so that relative
// paths in data resolve there. The chdir happens on a locked thread that
// unshares its fs context from the process, and that thread is left locked
// so the Go runtime retires it instead of reusing its changed cwd.
func mountIn(dir, target string, flags uintptr, data string) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			errc <- fmt.Errorf("unshare fs context: %w", err)
			return
		}
		if err := unix.Chdir(dir); err != nil {
			errc <- fmt.Errorf("chdir %s: %w", dir, err)
			return
		}
		if err := unix.Mount("overlay", target, "overlay", flags, data); err != nil {
			err = fmt.Errorf("mount overlay on %s from %s (%d bytes of options): err: %w", target, dir, len(data), err)
			if msg := kernelSays("overlay", strings.Split(data, ",")); msg != "" {
				err = fmt.Errorf("%w (kernel: %s)", err, msg)
			}
			errc <- err
			return
		}
		errc <- nil
	}()
	return <-errc
}
