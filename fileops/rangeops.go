package fileops

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"golang.org/x/sys/unix"
)

// rangeFiles are the two open ends of a range operation.
type rangeFiles struct {
	src, dst       int
	srcSt, dstSt   unix.Stat_t
	srcFS, dstFS   fsKey
	srcEnt, dstEnt Entry
}

func (r *rangeFiles) close() {
	closeFD(r.src)
	closeFD(r.dst)
}

func (r *rangeFiles) sameFile() bool {
	return r.srcSt.Dev == r.dstSt.Dev && r.srcSt.Ino == r.dstSt.Ino
}

// openRange copies up the destination first and only then resolves the
// source: when both name the same lower file, the source is the fresh
// upper copy, and a source copied up earlier is never read from its stale
// lower version (the bug overlayfs had before Linux 4.19).
func (s *Stack) openRange(ctx context.Context, op, src string, srcOff int64, dst string, dstOff, length int64) (*rangeFiles, error) {
	if !s.hasUpper {
		return nil, fmt.Errorf("%s %s to %s: %w", op, src, dst, ErrReadOnly)
	}
	if srcOff < 0 || dstOff < 0 || length < 0 {
		return nil, fmt.Errorf("%s %s to %s: negative offset or length: %w", op, src, dst, unix.EINVAL)
	}
	srel, err := cleanPath(src)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	drel, err := cleanPath(dst)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	v := s.newView()
	defer v.close()
	de, err := v.resolve(drel)
	if err != nil {
		return nil, fmt.Errorf("%s destination: %w", op, err)
	}
	if de.Kind != KindFile {
		return nil, fmt.Errorf("%s destination %s in layer %s is a %s: %w", op, drel, de.LayerDir, de.Kind, unix.EINVAL)
	}
	s.mu.Lock()
	_, de, err = v.copyUp(ctx, drel)
	s.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("%s destination: %w", op, err)
	}
	se, err := v.resolve(srel)
	if err != nil {
		return nil, fmt.Errorf("%s source: %w", op, err)
	}
	if se.Kind != KindFile {
		return nil, fmt.Errorf("%s source %s in layer %s is a %s: %w", op, srel, se.LayerDir, se.Kind, unix.EINVAL)
	}
	r := &rangeFiles{src: -1, dst: -1, srcEnt: se, dstEnt: de}
	if r.src, err = v.openData(se); err != nil {
		return nil, fmt.Errorf("%s source %s in layer %s: %w", op, srel, se.LayerDir, err)
	}
	// Never O_APPEND: FICLONERANGE refuses it with EBADF.
	if r.dst, err = v.openFile(de, unix.O_RDWR); err != nil {
		r.close()
		return nil, fmt.Errorf("%s destination %s in layer %s: %w", op, drel, de.LayerDir, err)
	}
	if err := unix.Fstat(r.src, &r.srcSt); err != nil {
		r.close()
		return nil, err
	}
	if err := unix.Fstat(r.dst, &r.dstSt); err != nil {
		r.close()
		return nil, err
	}
	if r.srcFS, err = fsKeyOf(r.src); err == nil {
		r.dstFS, err = fsKeyOf(r.dst)
	}
	if err != nil {
		r.close()
		return nil, err
	}
	return r, nil
}

// openFile opens the real file of a resolved entry beneath its layer.
func (v *view) openFile(e Entry, flags int) (int, error) {
	root, err := v.root(e.Layer)
	if err != nil {
		return -1, err
	}
	return openBeneath(root, e.RealPath, flags|unix.O_NOFOLLOW, 0)
}

// span clips a request to the source's size, as copy_file_range does.
func (r *rangeFiles) span(srcOff, dstOff, length int64) (int64, error) {
	if srcOff >= r.srcSt.Size {
		return 0, nil
	}
	n := min(length, r.srcSt.Size-srcOff)
	// Like the kernel, refuse overlapping ranges of one file: a forward
	// copy would read bytes it has just written.
	if r.sameFile() && srcOff < dstOff+n && dstOff < srcOff+n {
		return 0, fmt.Errorf("overlapping ranges in one file: %w", unix.EINVAL)
	}
	return n, nil
}

// CopyRange copies length bytes at srcOff of the visible file src to
// dstOff of dst, like copy_file_range on the merged mount: the length is
// clipped at the source's end and dst is extended as needed. The
// block-aligned middle is cloned where the filesystem can; the rest goes
// by copy_file_range, else read/write.
func (s *Stack) CopyRange(ctx context.Context, src string, srcOff int64, dst string, dstOff, length int64) (RangeResult, error) {
	return s.copyRange(ctx, "copy range", src, srcOff, dst, dstOff, length, false)
}

// CloneRange is CopyRange with FICLONERANGE's reading of length: 0 means
// up to the source's end.
func (s *Stack) CloneRange(ctx context.Context, src string, srcOff int64, dst string, dstOff, length int64) (RangeResult, error) {
	return s.copyRange(ctx, "clone range", src, srcOff, dst, dstOff, length, true)
}

