package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/overclone/overclone/snapshotter"
)

// runFlatten has the daemon build now the flattened layers a container on
// a committed snapshot will stand on, rather than when that container's
// Prepare first needs them. It goes through the snapshots API: a
// short-lived view carrying snapshotter.FlattenLabel, removed again once
// the layers are built. A stack that fits in one overlay mount needs none.
func runFlatten(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("flatten", flag.ContinueOnError)
	fs.SetOutput(stderr)
	d := addDaemonFlags(fs)
	if code, ok := parseFlags(fs, args, 1, "KEY"); !ok {
		return code
	}
	ctx, sn, done, err := d.connect(ctx)
	if err != nil {
		fmt.Fprintf(stderr, "overclone flatten: %v\n", err)
		return exitFail
	}
	defer done()
	key := fs.Arg(0)
	view := tempKey("flatten")
	start := time.Now()
	mounts, err := sn.View(ctx, view, key, snapshots.WithLabels(map[string]string{snapshotter.FlattenLabel: "true"}))
	if err != nil {
		fmt.Fprintf(stderr, "overclone flatten %s: %v\n", key, err)
		return exitFail
	}
	if err := sn.Remove(ctx, view); err != nil {
		fmt.Fprintf(stderr, "overclone flatten: remove temporary view %s: %v\n", view, err)
	}
	took := time.Since(start).Round(time.Millisecond)
	flat := flattenedLayers(mounts)
	if len(flat) == 0 {
		fmt.Fprintf(stdout, "%s: its stack fits in one overlay mount, nothing to flatten (%s)\n", key, took)
		return exitOK
	}
	fmt.Fprintf(stdout, "%s: a container on it uses the flattened layer %s (%s)\n", key, strings.Join(flat, ", "), took)
	return exitOK
}

// flattenedLayers returns the directories under the root's flat/ that
// mounts stand on.
func flattenedLayers(mounts []mount.Mount) []string {
	var dirs []string
	for _, m := range mounts {
		candidates := []string{m.Source}
		for _, o := range m.Options {
			if v, ok := strings.CutPrefix(o, "lowerdir="); ok {
				candidates = append(candidates, strings.Split(v, ":")...)
			}
		}
		for _, dir := range candidates {
			if filepath.Base(filepath.Dir(dir)) == "flat" {
				dirs = append(dirs, dir)
			}
		}
	}
	return dirs
}

// tempKey names a snapshot the CLI makes for itself and removes again.
func tempKey(what string) string {
	return "overclone-" + what + "-" + strconv.Itoa(os.Getpid()) + "-" + strconv.FormatInt(time.Now().UnixNano(), 36)
}
