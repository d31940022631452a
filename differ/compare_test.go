package differ

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/containerd/v2/pkg/labels"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/containerd/v2/plugins/diff/walking"
	cfs "github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/loopfs"
	"github.com/overclone/overclone/test/require"
)

// variants are the overlay option sets overclone mounts with: redirect_dir
// for renamed lower dirs, and metacopy, which the kernel uses for chmod
// and chown copy-ups when a mount asks for it.
var variants = []struct {
	name string
	opts []string
}{
	{"redirect", []string{"index=off", "redirect_dir=on"}},
	{"metacopy", []string{"index=off", "redirect_dir=on", "metacopy=on"}},
	{"userxattr", []string{"index=off", "userxattr"}},
}

// TestCompareMatchesWalking builds stacks whose every layer the kernel
// wrote (a random base, then random container work through overlay
// mounts: renamed dirs, opaque dirs, whiteouts, metacopy, hard links), and
// checks that overclone's layer is the walking differ's: byte for byte,
// else entry by entry, and that each applied on the parent gives the
// merged view.
func TestCompareMatchesWalking(t *testing.T) {
	require.Root(t, "mounts overlays and loop filesystems")
	mnt := loopfs.Mount(t, loopfs.XFS)
	ctx := context.Background()
	for _, vr := range variants {
		for seed := int64(1); seed <= 10; seed++ {
			t.Run(fmt.Sprintf("%s/seed%d", vr.name, seed), func(t *testing.T) {
				st := genStack(t, mnt, vr.opts, seed, 1+int(seed%3))
				want, wantDesc := walkingLayer(t, ctx, st, ocispec.MediaTypeImageLayer)
				d, store := newTestDiffer(t, st.root)
				desc, err := d.Compare(ctx, st.parentView(), st.activeMounts(), diff.WithMediaType(ocispec.MediaTypeImageLayer))
				if err != nil {
					t.Fatal(err)
				}
				got := readBlob(t, store, desc)
				// A committed snapshot is compared through a view of it:
				// the same layer, from the view's top lowerdir.
				cdesc, err := d.Compare(ctx, st.parentView(), st.committedView(), diff.WithMediaType(ocispec.MediaTypeImageLayer))
				if err != nil {
					t.Fatal(err)
				}
				if cdesc.Digest != desc.Digest {
					t.Errorf("layer of the committed view %s, of the active snapshot %s", cdesc.Digest, desc.Digest)
				}
				entries, quirks := compareTars(t, want, got)
				if len(quirks) == 0 && desc.Digest != wantDesc.Digest {
					t.Errorf("layer digest %s, walking differ's %s (%d entries)", desc.Digest, wantDesc.Digest, entries)
				}
				t.Logf("%d layers, %d entries, %d bytes, %d names the walking differ re-links", len(st.layers), entries, len(got), len(quirks))
				merged := st.mergedTree(t)
				lower := st.parentTree(t)
				for _, q := range quirks {
					if lower[q] != merged[q] {
						t.Errorf("walking differ re-links %s, which the container changed:\n merged %s\n parent %s", q, merged[q], lower[q])
					}
				}
				compareTreeMaps(t, "overclone's layer applied on the parent vs merged view", merged, st.applyOnParent(t, got), nil)
				compareTreeMaps(t, "walking differ's layer applied on the parent vs merged view", merged, st.applyOnParent(t, want), quirks)
			})
		}
	}
}

// TestCompareMediaTypes checks compression, media types and the
// uncompressed-digest label against the walking differ's.
func TestCompareMediaTypes(t *testing.T) {
	require.Root(t, "mounts overlays and loop filesystems")
	mnt := loopfs.Mount(t, loopfs.XFS)
	ctx := context.Background()
	// A stack without names the walking differ re-links (see relinked), so
	// that both layers are the same bytes.
	st := genStack(t, mnt, variants[1].opts, 3, 1)
	for _, mt := range []string{ocispec.MediaTypeImageLayerGzip, ocispec.MediaTypeImageLayerZstd, ""} {
		t.Run(strings.TrimPrefix(mt, ocispec.MediaTypeImageLayer), func(t *testing.T) {
			wantBlob, want := walkingLayer(t, ctx, st, mt)
			d, store := newTestDiffer(t, st.root)
			var opts []diff.Opt
			if mt != "" {
				opts = append(opts, diff.WithMediaType(mt))
			}
			got, err := d.Compare(ctx, st.parentView(), st.activeMounts(), opts...)
			if err != nil {
				t.Fatal(err)
			}
			if got.MediaType != want.MediaType || got.Digest != want.Digest || got.Size != want.Size {
				t.Errorf("descriptor %+v, walking differ's %+v", got, want)
			}
			info, err := store.Info(ctx, got.Digest)
			if err != nil {
				t.Fatal(err)
			}
			wantUncompressed := uncompressedDigest(t, wantBlob)
			if info.Labels[labels.LabelUncompressed] != wantUncompressed {
				t.Errorf("label %s = %q, want %q", labels.LabelUncompressed, info.Labels[labels.LabelUncompressed], wantUncompressed)
			}
		})
	}
}

