package snapshotter

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"

	"github.com/overclone/overclone/overlayutil"
)

// User-namespaced containers (Kubernetes' hostUsers: false, `ctr run
// --uidmap --gidmap --remap-labels`) ask for a root owned by their user
// namespace's root through two labels on Prepare and View. containerd
// passes them on to a proxy snapshotter only when its [proxy_plugins]
// entry lists the "remap-ids" capability; without it, containerd's client
// chowns a full copy of the image into a snapshot of its own instead.
//
// What containerd's built-in overlayfs snapshotter does with the labels,
// and overclone with it:
//   - the new snapshot's fs dir is owned by the host ids the container's
//     root maps to, so that the container's root may write in it;
//   - its mounts carry uidmap= and gidmap= options, which containerd's
//     mount code (2.0 and later) turns into idmapped mounts of the lower
//     layers before it mounts the overlay: one per layer in 2.0.0-2.0.6
//     and 2.1.0-2.1.4, one of the layers' common directory since 2.0.7
//     and 2.1.5. The upper is not
//     idmapped, so what the container writes lands there under the mapped
//     host ids;
//   - Stat, Usage and Commit do not look at the labels: a committed
//     remapped snapshot holds the host ids its container wrote.
//
// Where overclone differs, on purpose:
//   - containerd remounts a read-only bind read-only and returns before it
//     would idmap it, so a view of one layer, which the built-in hands out
//     as such a bind and which then shows the image's ids unmapped, is an
//     overlay of that layer on the empty dir here, whose lower containerd
//     does idmap;
//   - an active snapshot with no parent is a bind of its own dir without
//     the options, as an upper: the built-in idmaps it on top of chowning
//     its root, so its root shows as the overflow id in the container and
//     what the container writes lands on disk as unmapped ids;
//   - a stack named by its short links (l/<id>, relative symlinks to
//     ../snapshots/<id>/fs) gets the empty dir as its bottom layer: the
//     links' common directory would be l/, and containerd's idmapped mount
//     of it cannot reach the layers the links point at;
//   - in userspace mode an active snapshot is a copy made by this process,
//     so the copy itself is given the mapped owners (ownerMap): no
//     idmapped mount is needed, and it works where the kernel has none;
//   - where the kernel cannot idmap layers, the other mapped snapshots
//     stand on a shifted copy of their parent's view (remap_copy.go),
//     where the built-in refuses them unless slow_chown lets containerd's
//     client copy the image itself.
//
// containerd 1.7 does not know the uidmap= and gidmap= options (its mount
// code passes them to the kernel, and overlay refuses them): leave the
// capability out there, and its client makes the chowned copy, or serve
// it with remap = "copy", whose mounts carry no such option.

// How mapped snapshots are served, as RemapMechanism names them.
const (
	RemapIdmapped    = "idmapped layers"
	RemapChownedCopy = "chowned copy"
)

// RemapPolicy is the operator's choice between the two (config remap).
type RemapPolicy string

const (
	// RemapAuto uses idmapped layers where the kernel has them.
	RemapAuto RemapPolicy = "auto"
	// RemapCopy always stands mapped snapshots on a shifted copy, for
	// kernels whose idmapped mounts misbehave.
	RemapCopy RemapPolicy = "copy"
)

// ParseRemap checks a configured policy; "" is auto.
func ParseRemap(s string) (RemapPolicy, error) {
	switch p := RemapPolicy(s); p {
	case "", RemapAuto:
		return RemapAuto, nil
	case RemapCopy:
		return p, nil
	}
	return "", fmt.Errorf("remap %q: want auto or copy: %w", s, errdefs.ErrInvalidArgument)
}

// WithRemap sets how mapped snapshots are served (RemapAuto by default).
func WithRemap(p RemapPolicy) Opt {
	return func(c *Config) error {
		var err error
		c.Remap, err = ParseRemap(string(p))
		return err
	}
}

