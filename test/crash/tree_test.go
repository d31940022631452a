package crash

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
)

// file is what a layer's file held when it was written.
type file struct {
	size int64
	sum  string
}

// tree is a layer's content: relative path to file, "" sum for a dir.
type tree map[string]file

// maxFileSize keeps a layer's files small enough for a thousand calls to
// run in seconds, big enough to span several pages and blocks.
const maxFileSize = 64 << 10

// writeFiles writes a few random files (some in a new subdirectory) into
// dir, an active snapshot's upper, and returns them.
func writeFiles(rng *rand.Rand, dir string, tag string, shared bool) (tree, error) {
	t := tree{}
	if shared {
		// One of a few contents every layer may hold, for dedupe.
		data := sharedContent(rng.IntN(len(sharedSizes)))
		rel := "shared-" + tag
		if err := os.WriteFile(filepath.Join(dir, rel), data, 0o644); err != nil {
			return nil, err
		}
		h := sha256.Sum256(data)
		t[rel] = file{size: int64(len(data)), sum: hex.EncodeToString(h[:])}
	}
	n := 1 + rng.IntN(4)
	for i := 0; i < n; i++ {
		rel := fmt.Sprintf("%s-%d", tag, i)
		if rng.IntN(3) == 0 {
			sub := "d-" + tag
			if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
				return nil, err
			}
			t[sub] = file{}
			rel = sub + "/" + rel
		}
		data := make([]byte, rng.IntN(maxFileSize))
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		if err := os.WriteFile(filepath.Join(dir, rel), data, 0o644); err != nil {
			return nil, err
		}
		h := sha256.Sum256(data)
		t[rel] = file{size: int64(len(data)), sum: hex.EncodeToString(h[:])}
	}
	return t, nil
}

// readTree reads what dir holds now.
func readTree(dir string) (tree, error) {
	t := tree{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if path == dir {
			return nil
		}
		rel, _ := filepath.Rel(dir, path)
		if d.IsDir() {
			t[rel] = file{}
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		h := sha256.Sum256(data)
		t[rel] = file{size: int64(len(data)), sum: hex.EncodeToString(h[:])}
		return nil
	})
	return t, err
}

// lost compares what a layer should hold with what it holds and returns
// the bytes missing or changed and a description of the first difference.
func lost(want, got tree) (int64, string) {
	var (
		n     int64
		first string
	)
	for rel, w := range want {
		if g, ok := got[rel]; !ok || g != w {
			n += w.size
			if first == "" {
				first = fmt.Sprintf("%s: want %d bytes %.12s, got %d bytes %.12s (present %v)", rel, w.size, w.sum, g.size, g.sum, ok)
			}
		}
	}
	for rel := range got {
		if _, ok := want[rel]; !ok && first == "" {
			first = rel + ": appeared"
		}
	}
	return n, first
}

func merge(a, b tree) tree {
	out := tree{}
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

// upperOf returns the directory a test writes an active snapshot's files
// into: the bind source of a parentless one (or of any one in userspace
// mode), the upperdir of an overlay. whole says the directory is a bind,
// so it shows the whole image, the parents' files too.
func upperOf(mounts []mount.Mount) (dir string, whole bool, err error) {
	if len(mounts) != 1 {
		return "", false, fmt.Errorf("want one mount, got %v", mounts)
	}
	m := mounts[0]
	if m.Type == "bind" {
		return m.Source, true, nil
	}
	for _, o := range m.Options {
		if v, ok := strings.CutPrefix(o, "upperdir="); ok {
			return v, false, nil
		}
	}
	return "", false, fmt.Errorf("no upperdir in %v", m)
}

// mountedPaths returns the directories a mount names, which must exist.
func mountedPaths(mounts []mount.Mount) []string {
	var paths []string
	for _, m := range mounts {
		if m.Type == "bind" {
			paths = append(paths, m.Source)
			continue
		}
		for _, o := range m.Options {
			k, v, _ := strings.Cut(o, "=")
			switch k {
			case "upperdir", "workdir":
				paths = append(paths, v)
			case "lowerdir":
				paths = append(paths, strings.Split(v, ":")...)
			}
		}
	}
	return paths
}

// topLayer returns the directory of the layer a view was made of: the
// source of a bind (whole: it shows the whole image), the first (top)
// lowerdir of an overlay.
func topLayer(mounts []mount.Mount) (dir string, whole bool, err error) {
	if len(mounts) != 1 {
		return "", false, fmt.Errorf("want one mount, got %v", mounts)
	}
	m := mounts[0]
	if m.Type == "bind" {
		return m.Source, true, nil
	}
	for _, o := range m.Options {
		if v, ok := strings.CutPrefix(o, "lowerdir="); ok {
			top, _, _ := strings.Cut(v, ":")
			return top, false, nil
		}
	}
	return "", false, fmt.Errorf("no lowerdir in %v", m)
}

// sharedSizes are the shared files' sizes: big enough that a kill can
// land while the kernel compares them, one with a partial last block.
var sharedSizes = []int{256 << 10, 1 << 20, 1<<20 + 777}

// sharedContent is shared file i's content, the same in every layer.
func sharedContent(i int) []byte {
	r := rand.New(rand.NewPCG(uint64(i), 17))
	data := make([]byte, sharedSizes[i])
	for j := range data {
		data[j] = byte(r.Uint32())
	}
	return data
}
