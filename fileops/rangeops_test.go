package fileops

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/overclone/overclone/test/loopfs"
	"golang.org/x/sys/unix"
)

// kernelCopyRange runs copy_file_range on the merged mount until done.
func kernelCopyRange(merged, src string, so int64, dst string, do, n int64) (int64, error) {
	s, err := os.Open(filepath.Join(merged, src))
	if err != nil {
		return 0, err
	}
	defer s.Close()
	d, err := os.OpenFile(filepath.Join(merged, dst), os.O_WRONLY, 0)
	if err != nil {
		return 0, err
	}
	defer d.Close()
	var total int64
	for total < n {
		c, err := unix.CopyFileRange(int(s.Fd()), &so, int(d.Fd()), &do, int(n-total), 0)
		if err != nil {
			return total, err
		}
		if c == 0 {
			break
		}
		total += int64(c)
	}
	return total, nil
}

// TestRangeOpsAgainstKernel applies the same range operations through the
// kernel's merged mount and through fileops on an identical copy of the
// stack, comparing bytes moved, errors and the resulting files. "a" exists
// in the lower and, changed, in the upper: reading the stale lower version
// would show at once.
func TestRangeOpsAgainstKernel(t *testing.T) {
	needRoot(t)
	ctx := context.Background()
	for _, k := range []loopfs.Kind{loopfs.XFS, loopfs.Btrfs, loopfs.Ext4} {
		t.Run(string(k), func(t *testing.T) {
			mnt := loopfs.Mount(t, k)
			rng := rand.New(rand.NewSource(3))
			rnd := func(n int) []byte { b := make([]byte, n); rng.Read(b); return b }
			lower := filepath.Join(mnt, "lower")
			mustWrite(t, filepath.Join(lower, "a"), rnd(20000), 0o644)
			mustWrite(t, filepath.Join(lower, "b"), rnd(9000), 0o644)
			mustWrite(t, filepath.Join(lower, "c"), rnd(12288), 0o644)
			mustWrite(t, filepath.Join(lower, "d"), rnd(5000), 0o600)
			mustWrite(t, filepath.Join(lower, "e"), rnd(3*65536+100), 0o644)
			fresh := rnd(24000)
			var uppers []string
			for _, n := range []string{"upperK", "upperF"} {
				u := filepath.Join(mnt, n)
				mustWrite(t, filepath.Join(u, "a"), fresh, 0o644) // the copied-up, changed "a"
				uppers = append(uppers, u)
			}
			merged := mountOverlay(t, uppers[0], []string{lower}, "")
			s, err := NewStack(uppers[1], []string{lower})
			if err != nil {
				t.Fatal(err)
			}
			type op struct {
				kind    string
				src     string
				so      int64
				dst     string
				do, n   int64
				wantErr bool
			}
			ops := []op{
				{"copy", "a", 100, "b", 7, 5000, false},           // stale-lower source, unaligned
				{"copy", "a", 4096, "c", 4096, 8192, false},       // aligned: cloned middle
				{"copy", "b", 8000, "c", 20000, 10000, false},     // runs past the source's EOF, leaves a gap
				{"copy", "b", 100000, "a", 0, 10, false},          // source offset past EOF: nothing
				{"copy", "c", 0, "c", 8192, 4096, false},          // same file, apart
				{"copy", "c", 0, "c", 4096, 8192, true},           // same file, overlapping
				{"copy", "a", 0, "d", 0, 4096, false},             // lower-only destination
				{"copy", "a", 10, "d", 4106, 20000, false},        // same misalignment: clone middle, copy head/tail
				{"copy", "a", 0, "a", 30000, 24000, false},        // same file, to past its end
				{"clone", "e", 0, "b", 0, 3*65536 + 100, false},   // clone to the source's EOF over a shorter file
				{"clone", "e", 65536, "d", 65536, 65536, false},   // aligned, past the destination's EOF
				{"copy", "e", 1, "e", 3*65536 + 1000, 300, false}, // same file, unaligned, past EOF
			}
			for i, o := range ops {
				kn, kerr := kernelCopyRange(merged, o.src, o.so, o.dst, o.do, o.n)
				var res RangeResult
				var ferr error
				if o.kind == "clone" {
					res, ferr = s.CloneRange(ctx, o.src, o.so, o.dst, o.do, o.n)
				} else {
					res, ferr = s.CopyRange(ctx, o.src, o.so, o.dst, o.do, o.n)
				}
				name := fmt.Sprintf("op %d %+v", i, o)
				if (kerr != nil) != o.wantErr || (ferr != nil) != o.wantErr {
					t.Fatalf("%s: kernel err %v, fileops err %v, want error %v", name, kerr, ferr, o.wantErr)
				}
				if o.wantErr {
					continue
				}
				if kn != res.Bytes {
					t.Errorf("%s: kernel moved %d bytes, fileops %d (%v)", name, kn, res.Bytes, res.Method)
				}
				e, err := s.Resolve(o.dst)
				if err != nil {
					t.Fatal(err)
				}
				if e.Layer != 0 {
					t.Errorf("%s: destination not copied up", name)
				}
				want := readFile(t, filepath.Join(merged, o.dst))
				got := readFile(t, filepath.Join(e.LayerDir, e.RealPath))
				if !bytes.Equal(want, got) {
					t.Errorf("%s: %s differs from the kernel's (len %d vs %d)", name, o.dst, len(got), len(want))
				}
				if k.Reflinks() && o.so%4096 == o.do%4096 && o.n >= 3*4096 && res.Cloned == 0 {
					t.Errorf("%s: nothing cloned on %s (%v)", name, k, res)
				}
				t.Logf("%s: %v bytes=%d cloned=%d", name, res.Method, res.Bytes, res.Cloned)
			}
			// The lower files are untouched.
			for _, n := range []string{"a", "b", "c", "d"} {
				var st unix.Stat_t
				unix.Stat(filepath.Join(lower, n), &st)
				if st.Size != map[string]int64{"a": 20000, "b": 9000, "c": 12288, "d": 5000}[n] {
					t.Errorf("lower %s changed size to %d", n, st.Size)
				}
			}
		})
	}
}

