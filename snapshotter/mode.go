package snapshotter

import (
	"context"
	"fmt"

	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"

	"github.com/overclone/overclone/overlayutil"
)

// Mode is how snapshots are served.
type Mode string

const (
	// ModeAuto picks overlay where the kernel's overlay serves this root
	// and intercepts file operations on merged files, userspace otherwise.
	ModeAuto Mode = "auto"
	// ModeOverlay stores layers as diffs and hands out overlay mounts.
	ModeOverlay Mode = "overlay"
	// ModeUserspace stores every snapshot as a complete directory,
	// materialized from its parent by fileops (reflinked where the
	// filesystem can), and hands out bind mounts: it needs no overlay.
	ModeUserspace Mode = "userspace"
)

// ParseMode checks a mode name from the configuration.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case ModeAuto, ModeOverlay, ModeUserspace:
		return m, nil
	case "":
		return ModeAuto, nil
	}
	return "", fmt.Errorf("mode %q: want auto, overlay or userspace: %w", s, errdefs.ErrInvalidArgument)
}

// ChooseMode resolves auto against what the kernel can do, and says why.
func ChooseMode(want Mode, f *overlayutil.Features) (Mode, string, error) {
	switch want {
	case ModeUserspace:
		return ModeUserspace, "configured", nil
	case ModeOverlay:
		if !f.CanServe() {
			return "", "", fmt.Errorf("mode overlay is configured, but overlay cannot serve %s: %s", f.Root, cannotServeReason(f))
		}
		return ModeOverlay, "configured", nil
	}
	switch {
	case !f.CanServe():
		return ModeUserspace, "overlay cannot serve this root: " + cannotServeReason(f), nil
	case !f.Intercepts():
		return ModeUserspace, "the kernel's overlay may hand out stale lower data to copy_file_range/FICLONE: " + f.Get(overlayutil.CheckIntercepts).Reason, nil
	}
	return ModeOverlay, "overlay serves this root and intercepts file operations", nil
}

func cannotServeReason(f *overlayutil.Features) string {
	if !f.OK(overlayutil.CheckOverlay) {
		return f.Get(overlayutil.CheckOverlay).Reason
	}
	return f.Get(overlayutil.CheckMultipleLowers).Reason
}

// overcloneBucket sits beside containerd's "v1" bucket in the metadata
// file and holds what overclone itself must remember about the root.
var (
	overcloneBucket = []byte("overclone")
	modeKey         = []byte("mode")
)

// recordMode stores the mode of a new root, or checks it against the one
// the root was created in: layers stored as diffs and layers stored whole
// cannot be mixed, so a root never changes mode. Under auto, the recorded
// mode is kept where the kernel can still serve it.
func (s *Snapshotter) recordMode(ctx context.Context, want Mode, f *overlayutil.Features) (Mode, string, error) {
	ctx, tx, err := s.ms.TransactionContext(ctx, true)
	if err != nil {
		return "", "", err
	}
	defer tx.Rollback()
	btx, ok := tx.(*bolt.Tx)
	if !ok {
		return "", "", fmt.Errorf("metadata transaction is %T, not a bolt transaction", tx)
	}
	bkt, err := btx.CreateBucketIfNotExists(overcloneBucket)
	if err != nil {
		return "", "", fmt.Errorf("create overclone metadata bucket: %w", err)
	}
	if recorded := Mode(bkt.Get(modeKey)); recorded != "" {
		if want != ModeAuto && want != recorded {
			return "", "", fmt.Errorf("root %s was created in %s mode and cannot be served in %s mode (move it away or use mode %q): %w",
				s.root, recorded, want, recorded, errdefs.ErrFailedPrecondition)
		}
		if recorded == ModeOverlay && !f.CanServe() {
			return "", "", fmt.Errorf("root %s was created in overlay mode, but overlay cannot serve it now: %s", s.root, cannotServeReason(f))
		}
		return recorded, "recorded when the root was created", nil
	}
	mode, why, err := ChooseMode(want, f)
	if err != nil {
		return "", "", err
	}
	if err := bkt.Put(modeKey, []byte(mode)); err != nil {
		return "", "", fmt.Errorf("record mode: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return "", "", fmt.Errorf("record mode: %w", err)
	}
	return mode, why, nil
}
