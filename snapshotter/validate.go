package snapshotter

import (
	"fmt"
	"strings"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/labels"
	"github.com/containerd/errdefs"
)

// maxKeyLength bounds a key. containerd's keys are "<namespace>/<seq>/<key>"
// with a digest or a path inside, well under this; a longer one is a bug or
// an attack, and bolt would take it (up to 32 KiB) and keep it forever.
const maxKeyLength = 4096

// validateKey rejects keys no containerd client sends. Keys are never used
// as paths here (directories are named by id), but a ".." element or a NUL
// in a key is always a sign of a confused or hostile caller.
func validateKey(what, key string) error {
	switch {
	case key == "":
		return fmt.Errorf("%s must not be empty: %w", what, errdefs.ErrInvalidArgument)
	case len(key) > maxKeyLength:
		return fmt.Errorf("%s is %d bytes, over the limit of %d: %w", what, len(key), maxKeyLength, errdefs.ErrInvalidArgument)
	case strings.ContainsRune(key, 0):
		return fmt.Errorf("%s %q contains a NUL byte: %w", what, key, errdefs.ErrInvalidArgument)
	}
	for _, elem := range strings.Split(key, "/") {
		if elem == ".." {
			return fmt.Errorf("%s %q has a \"..\" element: %w", what, key, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// validateLabels applies containerd's own label limits, which its metadata
// layer enforces before a call reaches a snapshotter, but a client talking
// to the socket directly bypasses.
func validateLabels(l map[string]string) error {
	for k, v := range l {
		if err := labels.Validate(k, v); err != nil {
			return err
		}
	}
	return nil
}

// applyOpts applies a call's options to an Info, as storage will, so that
// their labels can be checked before anything is written.
func applyOpts(opts []snapshots.Opt) (snapshots.Info, error) {
	var base snapshots.Info
	for _, opt := range opts {
		if err := opt(&base); err != nil {
			return base, err
		}
	}
	return base, validateLabels(base.Labels)
}
