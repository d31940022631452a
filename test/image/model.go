package image

import (
	"bytes"
	"fmt"
	"io"
	"path"
	"strings"

	"github.com/overclone/overclone/test/image/view"
)

// node is one path of the merged tree the model keeps.
type node struct {
	entry view.Entry
	layer int
}

// model is the merged view of the layers applied so far, by OCI image-spec
// rules: an entry replaces what is at its path (a dir over a dir only
// replaces the metadata), .wh.NAME deletes NAME and everything below it,
// .wh..wh..opq hides everything lower layers put in its dir.
type model struct {
	nodes     map[string]*node
	nextInode uint64
}

func newModel() *model { return &model{nodes: map[string]*node{}} }

func (m *model) removeTree(p string, belowLayer int) {
	for q, n := range m.nodes {
		if (q == p || strings.HasPrefix(q, p+"/")) && n.layer < belowLayer {
			delete(m.nodes, q)
		}
	}
}

func (m *model) apply(layer int, files []file, digests map[string]string) error {
	for _, f := range files {
		if f.kind != 'w' && f.kind != 'o' {
			if parent := path.Dir(f.path); parent != "." {
				if n, ok := m.nodes[parent]; !ok || n.entry.Type != 'd' {
					return fmt.Errorf("layer %d: %s: parent is not a dir", layer, f.path)
				}
			}
		}
		switch f.kind {
		case 'w':
			m.removeTree(f.path, layer)
			continue
		case 'o':
			for q, n := range m.nodes {
				if strings.HasPrefix(q, f.path+"/") && n.layer < layer {
					delete(m.nodes, q)
				}
			}
			continue
		}
		old, exists := m.nodes[f.path]
		if exists && !(old.entry.Type == 'd' && f.kind == 'd') {
			m.removeTree(f.path, layer+1)
		}
		e := view.Entry{Mode: uint32(f.mode), UID: uint32(f.uid), GID: uint32(f.gid), Cap: f.cap}
		switch f.kind {
		case 'd':
			e.Type = 'd'
		case 'f':
			e.Type, e.Size, e.SHA256 = 'f', f.size, digests[f.path]
			if e.SHA256 == "" {
				return fmt.Errorf("layer %d: %s: no digest", layer, f.path)
			}
		case 'l':
			e.Type, e.Target, e.Mode = 'l', f.target, 0
		case 'h':
			target, ok := m.nodes[f.target]
			if !ok || target.entry.Type != 'f' {
				return fmt.Errorf("layer %d: hard link %s: target %s is not a file", layer, f.path, f.target)
			}
			if target.entry.Inode == 0 {
				m.nextInode++
				target.entry.Inode = m.nextInode
			}
			e = target.entry
		}
		m.nodes[f.path] = &node{entry: e, layer: layer}
	}
	return nil
}

// view returns the view of dir as the viewer prints it.
func (m *model) view(dir string) string {
	var entries []view.Entry
	for p, n := range m.nodes {
		if p != dir && !strings.HasPrefix(p, dir+"/") {
			continue
		}
		e := n.entry
		e.Path = strings.TrimPrefix(strings.TrimPrefix(p, dir), "/")
		if e.Path == "" {
			e.Path = "."
		}
		entries = append(entries, e)
	}
	return view.Format(entries)
}

// fileDigest returns the sha256 of a file's content without holding large
// contents in memory.
func fileDigest(f file) (string, error) {
	switch {
	case f.gen != nil:
		pr, pw := io.Pipe()
		go func() { pw.CloseWithError(f.gen(pw)) }()
		return view.Digest(pr)
	case f.holes != nil:
		return view.Digest(sparseReader(f))
	default:
		return view.Digest(bytes.NewReader(f.data))
	}
}
