// Command overclone is the admin tool of the overclone snapshotter: each
// subcommand lives in its own file and is listed once in commands.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"sort"
)

// command is one subcommand. run gets the arguments after its name and
// returns the process exit code.
type command struct {
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) int
}

// commands is the dispatch table; add a subcommand here and in its own file.
var commands = map[string]command{
	"check":   {"probe what overlayfs can do under the snapshotter root", runCheck},
	"cp":      {"copy out of a snapshot, or into an active one, without mounting", runCp},
	"dedupe":  {"share extents between identical files of committed layers not deduped yet", runDedupe},
	"flatten": {"build the flattened layer of a committed snapshot's stack now", runFlatten},
	"gc":      {"remove (or with --dry-run list) what no snapshot owns", runGC},
	"health":  {"ask the daemon whether it serves (exit 0 if so)", runHealth},
	"usage":   {"list snapshots with their usage, and flattened layers", runUsage},
}

// Exit codes shared by the subcommands.
const (
	exitOK    = 0
	exitFail  = 1 // the subcommand ran and found a problem
	exitUsage = 2 // as the flag package uses for bad flags
)

// defaultRoot is where the snapshotter keeps its state, by the proxy
// snapshotter convention /var/lib/containerd-<name>.
const defaultRoot = "/var/lib/containerd-overclone"

func main() {
	os.Exit(dispatch(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
}

func dispatch(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		usage(stderr)
		if len(args) == 0 {
			return exitUsage
		}
		return exitOK
	}
	cmd, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "overclone: unknown command %q\n", args[0])
		usage(stderr)
		return exitUsage
	}
	return cmd.run(ctx, args[1:], stdout, stderr)
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: overclone <command> [flags]")
	fmt.Fprintln(w, "\ncommands:")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-10s %s\n", n, commands[n].summary)
	}
	fmt.Fprintln(w, "\nRun 'overclone <command> -h' for a command's flags.")
}
