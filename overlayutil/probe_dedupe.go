package overlayutil

import (
	"bytes"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// CheckDedupe names the probe of FIDEDUPERANGE under the root.
const CheckDedupe = "dedupe"

// dedupeProbeSize is a few blocks of any filesystem: FIDEDUPERANGE
// shares whole blocks, and a file smaller than one block may be kept
// inline (btrfs) where there is no extent to share.
const dedupeProbeSize = 256 << 10

// checkDedupe asks the question overclone's layer dedupe depends on: do two
// equal files under the root come to share their extents with
// FIDEDUPERANGE, and is a range that differs refused? xfs with reflink=1
// and btrfs answer yes; ext4, tmpfs and xfs without reflink EOPNOTSUPP.
func (p *prober) checkDedupe() Check {
	return p.run(Check{Name: CheckDedupe}, func(s *scratch, c *Check) error {
		data := bytes.Repeat([]byte(freshBytes), dedupeProbeSize/len(freshBytes)+1)[:dedupeProbeSize]
		other := bytes.Clone(data)
		other[len(other)-1] ^= 0xff
		files := map[string][]byte{"a": data, "b": data, "c": other}
		fds := map[string]*os.File{}
		for name, d := range files {
			if err := os.WriteFile(s.path(name), d, 0o600); err != nil {
				return err
			}
			f, err := os.Open(s.path(name))
			if err != nil {
				return err
			}
			defer f.Close()
			fds[name] = f
		}
		dedupe := func(dst string) (unix.FileDedupeRangeInfo, error) {
			arg := unix.FileDedupeRange{
				Src_length: dedupeProbeSize,
				Info:       []unix.FileDedupeRangeInfo{{Dest_fd: int64(fds[dst].Fd())}},
			}
			err := unix.IoctlFileDedupeRange(int(fds["a"].Fd()), &arg)
			return arg.Info[0], err
		}
		same, err := dedupe("b")
		if err != nil {
			return fmt.Errorf("FIDEDUPERANGE between two equal files on %s: %w", fsTypeName(p.root), err)
		}
		if same.Status < 0 {
			return fmt.Errorf("FIDEDUPERANGE between two equal files on %s: %s", fsTypeName(p.root), errnoName(unix.Errno(-same.Status)))
		}
		if same.Status != unix.FILE_DEDUPE_RANGE_SAME || same.Bytes_deduped == 0 {
			return fmt.Errorf("FIDEDUPERANGE between two equal files on %s shared nothing", fsTypeName(p.root))
		}
		diff, err := dedupe("c")
		if err != nil {
			return fmt.Errorf("FIDEDUPERANGE between two different files on %s: %w", fsTypeName(p.root), err)
		}
		if diff.Status != unix.FILE_DEDUPE_RANGE_DIFFERS {
			return errors.New("FIDEDUPERANGE shared two files that differ in their last byte")
		}
		for name, d := range files {
			got, err := os.ReadFile(s.path(name))
			if err != nil || !bytes.Equal(got, d) {
				return fmt.Errorf("file %s reads differently after FIDEDUPERANGE (%v)", name, err)
			}
		}
		c.OK = true
		return nil
	})
}
