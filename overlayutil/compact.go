package overlayutil

import (
	"path"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
)

// maxData is the longest mount(2) data string the kernel takes whole: it
// copies one page and overwrites the page's last byte with NUL, so a
// string of a full page loses its last character, silently (containerd's
// own check, "> pagesize", lets that one through).
func maxData(pagesize int) int { return pagesize - 1 }

// compactSlack mirrors containerd's core/mount: it starts compacting the
// lowerdir option only once the options' summed length reaches a page
// minus this margin.
const compactSlack = 512

// MountData returns what containerd's core/mount (v2.4) passes to mount(2)
// for m: the working directory it mounts from ("" for none) and the data
// string. It models compactLowerdirOption: when the options (their lengths
// summed, without commas) reach pagesize-512, every lowerdir is made
// relative to the parent of the lowers' longest common string prefix, and
// the mount is done after a chdir there. Mount flags (ro, nosuid, ...)
// become flags and do not count. Options uidmap= and gidmap= make
// core/mount rewrite the lowers through idmapped binds, which this model
// does not follow: such mounts are modeled as if without them.
func MountData(m mount.Mount, pagesize int) (chdir, data string) {
	opts := m.Options
	if m.Type == "overlay" && summedLen(opts) >= pagesize-compactSlack {
		chdir, opts = compactLowerdir(opts)
	}
	var d []string
	for _, o := range opts {
		if !isMountFlag(o) {
			d = append(d, o)
		}
	}
	return chdir, strings.Join(d, ",")
}

func summedLen(opts []string) int {
	n := 0
	for _, o := range opts {
		n += len(o)
	}
	return n
}

// compactLowerdir rewrites the first lowerdir= option relative to the
// parent of the lowers' common prefix, which it returns with a trailing
// slash. It leaves opts alone where containerd does: one lower, no common
// prefix, a parent of "/" or ".", or a lower no longer than that parent.
// The prefix is cut back to its last '/', because it may end inside a
// name (".../snapshots/12" of snapshots 123 and 124).
func compactLowerdir(opts []string) (string, []string) {
	idx := -1
	for i, o := range opts {
		if strings.HasPrefix(o, "lowerdir=") {
			idx = i
			break
		}
	}
	if idx < 0 {
		return "", opts
	}
	dirs := strings.Split(strings.TrimPrefix(opts[idx], "lowerdir="), ":")
	if len(dirs) == 1 {
		return "", opts
	}
	prefix := dirs[0]
	for _, d := range dirs[1:] {
		n := 0
		for n < len(prefix) && n < len(d) && prefix[n] == d[n] {
			n++
		}
		prefix = prefix[:n]
	}
	if prefix == "" {
		return "", opts
	}
	parent := path.Dir(prefix)
	if parent == "/" || parent == "." {
		return "", opts
	}
	parent += "/"
	rel := make([]string, len(dirs))
	for i, d := range dirs {
		if len(d) <= len(parent) {
			return "", opts
		}
		rel[i] = d[len(parent):]
	}
	out := make([]string, 0, len(opts))
	out = append(out, opts[:idx]...)
	out = append(out, opts[idx+1:]...)
	return parent, append(out, "lowerdir="+strings.Join(rel, ":"))
}

// mountFlags are the option names core/mount turns into mount(2) flags
// rather than filesystem data ("defaults" maps to no flag, so it stays in
// the data, as do unknown names).
var mountFlags = map[string]bool{
	"async": true, "atime": true, "bind": true, "dev": true, "diratime": true,
	"dirsync": true, "exec": true, "mand": true, "noatime": true, "nodev": true,
	"nodiratime": true, "noexec": true, "nomand": true, "norelatime": true,
	"nostrictatime": true, "nosuid": true, "rbind": true, "relatime": true,
	"remount": true, "ro": true, "rw": true, "strictatime": true, "suid": true,
	"sync": true, "loop": true,
}

func isMountFlag(o string) bool {
	return mountFlags[o] || strings.HasPrefix(o, "uidmap=") || strings.HasPrefix(o, "gidmap=")
}
