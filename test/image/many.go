package image

import (
	"fmt"
	"io"

	"github.com/overclone/overclone/hack/ocilayout"
)

// BuildMany writes to layout an image of nLayers layers of filesPerLayer small
// files each, spread over directories of 100: an image whose removal costs
// what a real one's does, one unlink per file, where the test image's
// removal is a few big extents. It has no entrypoint and is never run.
func BuildMany(layout, name string, nLayers, filesPerLayer int) (*Image, error) {
	img := &Image{Dir: layout, Name: name}
	l, err := ocilayout.New(layout)
	if err != nil {
		return nil, err
	}
	for i := range nLayers {
		var files []file
		top := fmt.Sprintf("layer%d", i)
		files = append(files, dir(top, 0o755))
		for f := range filesPerLayer {
			d := fmt.Sprintf("%s/d%d", top, f/100)
			if f%100 == 0 {
				files = append(files, dir(d, 0o755))
			}
			files = append(files, reg(fmt.Sprintf("%s/f%d", d, f), 0o644, []byte(fmt.Sprintf("layer %d file %d\n", i, f))))
		}
		desc, diffID, err := l.WriteLayer(true, func(w io.Writer) error { return writeLayer(w, files) })
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", i+1, err)
		}
		img.Layers = append(img.Layers, desc)
		img.DiffIDs = append(img.DiffIDs, diffID)
	}
	return img, img.finish(l, nil, nil)
}