// RemapMechanism says how a snapshotter serving in mode on a root with
// features f, under policy, honours containerd's uid/gid mapping labels,
// and what that means for containerd's config: for `overclone check` and
// the start-up log.
func RemapMechanism(mode Mode, f *overlayutil.Features, policy RemapPolicy) (mechanism, why string) {
	idmapped := f.OK(overlayutil.CheckIDMapped) && policy != RemapCopy
	noIdmap := "no idmapped mounts: " + f.Get(overlayutil.CheckIDMapped).Reason
	if policy == RemapCopy {
		noIdmap = "remap = \"copy\" in the config"
	}
	switch {
	case mode == ModeUserspace && idmapped:
		return RemapChownedCopy, "containers get a copy of their image with the owners shifted, views idmapped layers; advertise capabilities = [\"remap-ids\"] (containerd 2.0+)"
	case mode == ModeUserspace:
		return RemapChownedCopy, "containers and views get a copy of their image with the owners shifted (" + noIdmap + "); advertise capabilities = [\"remap-ids\"]"
	case idmapped:
		return RemapIdmapped, "mounts carry uidmap= and gidmap=, which containerd 2.0+ turns into idmapped lower layers; advertise capabilities = [\"remap-ids\"] (not on containerd 1.7, whose mounts do not know these options)"
	}
	return RemapChownedCopy, "mapped snapshots stand on a reflinked copy of their image with the owners shifted, one per parent and mapping (" + noIdmap + "); advertise capabilities = [\"remap-ids\"]"
}

// idRange is one container-to-host range of a mapping label,
// "container:host:size" as containerd writes it.
type idRange struct{ ctr, host, size uint32 }

// idMapping is a snapshot's user-namespace mapping, from its labels.
type idMapping struct {
	uidLabel, gidLabel string
	uids, gids         []idRange
}

// remapOf reads the mapping labels; nil when there are none. Bad labels are
// InvalidArgument: containerd's own parser and its mount code would fail
// on them later, after the snapshot was made.
func remapOf(labels map[string]string) (*idMapping, error) {
	ul, uok := labels[snapshots.LabelSnapshotUIDMapping]
	gl, gok := labels[snapshots.LabelSnapshotGIDMapping]
	if !uok && !gok {
		return nil, nil
	}
	if !uok || !gok {
		// containerd's mount code idmaps only when both are given.
		return nil, fmt.Errorf("labels %s and %s must be given together: %w",
			snapshots.LabelSnapshotUIDMapping, snapshots.LabelSnapshotGIDMapping, errdefs.ErrInvalidArgument)
	}
	m := &idMapping{uidLabel: ul, gidLabel: gl}
	var err error
	if m.uids, err = parseIDRanges(snapshots.LabelSnapshotUIDMapping, ul); err != nil {
		return nil, err
	}
	if m.gids, err = parseIDRanges(snapshots.LabelSnapshotGIDMapping, gl); err != nil {
		return nil, err
	}
	if _, _, err := m.root(); err != nil {
		return nil, err
	}
	return m, nil
}

// parseIDRanges parses "c:h:s[,c:h:s...]" (several ranges since containerd
// 2.1).
func parseIDRanges(label, v string) ([]idRange, error) {
	var out []idRange
	for _, part := range strings.Split(v, ",") {
		f := strings.Split(part, ":")
		if len(f) != 3 {
			return nil, fmt.Errorf("label %s=%q: range %q is not container:host:size: %w", label, v, part, errdefs.ErrInvalidArgument)
		}
		var n [3]uint32
		for i, s := range f {
			x, err := strconv.ParseUint(s, 10, 32)
			if err != nil {
				return nil, fmt.Errorf("label %s=%q: range %q: %v: %w", label, v, part, err, errdefs.ErrInvalidArgument)
			}
			n[i] = uint32(x)
		}
		r := idRange{ctr: n[0], host: n[1], size: n[2]}
		// (uint32)-1 is no id at all: a range may not reach it.
		if r.size == 0 || uint64(r.ctr)+uint64(r.size) > math.MaxUint32 || uint64(r.host)+uint64(r.size) > math.MaxUint32 {
			return nil, fmt.Errorf("label %s=%q: range %q is empty or runs past the last id: %w", label, v, part, errdefs.ErrInvalidArgument)
		}
		out = append(out, r)
	}
	return out, nil
}