// copyRange is CopyRange and CloneRange; zeroToEOF reads a length of 0 as
// "up to the source's end".
func (s *Stack) copyRange(ctx context.Context, op, src string, srcOff int64, dst string, dstOff, length int64, zeroToEOF bool) (RangeResult, error) {
	r, err := s.openRange(ctx, op, src, srcOff, dst, dstOff, length)
	if err != nil {
		return RangeResult{}, err
	}
	defer r.close()
	if zeroToEOF && length == 0 {
		length = max(r.srcSt.Size-srcOff, 0)
	}
	n, err := r.span(srcOff, dstOff, length)
	if err != nil || n == 0 {
		return RangeResult{}, s.rangeErr(op, r, err)
	}
	res, err := s.transfer(ctx, r, srcOff, dstOff, n)
	return res, s.rangeErr(op, r, err)
}

func (s *Stack) rangeErr(op string, r *rangeFiles, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s %s (layer %s) to %s (layer %s): %w", op, r.srcEnt.Path, r.srcEnt.LayerDir, r.dstEnt.Path, r.dstEnt.LayerDir, err)
}

// transfer moves n bytes: FICLONERANGE for the block-aligned middle (both
// offsets must sit at the same place within a block), the unaligned head
// and tail by copy.
func (s *Stack) transfer(ctx context.Context, r *rangeFiles, srcOff, dstOff, n int64) (RangeResult, error) {
	res := RangeResult{Bytes: n}
	bs := int64(r.dstSt.Blksize)
	if bs <= 0 {
		bs = 4096
	}
	end := srcOff + n
	canClone := slices.Contains(s.cfg.methods, MethodReflink) && r.srcFS == r.dstFS &&
		capsFor(r.dstFS).Reflink != No && (srcOff-dstOff)%bs == 0
	if canClone {
		mStart := (srcOff + bs - 1) / bs * bs
		mEnd := end / bs * bs
		// A partial last block may be cloned only from the source's EOF to
		// at or past the destination's EOF.
		if end == r.srcSt.Size && dstOff+n >= r.dstSt.Size {
			mEnd = end
		}
		if mStart < mEnd {
			delta := dstOff - srcOff
			m, err := s.copyBytes(ctx, r, srcOff, dstOff, mStart-srcOff)
			if err != nil {
				return res, err
			}
			err = unix.IoctlFileCloneRange(r.dst, &unix.FileCloneRange{
				Src_fd: int64(r.src), Src_offset: uint64(mStart),
				Src_length: uint64(mEnd - mStart), Dest_offset: uint64(mStart + delta),
			})
			if err == nil {
				if _, err := s.copyBytes(ctx, r, mEnd, mEnd+delta, end-mEnd); err != nil {
					return res, err
				}
				res.Cloned = mEnd - mStart
				res.Method = MethodReflink
				if m != MethodNone && res.Cloned*2 < n {
					res.Method = m
				}
				return res, nil
			}
			if unsupported(err) {
				learnCaps(r.dstFS, func(c *Caps) { c.Reflink = No })
			}
		}
	}
	m, err := s.copyBytes(ctx, r, srcOff, dstOff, n)
	res.Method = m
	return res, err
}

// copyBytes copies by copy_file_range, falling back to read/write.
func (s *Stack) copyBytes(ctx context.Context, r *rangeFiles, srcOff, dstOff, n int64) (Method, error) {
	if n <= 0 {
		return MethodNone, nil
	}
	if err := ctx.Err(); err != nil {
		return MethodNone, err
	}
	if slices.Contains(s.cfg.methods, MethodCopyFileRange) && capsFor(r.dstFS).CopyFileRange != No {
		err := cfrCopy(r.dst, r.src, srcOff, dstOff, n)
		if err == nil {
			return MethodCopyFileRange, nil
		}
		// EXDEV: another filesystem, e.g. a host file or a lower layer on
		// a different disk; that is the read/write copy's job.
		if !errors.Is(err, unix.EXDEV) && !errors.Is(err, unix.EINVAL) && !unsupported(err) {
			return MethodNone, err
		}
	}
	for p := int64(0); p < n; p += chunk {
		if err := ctx.Err(); err != nil {
			return MethodNone, err
		}
		if err := rwCopy(r.dst, r.src, srcOff+p, dstOff+p, min(chunk, n-p)); err != nil {
			return MethodNone, err
		}
	}
	return MethodReadWrite, nil
}

// DedupeRange shares length bytes at srcOff of src with dstOff of dst
// where the bytes are equal (FIDEDUPERANGE), copying dst up first. It
// reports the bytes deduped; a range that differs stops it without error.
// A filesystem that cannot dedupe gives an error wrapping
// errors.ErrUnsupported.
func (s *Stack) DedupeRange(ctx context.Context, src string, srcOff int64, dst string, dstOff, length int64) (RangeResult, error) {
	r, err := s.openRange(ctx, "dedupe range", src, srcOff, dst, dstOff, length)
	if err != nil {
		return RangeResult{}, err
	}
	defer r.close()
	if length == 0 {
		length = max(r.srcSt.Size-srcOff, 0)
	}
	n, err := r.span(srcOff, dstOff, length)
	if err != nil || n == 0 {
		return RangeResult{}, s.rangeErr("dedupe range", r, err)
	}
	shared, _, err := DedupeFiles(ctx, r.src, r.dst, srcOff, dstOff, n)
	res := RangeResult{Bytes: shared, Cloned: shared}
	if shared > 0 {
		res.Method = MethodReflink
	}
	if err != nil {
		return res, s.rangeErr("dedupe range", r, err)
	}
	return res, nil
}
