package harness

import (
	"encoding/json"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// Mount is one entry of `ctr snapshots ... --mounts` output (containerd's
// mount.Mount as JSON; field names match case-insensitively).
type Mount struct {
	Type    string
	Source  string
	Target  string
	Options []string
}

// ParseMounts decodes `ctr snapshots view --mounts` output.
func ParseMounts(out string) ([]Mount, error) {
	var ms []Mount
	if err := json.Unmarshal([]byte(out), &ms); err != nil {
		return nil, fmt.Errorf("parse mounts %q: %w", out, err)
	}
	return ms, nil
}

// MountAt mounts a snapshot's single mount at target, the way containerd's
// mount package does for the two shapes snapshotters return: an overlay, or a
// (read-only) bind of one dir.
func MountAt(ms []Mount, target string) error {
	if len(ms) != 1 {
		return fmt.Errorf("%d mounts: only a single mount is handled: %+v", len(ms), ms)
	}
	m := ms[0]
	var flags uintptr
	var data []string
	for _, o := range m.Options {
		switch o {
		case "ro":
			flags |= unix.MS_RDONLY
		case "rw":
		case "bind":
			flags |= unix.MS_BIND
		case "rbind":
			flags |= unix.MS_BIND | unix.MS_REC
		default:
			data = append(data, o)
		}
	}
	if m.Type == "bind" || flags&unix.MS_BIND != 0 {
		if err := unix.Mount(m.Source, target, "", flags&^unix.MS_RDONLY|unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s on %s: %w", m.Source, target, err)
		}
		if flags&unix.MS_RDONLY != 0 {
			if err := unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
				return fmt.Errorf("remount %s read-only: %w", target, err)
			}
		}
		return nil
	}
	if err := unix.Mount(m.Source, target, m.Type, flags, strings.Join(data, ",")); err != nil {
		return fmt.Errorf("mount -t %s %s %s -o %s: %w", m.Type, m.Source, target, strings.Join(m.Options, ","), err)
	}
	return nil
}