// TestCompareNotImplemented checks that what is not overclone's goes to
// the next differ.
func TestCompareNotImplemented(t *testing.T) {
	require.Root(t, "mounts overlays and loop filesystems")
	mnt := loopfs.Mount(t, loopfs.XFS)
	ctx := context.Background()
	st := genStack(t, mnt, variants[0].opts, 7, 2)
	d, _ := newTestDiffer(t, st.root)
	must(t, os.Mkdir(filepath.Join(mnt, "elsewhere"), 0o700))
	other, _ := newTestDiffer(t, filepath.Join(mnt, "elsewhere"))
	// A container can leave a symlink in its upper; named as a layer, it
	// must not lead the differ to the host's files.
	evil := filepath.Join(st.layers[len(st.layers)-1], "evil")
	must(t, os.Symlink("/etc", evil))
	withUpper := func(upper string) []mount.Mount {
		ms := st.activeMounts()
		for i, o := range ms[0].Options {
			if strings.HasPrefix(o, "upperdir=") {
				ms[0].Options[i] = "upperdir=" + upper
			}
		}
		return ms
	}
	must(t, os.Mkdir(filepath.Join(st.layers[len(st.layers)-1], "sub"), 0o755))
	upperOnly := st.activeMounts()
	upperOnly[0].Options = upperOnly[0].Options[:len(upperOnly[0].Options)-1]
	cases := []struct {
		name         string
		d            *Differ
		lower, upper []mount.Mount
	}{
		{"another root", other, st.parentView(), st.activeMounts()},
		{"bind upper", d, nil, []mount.Mount{{Type: "bind", Source: st.layers[0], Options: []string{"rw", "rbind"}}}},
		{"view of other layers", d, []mount.Mount{{Type: "bind", Source: st.layers[1], Options: []string{"ro", "rbind"}}}, st.activeMounts()},
		{"rw lower", d, []mount.Mount{{Type: "bind", Source: st.layers[0], Options: []string{"rw", "rbind"}}}, st.activeMounts()},
		{"no lowerdir", d, st.parentView(), upperOnly},
		{"two mounts", d, st.parentView(), append(st.activeMounts(), st.activeMounts()...)},
		{"view of one layer", d, nil, []mount.Mount{{Type: "bind", Source: st.layers[1], Options: []string{"ro", "rbind"}}}},
		{"symlink in an upper as the upper", d, st.parentView(), withUpper(evil)},
		{"dir in an upper as the upper", d, st.parentView(), withUpper(filepath.Join(st.layers[len(st.layers)-1], "sub"))},
		{"committed view on other layers", d, []mount.Mount{{Type: "bind", Source: st.layers[1], Options: []string{"ro", "rbind"}}}, st.committedView()},
	}
	for _, c := range cases {
		if _, err := c.d.Compare(ctx, c.lower, c.upper); !errdefs.IsNotImplemented(err) {
			t.Errorf("%s: Compare err %v, want NotImplemented", c.name, err)
		}
	}
	// Without containerd's content store the walking differ, inside
	// containerd, still can.
	unreachable, err := New(st.root, newStore(t), WithCallContext(func(context.Context) (context.Context, error) {
		return nil, errors.New("dial containerd: connection refused")
	}))
	must(t, err)
	if _, err := unreachable.Compare(ctx, st.parentView(), st.activeMounts()); !errdefs.IsNotImplemented(err) {
		t.Errorf("Compare with containerd unreachable: err %v, want NotImplemented", err)
	}
	if _, err := d.Apply(ctx, ocispec.Descriptor{}, st.activeMounts()); !errdefs.IsNotImplemented(err) {
		t.Errorf("Apply err %v, want NotImplemented", err)
	}
	if d.Served() != 0 {
		t.Errorf("Served() = %d after refusals", d.Served())
	}
}

// genStack makes a random base, lowers-1 more layers of container work
// on it, and the container's own upper on top.
func genStack(t testing.TB, mnt string, opts []string, seed int64, lowers int) *testStack {
	t.Helper()
	base, err := os.MkdirTemp(mnt, "stack")
	must(t, err)
	rng := rand.New(rand.NewSource(seed))
	st := newTestStack(t, base, opts)
	genBase(t, rng, st.addLayer(t), 80)
	for i := 1; i < lowers; i++ {
		st.addLayer(t)
		st.mountTop(t, func(m string) { mutate(t, rng, m, 15) })
	}
	st.addLayer(t)
	st.mountTop(t, func(m string) { mutate(t, rng, m, 25) })
	return st
}

