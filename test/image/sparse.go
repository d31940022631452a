package image

import (
	"bytes"
	"io"
	"sort"
)

// sparseReader returns the logical content of a sparse file: its segments
// with zeros between them.
func sparseReader(f file) io.Reader {
	offsets := make([]int64, 0, len(f.holes))
	for off := range f.holes {
		offsets = append(offsets, off)
	}
	sort.Slice(offsets, func(i, j int) bool { return offsets[i] < offsets[j] })
	var readers []io.Reader
	var pos int64
	for _, off := range offsets {
		readers = append(readers, io.LimitReader(zeros{}, off-pos), bytes.NewReader(f.holes[off]))
		pos = off + int64(len(f.holes[off]))
	}
	readers = append(readers, io.LimitReader(zeros{}, f.size-pos))
	return io.MultiReader(readers...)
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
