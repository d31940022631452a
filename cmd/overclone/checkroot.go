package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/overclone/overclone/overlayutil"
)

// probeRoot probes overlay under root without leaving anything behind that
// was not there before. A root that exists is probed where it is, as the
// daemon probes it. A root that does not exist yet (check run before the
// daemon's first start, or a typo) is not created: the daemon would create
// it on the filesystem of its nearest existing ancestor, so the probes run
// in a scratch dir made there and removed afterwards. The findings are
// reported under root, with missing set. Probes that follow (size limits)
// run at at, and done removes the scratch dir when they are through.
func probeRoot(ctx context.Context, root string) (f *overlayutil.Features, missing bool, at string, done func() error, err error) {
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, false, "", nil, err
	}
	nothing := func() error { return nil }
	if _, err := os.Lstat(abs); !errors.Is(err, fs.ErrNotExist) {
		f, err := overlayutil.Probe(ctx, abs)
		return f, false, abs, nothing, err
	}
	parent := filepath.Dir(abs)
	for {
		if _, err := os.Lstat(parent); err == nil || !errors.Is(err, fs.ErrNotExist) {
			break
		}
		parent = filepath.Dir(parent)
	}
	scratch, err := os.MkdirTemp(parent, ".overclone-check-")
	if err != nil {
		return nil, true, "", nil, fmt.Errorf("%s does not exist, and no scratch dir can be made in %s to probe its filesystem: %w", abs, parent, err)
	}
	done = func() error {
		overlayutil.Forget(scratch)
		if err := os.RemoveAll(scratch); err != nil {
			return fmt.Errorf("remove the probe's scratch dir: %w", err)
		}
		return nil
	}
	found, err := overlayutil.Probe(ctx, scratch)
	if err != nil {
		done()
		return nil, true, "", nil, err
	}
	// A copy, so that the cached features of the scratch dir keep their
	// own root.
	c := *found
	c.Root = abs
	return &c, true, scratch, done, nil
}
