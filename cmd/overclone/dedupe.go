package main

import (
	"context"
	"flag"
	"fmt"
	"io"

	"github.com/overclone/overclone/snapshotter"
)

// runDedupe asks the daemon for a dedupe pass over the committed layers it
// has not deduped yet (those committed before dedupe was turned on, or
// whose dedupe was cut short), printing a line per layer and what was
// shared. With --dry-run nothing changes and the bytes are what would be
// shared.
func runDedupe(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("dedupe", flag.ContinueOnError)
	fs.SetOutput(stderr)
	d := addDaemonFlags(fs)
	dryRun := fs.Bool("dry-run", false, "report what would be shared, share nothing")
	if code, ok := parseFlags(fs, args, 0, ""); !ok {
		return code
	}
	conn, err := d.conn()
	if err != nil {
		fmt.Fprintf(stderr, "overclone dedupe: %v\n", err)
		return exitFail
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, *d.timeout)
	defer cancel()
	verb := "shared"
	if *dryRun {
		verb = "would share"
	}
	sum, err := snapshotter.AskDedupe(ctx, conn, *dryRun, func(r snapshotter.DedupeResult) {
		fmt.Fprintf(stdout, "[%d/%d] %s: %d files indexed, %d %s (%s)\n",
			r.Done, r.Total, r.Key, r.Files, r.SharedFiles, verb, humanBytes(r.SharedBytes))
	})
	if err != nil {
		fmt.Fprintf(stderr, "overclone dedupe: %v\n", err)
		return exitFail
	}
	fmt.Fprintf(stdout, "%d layers, %d files indexed, %d files %s with another layer: %s\n",
		sum.Layers, sum.Files, sum.SharedFiles, verb, humanBytes(sum.SharedBytes))
	return exitOK
}