func newTestDiffer(t testing.TB, root string) (*Differ, content.Store) {
	t.Helper()
	store := newStore(t)
	d, err := New(root, store)
	must(t, err)
	return d, store
}

// walkingLayer is containerd's walking differ's layer of the stack's top
// (the uncompressed tar) and its descriptor.
func walkingLayer(t testing.TB, ctx context.Context, st *testStack, mediaType string) ([]byte, ocispec.Descriptor) {
	t.Helper()
	store := newStore(t)
	var opts []diff.Opt
	if mediaType != "" {
		opts = append(opts, diff.WithMediaType(mediaType))
	}
	desc, err := walking.NewWalkingDiff(store).Compare(ctx, st.parentView(), st.activeMounts(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	return readBlob(t, store, desc), desc
}

func readBlob(t testing.TB, store content.Store, desc ocispec.Descriptor) []byte {
	t.Helper()
	b, err := content.ReadBlob(context.Background(), store, desc)
	must(t, err)
	return b
}

func uncompressedDigest(t testing.TB, blob []byte) string {
	t.Helper()
	r, err := compressionReader(blob)
	must(t, err)
	h := sha256.New()
	_, err = io.Copy(h, r)
	must(t, err)
	return fmt.Sprintf("sha256:%x", h.Sum(nil))
}

// tarEntry is what a header and its content say, printable.
type tarEntry struct {
	name string
	link string
	typ  byte
	hdr  string
	sum  [32]byte
}

func readTar(t testing.TB, b []byte) []tarEntry {
	t.Helper()
	var out []tarEntry
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		must(t, err)
		data, err := io.ReadAll(tr)
		must(t, err)
		var pax []string
		for k, v := range h.PAXRecords {
			if k != "mtime" {
				pax = append(pax, fmt.Sprintf("%s=%q", k, v))
			}
		}
		sort.Strings(pax)
		out = append(out, tarEntry{
			name: h.Name,
			link: h.Linkname,
			typ:  h.Typeflag,
			hdr: fmt.Sprintf("%s type=%c mode=%o uid=%d gid=%d size=%d mtime=%d link=%q dev=%d,%d pax=%v",
				h.Name, h.Typeflag, h.Mode, h.Uid, h.Gid, h.Size, h.ModTime.UnixNano(), h.Linkname, h.Devmajor, h.Devminor, pax),
			sum: sha256.Sum256(data),
		})
	}
}

// compareTars reports every entry where overclone's layer differs from
// the walking differ's, in order, but for the walking differ's re-linked
// names (see relinked), which it returns.
func compareTars(t testing.TB, want, got []byte) (int, []string) {
	t.Helper()
	w, g := readTar(t, want), readTar(t, got)
	w, quirks := relinked(w, g)
	for i := 0; i < len(w) || i < len(g); i++ {
		switch {
		case i >= len(w):
			t.Errorf("entry %d: extra %s", i, g[i].hdr)
		case i >= len(g):
			t.Errorf("entry %d: missing %s", i, w[i].hdr)
		case w[i].hdr != g[i].hdr:
			t.Errorf("entry %d:\n got  %s\n want %s", i, g[i].hdr, w[i].hdr)
		case w[i].sum != g[i].sum:
			t.Errorf("entry %d: %s: content differs", i, w[i].hdr)
		}
	}
	return len(g), quirks
}

// relinked drops from the walking differ's entries the hard links it
// writes for names the container never touched. continuity's fs.Changes
// reports every unchanged file with more than one link as Unmodified, and
// archive.ChangeWriter links such a name to a changed file with the same
// inode number on the mount. overlayfs shows a copied-up file with its
// lower inode number, so a lower file the container linked anew (which
// copies it up, and without index=on breaks its old links) gets its
// untouched lower links written as links of the new file, with their
// parent directories. The merged view has them as separate, unchanged
// files: overclone writes nothing for them. The test checks that they are
// indeed unchanged.
func relinked(walking, ours []tarEntry) ([]tarEntry, []string) {
	have := map[string]bool{}
	for _, e := range ours {
		have[e.name] = true
	}
	var links []string
	for _, e := range walking {
		// Only a link to a name overclone wrote too: anything else the
		// walking differ has and overclone lacks is a difference.
		if e.typ == tar.TypeLink && !have[e.name] && have[e.link] {
			links = append(links, e.name)
		}
	}
	quirk := func(e tarEntry) bool {
		if have[e.name] {
			return false
		}
		for _, l := range links {
			if e.name == l || (e.typ == tar.TypeDir && strings.HasPrefix(l, e.name)) {
				return true
			}
		}
		return false
	}
	var kept []tarEntry
	for _, e := range walking {
		if !quirk(e) {
			kept = append(kept, e)
		}
	}
	return kept, links
}

// mergedTree mounts the stack read-only and describes what it shows.
func (st *testStack) mergedTree(t testing.TB) map[string]string {
	t.Helper()
	var tree map[string]string
	withMount(t, st.root, st.activeMounts(), func(dir string) { tree = describeTree(t, dir) })
	return tree
}

// parentTree mounts the parent view and describes it.
func (st *testStack) parentTree(t testing.TB) map[string]string {
	t.Helper()
	var tree map[string]string
	withMount(t, st.root, st.parentView(), func(dir string) { tree = describeTree(t, dir) })
	return tree
}

// applyOnParent copies the parent view and applies layer on the copy.
func (st *testStack) applyOnParent(t testing.TB, layer []byte) map[string]string {
	t.Helper()
	dst, err := os.MkdirTemp(st.root, "applied")
	must(t, err)
	withMount(t, st.root, st.parentView(), func(dir string) { must(t, cfs.CopyDir(dst, dir)) })
	if _, err := archive.Apply(context.Background(), dst, bytes.NewReader(layer)); err != nil {
		t.Fatal(err)
	}
	return describeTree(t, dst)
}

func withMount(t testing.TB, base string, ms []mount.Mount, fn func(string)) {
	t.Helper()
	dir, err := os.MkdirTemp(base, "view")
	must(t, err)
	ro := append([]mount.Mount(nil), ms...)
	for i := range ro {
		ro[i].Options = append(append([]string(nil), ro[i].Options...), "ro")
	}
	must(t, mount.All(ro, dir))
	defer func() {
		must(t, mount.UnmountAll(dir, 0))
		os.Remove(dir)
	}()
	fn(dir)
}

// describeTree describes every entry under root: type, mode, owner, size,
// content, link text, capability, and for non-directories the
// modification time to the second (a tar keeps no more).
func describeTree(t testing.TB, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		s := fi.Sys().(*syscall.Stat_t)
		desc := fmt.Sprintf("mode=%v uid=%d gid=%d", fi.Mode(), s.Uid, s.Gid)
		switch {
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			desc += fmt.Sprintf(" size=%d sha=%x mtime=%d", len(b), sha256.Sum256(b), fi.ModTime().Unix())
		case fi.Mode()&fs.ModeSymlink != 0:
			l, err := os.Readlink(p)
			if err != nil {
				return err
			}
			desc += fmt.Sprintf(" link=%q mtime=%d", l, fi.ModTime().Unix())
		case !fi.IsDir():
			desc += fmt.Sprintf(" rdev=%d mtime=%d", s.Rdev, fi.ModTime().Unix())
		}
		buf := make([]byte, 64)
		if n, err := unix.Lgetxattr(p, capabilityXattr, buf); err == nil {
			desc += fmt.Sprintf(" cap=%x", buf[:n])
		}
		out[rel] = desc
		return nil
	})
	must(t, err)
	return out
}