// toHost maps a container id to the host; false when no range holds it.
func toHost(id uint32, ranges []idRange) (uint32, bool) {
	for _, r := range ranges {
		if id >= r.ctr && id-r.ctr < r.size {
			return r.host + (id - r.ctr), true
		}
	}
	return 0, false
}

// root is the host uid and gid of the container's root.
func (m *idMapping) root() (uid, gid int, err error) {
	u, uok := toHost(0, m.uids)
	g, gok := toHost(0, m.gids)
	if !uok || !gok {
		return 0, 0, fmt.Errorf("mapping uid %q gid %q does not map the container's root (id 0): %w", m.uidLabel, m.gidLabel, errdefs.ErrInvalidArgument)
	}
	return int(u), int(g), nil
}

// options are the mount options containerd turns into idmapped mounts.
func (m *idMapping) options() []string {
	return []string{"uidmap=" + m.uidLabel, "gidmap=" + m.gidLabel}
}

// remapping reads a new snapshot's mapping: nil when the labels ask for
// none, or when the parent is containerd's client-side copy, mapped
// already.
func (s *Snapshotter) remapping(ctx context.Context, parent string, labels map[string]string) (*idMapping, error) {
	m, err := remapOf(labels)
	if err != nil || m == nil {
		return nil, err
	}
	if parent == "" {
		// Nothing but the snapshot's own dir: its root is chowned.
		return m, nil
	}
	if s.remappedByClient(ctx, parent, m) {
		return nil, nil
	}
	// Served by idmapped layers, by the shifted copy userspace mode
	// makes of a container's parent anyway, or else by a shifted copy
	// of the parent's view (remap_copy.go).
	return m, nil
}

// remapPrepared gives a prepared directory its mapped owners: the fs dir's
// root, unless it is a copy of the parent made with the owners mapped
// already (materialized, in userspace mode).
func (s *Snapshotter) remapPrepared(td string, m *idMapping, materialized bool) error {
	if materialized {
		return nil
	}
	fsDir := filepath.Join(td, "fs")
	uid, gid, err := m.root()
	if err != nil {
		return err
	}
	if err := os.Lchown(fsDir, uid, gid); err != nil {
		return fmt.Errorf("chown %s to the mapped root %d:%d: %w", fsDir, uid, gid, err)
	}
	return nil
}

// recreatedMapping is the mapping a snapshot recreate makes again was
// created with: nil for one without, or on containerd's client-side copy.
func (s *Snapshotter) recreatedMapping(ctx context.Context, snap storage.Snapshot, info snapshots.Info) (*idMapping, error) {
	m, err := remapOf(info.Labels)
	if err != nil || m == nil {
		return nil, err
	}
	if len(snap.ParentIDs) > 0 && s.remappedByClient(ctx, info.Parent, m) {
		return nil, nil
	}
	return m, nil
}

// mounts builds a snapshot's mounts (plainMounts) and, for a snapshot
// created with a mapping, shapes them so that containerd idmaps the
// layers (see the top of this file).
func (s *Snapshotter) mounts(ctx context.Context, snap storage.Snapshot, info snapshots.Info) ([]mount.Mount, error) {
	ms, err := s.plainMounts(ctx, snap, info)
	if err != nil {
		return nil, err
	}
	m, err := remapOf(info.Labels)
	if err != nil || m == nil || len(snap.ParentIDs) == 0 || s.remappedByClient(ctx, info.Parent, m) {
		return ms, err
	}
	if s.mode == ModeUserspace && snap.Kind == snapshots.KindActive {
		return ms, nil // a copy already owned by the mapped ids
	}
	if s.needsRemapCopy(snap) {
		return s.remapCopyMounts(ctx, snap, m)
	}
	if len(ms) != 1 {
		return nil, fmt.Errorf("remap mounts of %s: %d mounts, want one", snap.ID, len(ms))
	}
	out := ms[0]
	out.Options = append([]string(nil), out.Options...)
	empty := filepath.Join(s.root, emptyDir)
	switch {
	case out.Type == "bind":
		// A read-only bind of one layer: an overlay of it on the
		// empty dir, which containerd idmaps (it does not idmap a
		// read-only bind).
		out, err = overlayutil.OverlayMount([]string{out.Source, empty}, "", "", s.overlay)
		if err != nil {
			return nil, fmt.Errorf("remap mounts of %s: %w", snap.ID, err)
		}
	case out.Type == "overlay":
		links := filepath.Join(s.root, linksDir) + string(filepath.Separator)
		for i, o := range out.Options {
			if lower, ok := strings.CutPrefix(o, "lowerdir="); ok && strings.Contains(lower, links) {
				out.Options[i] = o + ":" + empty
			}
		}
	default:
		return nil, fmt.Errorf("remap mounts of %s: cannot idmap a %s mount: %w", snap.ID, out.Type, errdefs.ErrNotImplemented)
	}
	out.Options = append(out.Options, m.options()...)
	return []mount.Mount{out}, nil
}

