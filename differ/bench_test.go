package differ

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/plugins/diff/walking"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/loopfs"
	"github.com/overclone/overclone/test/require"
)

// BenchmarkCompare times overclone's differ against containerd's walking
// differ on the same mounts, interleaved, and reports the medians and
// their ratio:
//
//	go test -run '^$' -bench BenchmarkCompare -benchtime 1x ./differ/
//
// "10files": a container that changed 10 files on a Debian-sized image
// (debianLike: a minbase-like base layer and a package layer, ~9000
// entries), gzip as containerd's default. "1GiB": a container that
// rewrote a 1 GiB file, uncompressed, so that what is timed is the
// differs and not gzip; the file is sparse, so the data read is the same
// for both and the time is writing the tar into the content store.
func BenchmarkCompare(b *testing.B) {
	require.Root(b, "mounts overlays and loop filesystems")
	mnt := loopfs.MountSize(b, loopfs.XFS, 8<<30)
	ctx := context.Background()
	b.Run("10files", func(b *testing.B) {
		st := debianLike(b, mnt, func(merged string) {
			for i := 0; i < 5; i++ {
				f, err := os.OpenFile(filepath.Join(merged, fmt.Sprintf("etc/conf%d.conf", i)), os.O_WRONLY|os.O_APPEND, 0)
				must(b, err)
				_, err = f.WriteString("changed by the container\n")
				must(b, err)
				must(b, f.Close())
				must(b, os.WriteFile(filepath.Join(merged, fmt.Sprintf("root/new%d.txt", i)), []byte("new\n"), 0o644))
			}
		})
		compareSpeed(b, ctx, st, ocispec.MediaTypeImageLayerGzip, 8)
	})
	b.Run("1GiB", func(b *testing.B) {
		st := debianLike(b, mnt, func(merged string) {
			p := filepath.Join(merged, "var/lib/big.img")
			must(b, os.Remove(p))
			f, err := os.Create(p)
			must(b, err)
			must(b, f.Truncate(1<<30))
			_, err = f.WriteAt([]byte("rewritten"), 1<<29)
			must(b, err)
			must(b, f.Close())
		})
		compareSpeed(b, ctx, st, ocispec.MediaTypeImageLayer, 4)
	})
}

// compareSpeed runs both differs n times each, alternating, and reports
// the medians.
func compareSpeed(b *testing.B, ctx context.Context, st *testStack, mediaType string, n int) {
	ours, store := newTestDiffer(b, st.root)
	walkStore := newStore(b)
	walk := walking.NewWalkingDiff(walkStore)
	// Wall time, and the CPU time (user and system) of this process,
	// which a loaded machine disturbs less: the walking differ's walks
	// and mounts run in this process too. The order alternates, and each
	// layer is deleted before the next Compare, so that neither differ
	// always runs in the page cache the other just filled.
	var tw, to, cw, co []time.Duration
	var dw, do string
	run := func(c diff.Comparer, s content.Store, wall, cpu *[]time.Duration) string {
		unix.Sync()
		start, c0 := time.Now(), cpuTime(b)
		desc, err := c.Compare(ctx, st.parentView(), st.activeMounts(), diff.WithMediaType(mediaType))
		must(b, err)
		*wall, *cpu = append(*wall, time.Since(start)), append(*cpu, cpuTime(b)-c0)
		must(b, s.Delete(ctx, desc.Digest))
		return desc.Digest.String()
	}
	for i := 0; i < n; i++ {
		if i%2 == 0 {
			dw = run(walk, walkStore, &tw, &cw)
			do = run(ours, store, &to, &co)
		} else {
			do = run(ours, store, &to, &co)
			dw = run(walk, walkStore, &tw, &cw)
		}
	}
	if dw != do {
		b.Errorf("layers differ: walking %s, overclone %s", dw, do)
	}
	mw, mo := median(tw), median(to)
	b.ReportMetric(float64(mw.Microseconds())/1000, "ms-walking")
	b.ReportMetric(float64(mo.Microseconds())/1000, "ms-overclone")
	b.ReportMetric(float64(mw)/float64(mo), "x-faster")
	b.Logf("walking %v (median of %v), overclone %v (median of %v): %.1fx", mw, tw, mo, to, float64(mw)/float64(mo))
	mcw, mco := median(cw), median(co)
	b.ReportMetric(float64(mcw.Microseconds())/1000, "cpu-ms-walking")
	b.ReportMetric(float64(mco.Microseconds())/1000, "cpu-ms-overclone")
	b.Logf("CPU time: walking %v (median of %v), overclone %v (median of %v): %.1fx", mcw, cw, mco, co, float64(mcw)/float64(mco))
}

