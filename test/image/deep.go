package image

import (
	"fmt"
	"io"

	"github.com/overclone/overclone/hack/ocilayout"
)

// BuildDeep writes to layout an image of nLayers layers: the viewer at
// /bin/viewer in the first, then one small file under /data per layer, the
// shape of an image whose cost is its depth, not its size. Its entrypoint
// is `viewer view /data`, and Expected is what that prints.
func BuildDeep(layout, name string, nLayers int, viewer []byte) (*Image, error) {
	img := &Image{Dir: layout, Name: name}
	l, err := ocilayout.New(layout)
	if err != nil {
		return nil, err
	}
	m := newModel()
	for i := range nLayers {
		var files []file
		if i == 0 {
			files = append(files, dir("bin", 0o755), reg("bin/viewer", 0o755, viewer), dir(DataDir, 0o755))
		}
		files = append(files, reg(fmt.Sprintf("%s/layer%04d", DataDir, i), 0o644, []byte(fmt.Sprintf("layer %d\n", i))))
		digests := map[string]string{}
		for _, f := range files {
			if f.kind == 'f' {
				if digests[f.path], err = fileDigest(f); err != nil {
					return nil, err
				}
			}
		}
		if err := m.apply(i, files, digests); err != nil {
			return nil, err
		}
		desc, diffID, err := l.WriteLayer(true, func(w io.Writer) error { return writeLayer(w, files) })
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", i+1, err)
		}
		img.Layers = append(img.Layers, desc)
		img.DiffIDs = append(img.DiffIDs, diffID)
	}
	img.Expected = m.view(DataDir)
	return img, img.finish(l, []string{"/bin/viewer"}, []string{"view", "/" + DataDir})
}