func compareTreeMaps(t testing.TB, what string, want, got map[string]string, skip []string) {
	t.Helper()
	var keys []string
	for k := range want {
		keys = append(keys, k)
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		if k == "." || slices.Contains(skip, k) {
			continue
		}
		if want[k] != got[k] {
			t.Errorf("%s: %s:\n got  %s\n want %s", what, k, got[k], want[k])
		}
	}
}

func compressionReader(blob []byte) (io.Reader, error) {
	return compression.DecompressStream(bytes.NewReader(blob))
}

// labelStore keeps a local content store's labels in memory, as
// containerd's metadata store keeps them for its content store.
type labelStore struct {
	mu     sync.Mutex
	labels map[digest.Digest]map[string]string
}

func (s *labelStore) Get(d digest.Digest) (map[string]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.labels[d]), nil
}

func (s *labelStore) Set(d digest.Digest, l map[string]string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.labels[d] = maps.Clone(l)
	return nil
}

func (s *labelStore) Update(d digest.Digest, l map[string]string) (map[string]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cur := s.labels[d]
	if cur == nil {
		cur = map[string]string{}
	}
	for k, v := range l {
		if v == "" {
			delete(cur, k)
		} else {
			cur[k] = v
		}
	}
	s.labels[d] = cur
	return maps.Clone(cur), nil
}

func newStore(t testing.TB) content.Store {
	t.Helper()
	store, err := local.NewLabeledStore(t.TempDir(), &labelStore{labels: map[digest.Digest]map[string]string{}})
	must(t, err)
	return store
}
