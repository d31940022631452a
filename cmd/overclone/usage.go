package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"text/tabwriter"

	"github.com/containerd/containerd/v2/core/snapshots"
	cfs "github.com/containerd/continuity/fs"

	"github.com/overclone/overclone/snapshotter"
)

// runUsage lists every snapshot with its usage, as the daemon reports it
// (what CRI sums: a layer deduped against another's copy does not count
// it), the bytes of its own directory in extents shared with another file
// and in extents of its own (FIEMAP), and the flattened layers cached
// under the root.
func runUsage(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("usage", flag.ContinueOnError)
	fs.SetOutput(stderr)
	d := addDaemonFlags(fs)
	root := fs.String("root", defaultRoot, "snapshotter root, for the flattened layers")
	if code, ok := parseFlags(fs, args, 0, ""); !ok {
		return code
	}
	ctx, sn, done, err := d.connect(ctx)
	if err != nil {
		fmt.Fprintf(stderr, "overclone usage: %v\n", err)
		return exitFail
	}
	defer done()

	var infos []snapshots.Info
	if err := sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		infos = append(infos, info)
		return nil
	}); err != nil {
		fmt.Fprintf(stderr, "overclone usage: %v\n", err)
		return exitFail
	}
	sort.Slice(infos, func(i, j int) bool { return infos[i].Name < infos[j].Name })
	sharing := askSharing(ctx, d, stderr)
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tKIND\tSIZE\tSHARED\tEXCLUSIVE\tINODES\tPARENT")
	var total int64
	for _, info := range infos {
		u, err := sn.Usage(ctx, info.Name)
		if err != nil {
			fmt.Fprintf(stderr, "overclone usage: %s: %v\n", info.Name, err)
			continue
		}
		total += u.Size
		shared, excl := "-", "-"
		if sh, ok := sharing[info.Name]; ok {
			shared, excl = humanBytes(sh.Shared), humanBytes(sh.Exclusive)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\n", info.Name, info.Kind, humanBytes(u.Size), shared, excl, u.Inodes, info.Parent)
	}
	tw.Flush()
	fmt.Fprintf(stdout, "%d snapshots, %s\n", len(infos), humanBytes(total))

	flats, _ := os.ReadDir(filepath.Join(*root, "flat"))
	if len(flats) == 0 {
		return exitOK
	}
	fmt.Fprintln(stdout, "\nflattened layers (snapshot id: size):")
	for _, f := range flats {
		u, err := cfs.DiskUsage(ctx, filepath.Join(*root, "flat", f.Name()))
		if err != nil {
			continue
		}
		fmt.Fprintf(stdout, "  %s: %s, %d inodes\n", f.Name(), humanBytes(u.Size), u.Inodes)
	}
	return exitOK
}

// askSharing asks the daemon for each snapshot's shared and exclusive
// bytes (FIEMAP); a daemon that cannot answer leaves the columns empty.
func askSharing(ctx context.Context, d daemonFlags, stderr io.Writer) map[string]snapshotter.SnapshotSharing {
	conn, err := d.conn()
	if err != nil {
		return nil
	}
	defer conn.Close()
	list, err := snapshotter.AskSharing(ctx, conn)
	if err != nil {
		fmt.Fprintf(stderr, "overclone usage: shared and exclusive bytes: %v\n", err)
		return nil
	}
	out := make(map[string]snapshotter.SnapshotSharing, len(list))
	for _, sh := range list {
		out[sh.Key] = sh
	}
	return out
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