// TestDedupeRange checks FIDEDUPERANGE on copied-up files: equal data is
// shared and reported, different data reports 0, and a filesystem without
// reflink says unsupported.
func TestDedupeRange(t *testing.T) {
	needRoot(t)
	ctx := context.Background()
	for _, k := range []loopfs.Kind{loopfs.XFS, loopfs.Btrfs, loopfs.Ext4} {
		t.Run(string(k), func(t *testing.T) {
			mnt := loopfs.Mount(t, k)
			lower, upper := filepath.Join(mnt, "lower"), filepath.Join(mnt, "upper")
			mustMkdir(t, upper)
			data := bytes.Repeat([]byte("dedupe me please"), 1<<16) // 1 MiB
			mustWrite(t, filepath.Join(lower, "x"), data, 0o644)
			mustWrite(t, filepath.Join(lower, "y"), data, 0o644)
			other := append([]byte(nil), data...)
			other[0] ^= 0xff
			mustWrite(t, filepath.Join(lower, "z"), other, 0o644)
			s, err := NewStack(upper, []string{lower}, WithDataMethods(MethodCopyFileRange, MethodReadWrite))
			if err != nil {
				t.Fatal(err)
			}
			res, err := s.DedupeRange(ctx, "x", 0, "y", 0, 0)
			if !k.Reflinks() {
				if !errors.Is(err, errors.ErrUnsupported) {
					t.Fatalf("dedupe on %s: %v, want ErrUnsupported", k, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if res.Bytes != int64(len(data)) {
				t.Errorf("deduped %d bytes, want %d", res.Bytes, len(data))
			}
			if !sharedExtents(t, filepath.Join(upper, "y")) {
				t.Errorf("no shared extent after dedupe")
			}
			res, err = s.DedupeRange(ctx, "x", 0, "z", 0, 4096)
			if err != nil || res.Bytes != 0 {
				t.Errorf("dedupe of differing data: %v, %v", res, err)
			}
			if !bytes.Equal(readFile(t, filepath.Join(upper, "z")), other) {
				t.Errorf("dedupe changed data")
			}
		})
	}
}