// remappedByClient reports whether parent is the copy containerd's client
// chowned for this mapping, which it makes when the snapshotter does not
// advertise remap-ids and then prepares the container on with the
// mapping labels all the same (client.resolveSnapshotOptions): mapped
// again, every id would be shifted twice. Its name is containerd's digest
// of its own parent's name and the mapping (remappedSnapshot.ID, 2.0 and
// later), or "<parent>-<host uid>-<host gid>" of the container's root
// (1.7, which maps only from id 0), so the copy is known exactly, whether
// or not containerd's config lists the capability.
func (s *Snapshotter) remappedByClient(ctx context.Context, parent string, m *idMapping) bool {
	var grandparent string
	lookup := func(ctx context.Context) error {
		_, info, _, err := storage.GetInfo(ctx, parent)
		grandparent = info.Parent
		return err
	}
	// recreate asks inside its transaction; calls outside one open their
	// own.
	err := lookup(ctx)
	if errors.Is(err, storage.ErrNoTransaction) {
		err = s.ms.WithTransaction(ctx, false, lookup)
	}
	if err != nil || grandparent == "" {
		return false
	}
	name, from := userKey(parent), userKey(grandparent)
	if name == clientRemapName(from, m) {
		return true
	}
	uid, gid, err := m.root()
	return err == nil && name == fmt.Sprintf("%s-%d-%d", from, uid, gid)
}

// userKey is the name a client gave a snapshot: containerd's metadata
// store hands snapshotters "<namespace>/<seq>/<name>", and namespaces
// hold no slash.
func userKey(key string) string {
	if parts := strings.SplitN(key, "/", 3); len(parts) == 3 {
		if _, err := strconv.ParseUint(parts[1], 10, 64); err == nil {
			return parts[2]
		}
	}
	return key
}

// clientRemapName is the name containerd's client gives its chowned copy of
// parent: the sha256 digest of {"Parent", "IDMap": {"UidMap", "GidMap"}}
// in JSON, the ranges sorted by container id, as in
// client/snapshotter_opts_unix.go.
func clientRemapName(parent string, m *idMapping) string {
	type spec struct {
		ContainerID uint32 `json:"containerID"`
		HostID      uint32 `json:"hostID"`
		Size        uint32 `json:"size"`
	}
	specs := func(rs []idRange) []spec {
		out := make([]spec, len(rs))
		for i, r := range rs {
			out[i] = spec{r.ctr, r.host, r.size}
		}
		slices.SortStableFunc(out, func(a, b spec) int { return cmp.Compare(a.ContainerID, b.ContainerID) })
		return out
	}
	var v struct {
		Parent string `json:"Parent"`
		IDMap  struct {
			UidMap []spec `json:"UidMap"`
			GidMap []spec `json:"GidMap"`
		} `json:"IDMap"`
	}
	v.Parent = parent
	v.IDMap.UidMap, v.IDMap.GidMap = specs(m.uids), specs(m.gids)
	buf, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	return fmt.Sprintf("sha256:%x", sha256.Sum256(buf))
}
