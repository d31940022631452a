package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/overclone/overclone/fileops"
)

// runCp copies out of a snapshot's merged view, or into an active
// snapshot, without mounting anything: fileops resolves the visible version
// of each file through the layers (never a stale lower copy), copies up the
// destination first, and reflinks data where the filesystem can.
//
// The daemon is asked for the layers (Mounts, or a temporary View of a
// committed snapshot, which also keeps those layers from being removed
// while the copy runs); the files are then read and written here. Writing
// into an active snapshot whose container is running is like writing into
// an overlay's upper directory under a live mount: stop the container first.
func runCp(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("cp", flag.ContinueOnError)
	fs.SetOutput(stderr)
	d := addDaemonFlags(fs)
	if code, ok := parseFlags(fs, args, 2, "SNAPSHOT:PATH DEST | SRC SNAPSHOT:PATH"); !ok {
		return code
	}
	src, dst := fs.Arg(0), fs.Arg(1)
	key, path, out := splitSnapshotPath(src)
	if !out {
		var ok bool
		if key, path, ok = splitSnapshotPath(dst); !ok {
			fmt.Fprintln(stderr, "overclone cp: one side must be SNAPSHOT:PATH")
			return exitUsage
		}
	}
	ctx, sn, done, err := d.connect(ctx)
	if err != nil {
		fmt.Fprintf(stderr, "overclone cp: %v\n", err)
		return exitFail
	}
	defer done()

	stack, release, err := openStack(ctx, sn, key, !out)
	if err != nil {
		fmt.Fprintf(stderr, "overclone cp: %v\n", err)
		return exitFail
	}
	defer release()
	var stats fileops.FlattenStats
	if out {
		stats, err = stack.CopyOut(ctx, path, dst)
	} else {
		stats, err = stack.CopyIn(ctx, src, path)
	}
	if err != nil {
		fmt.Fprintf(stderr, "overclone cp: %v\n", err)
		return exitFail
	}
	fmt.Fprintf(stdout, "%d files, %d dirs, %d bytes (%d reflinked)\n", stats.Files, stats.Dirs, stats.Bytes, stats.Reflinked)
	return exitOK
}

// splitSnapshotPath splits "KEY:PATH". Keys may hold ':' (digests do), so
// the path is what follows the last ":/".
func splitSnapshotPath(arg string) (key, path string, ok bool) {
	i := strings.LastIndex(arg, ":/")
	if i <= 0 {
		return "", "", false
	}
	return arg[:i], arg[i+1:], true
}

// openStack returns the layers of snapshot key as a fileops stack. A
// committed snapshot is reached through a temporary view, removed by
// release; writing needs an active snapshot.
func openStack(ctx context.Context, sn snapshots.Snapshotter, key string, write bool) (*fileops.Stack, func(), error) {
	info, err := sn.Stat(ctx, key)
	if err != nil {
		return nil, nil, err
	}
	release := func() {}
	var mounts []mount.Mount
	switch {
	case write && info.Kind != snapshots.KindActive:
		return nil, nil, fmt.Errorf("%s is a %s snapshot: only an active snapshot can be written", key, info.Kind)
	case info.Kind == snapshots.KindCommitted:
		view := tempKey("cp")
		if mounts, err = sn.View(ctx, view, key); err != nil {
			return nil, nil, err
		}
		release = func() { sn.Remove(context.WithoutCancel(ctx), view) }
	default:
		if mounts, err = sn.Mounts(ctx, key); err != nil {
			return nil, nil, err
		}
	}
	upper, lowers, opts, err := layersOf(mounts)
	if err != nil {
		release()
		return nil, nil, err
	}
	stack, err := fileops.NewStack(upper, lowers, opts...)
	if err != nil {
		release()
		return nil, nil, err
	}
	return stack, release, nil
}

// layersOf reads the layer directories out of the mounts overclone hands
// out, with the options that make fileops show what that mount shows.
//
// The mounts say it all, so the CLI asks the daemon nothing more: a bind
// (every snapshot in userspace mode; a parentless layer or a flattened
// view in overlay mode) is a plain directory, where a 0/0 device or a
// trusted.overlay.* xattr is content, read and written verbatim; an
// overlay keeps its metadata in user.overlay.* exactly when it is mounted
// with userxattr. An active overlay's workdir is on the upper's filesystem
// and out of the container's reach, so entries are staged there and not
// next to their final name in the upper, which the container can write.
func layersOf(mounts []mount.Mount) (upper string, lowers []string, opts []fileops.StackOpt, err error) {
	if len(mounts) != 1 {
		return "", nil, nil, fmt.Errorf("expected one mount, got %d", len(mounts))
	}
	m := mounts[0]
	switch m.Type {
	case "bind":
		opts = append(opts, fileops.WithVerbatim())
		for _, o := range m.Options {
			if o == "ro" {
				return "", []string{m.Source}, opts, nil
			}
		}
		return m.Source, nil, opts, nil
	case "overlay":
		for _, o := range m.Options {
			k, v, _ := strings.Cut(o, "=")
			switch k {
			case "upperdir":
				upper = v
			case "lowerdir":
				lowers = strings.Split(v, ":")
			case "workdir":
				opts = append(opts, fileops.WithWorkDir(v))
			case "userxattr":
				opts = append(opts, fileops.WithUserXattr())
			}
		}
		return upper, lowers, opts, nil
	}
	return "", nil, nil, errors.New("unknown mount type " + m.Type)
}
