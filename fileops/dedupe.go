package fileops

import (
	"context"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// dedupeChunk bounds one FIDEDUPERANGE call: btrfs compares at most 16 MiB
// per call and the kernel may stop early on any filesystem.
const dedupeChunk = 16 << 20

// OpenBeneath opens rel read-only below the directory open as root,
// following no symlink and never leaving root (openat2 RESOLVE_BENEATH |
// RESOLVE_NO_SYMLINKS), and refusing a last component that is a symlink.
// It is for callers outside fileops that read files of a layer they hold
// by descriptor: a layer's symlinks are its data, not directions.
func OpenBeneath(root *os.File, rel string) (*os.File, error) {
	fd, err := openBeneath(int(root.Fd()), rel, unix.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, &os.PathError{Op: "openat2", Path: root.Name() + "/" + rel, Err: err}
	}
	return os.NewFile(uintptr(fd), root.Name()+"/"+rel), nil
}

// DedupeFiles makes the first length bytes of dst share the extents of the
// same bytes of src wherever the two are equal, with FIDEDUPERANGE: the
// kernel locks both ranges, compares them byte for byte and remaps only if
// they are equal, so dst's content never changes and nothing that differs
// is ever shared. It stops at the first range that differs and reports the
// bytes shared until then, and whether a range differed.
//
// dst may be open read-only: the kernel lets its owner, or CAP_SYS_ADMIN,
// dedupe into it, and a read-only open cannot change it otherwise. A
// filesystem that cannot dedupe gives an error wrapping
// errors.ErrUnsupported.
func DedupeFiles(ctx context.Context, src, dst int, srcOff, dstOff, length int64) (shared int64, differs bool, err error) {
	for shared < length {
		if err := ctx.Err(); err != nil {
			return shared, false, err
		}
		arg := unix.FileDedupeRange{
			Src_offset: uint64(srcOff + shared),
			Src_length: uint64(min(dedupeChunk, length-shared)),
			Info:       []unix.FileDedupeRangeInfo{{Dest_fd: int64(dst), Dest_offset: uint64(dstOff + shared)}},
		}
		if err := unix.IoctlFileDedupeRange(src, &arg); err != nil {
			if unsupported(err) {
				err = fmt.Errorf("%w: %w", errors.ErrUnsupported, err)
			}
			return shared, false, fmt.Errorf("FIDEDUPERANGE: %w", err)
		}
		info := arg.Info[0]
		if info.Status < 0 {
			return shared, false, fmt.Errorf("FIDEDUPERANGE: %w", unix.Errno(-info.Status))
		}
		if info.Status == unix.FILE_DEDUPE_RANGE_DIFFERS {
			return shared, true, nil
		}
		if info.Bytes_deduped == 0 {
			return shared, false, nil
		}
		shared += int64(info.Bytes_deduped)
	}
	return shared, false, nil
}
