package fileops

import (
	"errors"
	"fmt"
	"path"
	"strings"
)

// ErrInvalidPath is returned for paths that cannot name anything in a
// layer, such as a path holding a NUL byte.
var ErrInvalidPath = errors.New("invalid path")

// cleanPath turns a merged-view path into the form used inside layers:
// slash separated, no leading slash, no "." or ".." components, "" for the
// root. Cleaning a rooted path drops leading ".." elements, so no input can
// name something above the root.
func cleanPath(p string) (string, error) {
	if strings.IndexByte(p, 0) >= 0 {
		return "", fmt.Errorf("path %q: %w", p, ErrInvalidPath)
	}
	return strings.TrimPrefix(path.Clean("/"+p), "/"), nil
}

// splitPath returns the components of a cleaned path.
func splitPath(rel string) []string {
	if rel == "" {
		return nil
	}
	return strings.Split(rel, "/")
}

// parentName splits a cleaned, non-root path into its parent and name.
func parentName(rel string) (string, string) {
	i := strings.LastIndexByte(rel, '/')
	if i < 0 {
		return "", rel
	}
	return rel[:i], rel[i+1:]
}

// joinRel joins a cleaned parent and a single name.
func joinRel(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}
