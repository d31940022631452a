package fileops

import (
	"context"
	"errors"
	"fmt"
	"io"

	"golang.org/x/sys/unix"
)

// chunk bounds one copy_file_range or read/write step, so a long copy
// checks for cancellation and never holds a huge buffer.
const chunk = 8 << 20

// copyData fills dst (empty, open for writing) with the size bytes of src,
// keeping holes. It tries each allowed method in turn, skipping those the
// capability cache says the filesystem lacks.
func copyData(ctx context.Context, dst, src int, size int64, methods []Method) (Method, int64, error) {
	if size == 0 {
		return MethodNone, 0, nil
	}
	dk, err := fsKeyOf(dst)
	if err != nil {
		return MethodNone, 0, err
	}
	sk, err := fsKeyOf(src)
	if err != nil {
		return MethodNone, 0, err
	}
	sameDev := dk == sk
	var lastErr error
	for _, m := range methods {
		switch m {
		case MethodReflink:
			if capsFor(dk).Reflink == No {
				continue
			}
			err := unix.IoctlFileClone(dst, src)
			if err == nil {
				if capsFor(dk).Reflink == Unknown {
					learnCaps(dk, func(c *Caps) { c.Reflink = Yes })
				}
				return MethodReflink, size, nil
			}
			// EXDEV says nothing about the filesystem itself.
			if sameDev && unsupported(err) {
				learnCaps(dk, func(c *Caps) { c.Reflink = No })
			}
			lastErr = err
		case MethodCopyFileRange:
			if capsFor(dk).CopyFileRange == No {
				continue
			}
			n, err := copySegments(ctx, dst, src, size, cfrCopy)
			if err == nil {
				return MethodCopyFileRange, n, nil
			}
			if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
				return MethodNone, 0, err
			}
			if sameDev && unsupported(err) {
				learnCaps(dk, func(c *Caps) { c.CopyFileRange = No })
			}
			lastErr = err
			// The next method starts over; drop anything written.
			if err := unix.Ftruncate(dst, 0); err != nil {
				return MethodNone, 0, err
			}
		case MethodReadWrite:
			n, err := copySegments(ctx, dst, src, size, rwCopy)
			if err != nil {
				return MethodNone, 0, err
			}
			return MethodReadWrite, n, nil
		}
	}
	if lastErr == nil {
		if size == 0 {
			return MethodNone, 0, nil
		}
		lastErr = unix.EOPNOTSUPP
	}
	return MethodNone, 0, fmt.Errorf("no data method left: %w", lastErr)
}

type rangeCopier func(dst, src int, off, dstOff, n int64) error

// copySegments copies only the data segments of src (SEEK_DATA/SEEK_HOLE)
// and sets the size, so holes stay holes. The kernel's own splice copy
// would fill them (ext4 turns a sparse 1 GiB file into 1 GiB allocated).
func copySegments(ctx context.Context, dst, src int, size int64, cp rangeCopier) (int64, error) {
	var total int64
	for off := int64(0); off < size; {
		data, err := unix.Seek(src, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			// No SEEK_DATA here: treat the file as one data segment.
			data = off
		}
		hole, err := unix.Seek(src, data, unix.SEEK_HOLE)
		if err != nil || hole > size {
			hole = size
		}
		for p := data; p < hole; {
			if err := ctx.Err(); err != nil {
				return total, err
			}
			n := min(hole-p, chunk)
			if err := cp(dst, src, p, p, n); err != nil {
				return total, err
			}
			p += n
			total += n
		}
		off = hole
	}
	if err := unix.Ftruncate(dst, size); err != nil {
		return total, err
	}
	return total, nil
}

// cfrCopy copies [off, off+n) of src to dstOff in dst with copy_file_range.
func cfrCopy(dst, src int, off, dstOff, n int64) error {
	for n > 0 {
		c, err := unix.CopyFileRange(src, &off, dst, &dstOff, int(n), 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if c == 0 {
			return io.ErrUnexpectedEOF
		}
		n -= int64(c)
	}
	return nil
}

var rwBufPool = make(chan []byte, 4)

func rwBuf() []byte {
	select {
	case b := <-rwBufPool:
		return b
	default:
		return make([]byte, 1<<20)
	}
}

func putRWBuf(b []byte) {
	select {
	case rwBufPool <- b:
	default:
	}
}

// rwCopy copies through a userspace buffer; it works between any two files.
func rwCopy(dst, src int, off, dstOff, n int64) error {
	buf := rwBuf()
	defer putRWBuf(buf)
	for n > 0 {
		want := min(int64(len(buf)), n)
		r, err := unix.Pread(src, buf[:want], off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if r == 0 {
			return io.ErrUnexpectedEOF
		}
		for w := 0; w < r; {
			c, err := unix.Pwrite(dst, buf[w:r], dstOff+int64(w))
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return err
			}
			w += c
		}
		off += int64(r)
		dstOff += int64(r)
		n -= int64(r)
	}
	return nil
}
