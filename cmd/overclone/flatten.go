package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/overclone/overclone/snapshotter"
)

// runFlatten has the daemon build the flattened layer of a committed
// snapshot's whole stack now, rather than when a deep stack first needs it.
// It goes through the snapshots API: a short-lived view carrying
// snapshotter.FlattenLabel, removed again once the layer is built.
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
	fmt.Fprintf(stdout, "%s flattened into %s (%s)\n", key, mounts[0].Source, time.Since(start).Round(time.Millisecond))
	return exitOK
}

// tempKey names a snapshot the CLI makes for itself and removes again.
func tempKey(what string) string {
	return "overclone-" + what + "-" + strconv.Itoa(os.Getpid()) + "-" + strconv.FormatInt(time.Now().UnixNano(), 36)
}
