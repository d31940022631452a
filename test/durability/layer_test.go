package durability

import (
	"crypto/sha256"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
)

// layer is a layer's content: relative path to the sha256 of a file, ""
// for a directory, and its size.
type layer map[string]entry

type entry struct {
	size int64
	sum  [32]byte
}

// writeLayer writes files small files in dirs of 100 and one big file of
// bigSize bytes into dir.
func writeLayer(rng *rand.Rand, dir string, files int, bigSize int) (layer, error) {
	l := layer{}
	put := func(rel string, data []byte) error {
		if err := os.WriteFile(filepath.Join(dir, rel), data, 0o644); err != nil {
			return err
		}
		l[rel] = entry{size: int64(len(data)), sum: sha256.Sum256(data)}
		return nil
	}
	for i := 0; i < files; i++ {
		sub := fmt.Sprintf("d%02d", i/100)
		if i%100 == 0 {
			if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
				return nil, err
			}
			l[sub] = entry{}
		}
		data := make([]byte, 1+rng.IntN(16<<10))
		fillRandom(rng, data)
		if err := put(fmt.Sprintf("%s/f%04d", sub, i), data); err != nil {
			return nil, err
		}
	}
	if bigSize > 0 {
		data := make([]byte, bigSize)
		fillRandom(rng, data)
		if err := put("big", data); err != nil {
			return nil, err
		}
	}
	return l, nil
}

func fillRandom(rng *rand.Rand, b []byte) {
	for i := 0; i+8 <= len(b); i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
}

func readLayer(dir string) (layer, error) {
	l := layer{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || path == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		if d.IsDir() {
			l[rel] = entry{}
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		l[rel] = entry{size: int64(len(data)), sum: sha256.Sum256(data)}
		return nil
	})
	return l, err
}

// diff returns the bytes of want that got lacks or holds differently, the
// files affected, and the first difference.
func diff(want, got layer) (lostBytes int64, files int, first string) {
	for rel, w := range want {
		g, ok := got[rel]
		if ok && g == w {
			continue
		}
		lostBytes += w.size
		files++
		if first == "" {
			first = fmt.Sprintf("%s: %d bytes written, %d bytes found (present %v)", rel, w.size, g.size, ok)
		}
	}
	return lostBytes, files, first
}
