package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"

	"google.golang.org/grpc"

	"github.com/overclone/overclone/snapshotter"
)

// runGC removes what no snapshot's metadata names (directories left by a
// crash, the trash) and returns once it is deleted, or with --dry-run lists
// it with its size. containerd calls Cleanup only after its own garbage
// collector marks the snapshotter dirty, so on a busy node orphans can pile
// up between collections.
//
// A running daemon is asked over its socket (it holds the database); a
// root no daemon serves is read directly.
func runGC(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("gc", flag.ContinueOnError)
	fs.SetOutput(stderr)
	d := addDaemonFlags(fs)
	root := fs.String("root", defaultRoot, "snapshotter root, when no daemon serves it")
	dryRun := fs.Bool("dry-run", false, "list what would be removed, with sizes, and remove nothing")
	if code, ok := parseFlags(fs, args, 0, ""); !ok {
		return code
	}
	live := daemonAnswers(ctx, d)
	var err error
	switch {
	case *dryRun && live:
		err = printOrphans(ctx, stdout, func(ctx context.Context) ([]snapshotter.Orphan, error) {
			conn, err := d.conn()
			if err != nil {
				return nil, err
			}
			defer conn.Close()
			return snapshotter.AskOrphans(ctx, conn)
		})
	case *dryRun:
		err = printOrphans(ctx, stdout, func(ctx context.Context) ([]snapshotter.Orphan, error) {
			return snapshotter.ListOrphans(ctx, *root)
		})
	case live:
		// Collect, not the snapshots API's Cleanup: Cleanup returns
		// once the orphans are in the trash, and who runs gc by hand
		// wants the space back before it returns.
		var conn *grpc.ClientConn
		if conn, err = d.conn(); err == nil {
			defer conn.Close()
			cctx, cancel := context.WithTimeout(ctx, *d.timeout)
			defer cancel()
			err = snapshotter.AskCollect(cctx, conn)
		}
	default:
		var s *snapshotter.Snapshotter
		if s, err = snapshotter.New(ctx, *root, snapshotter.WithExistingRoot); err == nil {
			err = s.Collect(ctx)
			s.Close()
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "overclone gc: %v\n", err)
		return exitFail
	}
	return exitOK
}

func printOrphans(ctx context.Context, w io.Writer, list func(context.Context) ([]snapshotter.Orphan, error)) error {
	orphans, err := list(ctx)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PATH\tSIZE\tINODES\tWHY")
	var total int64
	for _, o := range orphans {
		total += o.Size
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\n", o.Path, humanBytes(o.Size), o.Inodes, o.Reason)
	}
	tw.Flush()
	fmt.Fprintf(w, "%d orphans, %s\n", len(orphans), humanBytes(total))
	return nil
}