// cpuTime is the user and system time this process used so far.
func cpuTime(t testing.TB) time.Duration {
	var ru unix.Rusage
	must(t, unix.Getrusage(unix.RUSAGE_SELF, &ru))
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// debianLike builds a two-layer image the size and shape of a Debian
// minbase (deep /usr trees of mostly small files, a few large ones,
// symlinks, /etc, a package layer that adds and changes files and a 1 GiB
// sparse file), then lets change act on a container on it.
func debianLike(t testing.TB, mnt string, change func(merged string)) *testStack {
	t.Helper()
	base, err := os.MkdirTemp(mnt, "debian")
	must(t, err)
	st := newTestStack(t, base, variants[0].opts)
	rng := rand.New(rand.NewSource(12))
	l1 := st.addLayer(t)
	write := func(p string, size int) {
		must(t, os.MkdirAll(filepath.Dir(p), 0o755))
		data := make([]byte, size)
		rng.Read(data[:min(size, 64)])
		must(t, os.WriteFile(p, data, 0o644))
	}
	size := func() int {
		switch x := rng.Intn(100); {
		case x < 70:
			return 256 + rng.Intn(4<<10)
		case x < 98:
			return 4<<10 + rng.Intn(28<<10)
		default:
			return 32<<10 + rng.Intn(224<<10)
		}
	}
	for i := 0; i < 1500; i++ {
		write(filepath.Join(l1, fmt.Sprintf("usr/lib/x86_64-linux-gnu/lib%d.so.1", i)), size())
	}
	for i := 0; i < 600; i++ {
		write(filepath.Join(l1, fmt.Sprintf("usr/bin/tool%d", i)), size())
		must(t, os.Symlink(fmt.Sprintf("tool%d", i), filepath.Join(l1, fmt.Sprintf("usr/bin/alias%d", i))))
	}
	for i := 0; i < 700; i++ {
		for j := 0; j < 4; j++ {
			write(filepath.Join(l1, fmt.Sprintf("usr/share/doc/pkg%d/file%d", i, j)), size())
		}
	}
	for i := 0; i < 1500; i++ {
		write(filepath.Join(l1, fmt.Sprintf("usr/share/locale/l%d/LC_MESSAGES/m%d.mo", i%100, i)), size())
	}
	for i := 0; i < 200; i++ {
		write(filepath.Join(l1, fmt.Sprintf("etc/conf%d.conf", i)), 300)
	}
	for _, d := range []string{"root", "tmp", "var/lib", "var/log", "home", "proc", "sys", "dev"} {
		must(t, os.MkdirAll(filepath.Join(l1, d), 0o755))
	}
	l2 := st.addLayer(t)
	for i := 0; i < 400; i++ {
		write(filepath.Join(l2, fmt.Sprintf("usr/lib/python3/dist-packages/mod%d/__init__.py", i)), size())
	}
	big, err := os.Create(filepath.Join(l2, "var/lib/big.img"))
	if os.IsNotExist(err) {
		must(t, os.MkdirAll(filepath.Join(l2, "var/lib"), 0o755))
		big, err = os.Create(filepath.Join(l2, "var/lib/big.img"))
	}
	must(t, err)
	must(t, big.Truncate(1<<30))
	must(t, big.Close())
	st.addLayer(t)
	st.mountTop(t, change)
	return st
}
