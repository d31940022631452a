package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/overclone/overclone/config"

	"github.com/overclone/overclone/overlayutil"
	"github.com/overclone/overclone/snapshotter"
)

// checkReport is the --json form: the probe's findings and its verdicts.
type checkReport struct {
	*overlayutil.Features
	// RootMissing: --root does not exist, and check did not create it.
	RootMissing bool `json:"root_missing,omitempty"`
	CanServe    bool `json:"can_serve"`
	Intercepts  bool `json:"intercepts_file_ops"`
	MaxLowers   int  `json:"max_lowers"`
	// Mode is what --mode resolves to, and RemapIDs how that mode serves
	// user-namespaced snapshots (empty when the mode cannot serve).
	Mode        string `json:"mode,omitempty"`
	RemapIDs    string `json:"remap_ids,omitempty"`
	RemapIDsWhy string `json:"remap_ids_reason,omitempty"`
	// SizeLimits says whether containerd.io/snapshot/max-size can be
	// honoured, and how or why not; Usage how Usage is answered.
	SizeLimits snapshotter.LimitMechanism `json:"size_limits"`
	Usage      string                     `json:"usage"`
}

// runCheck probes overlayfs under --root and prints every check. It exits
// non-zero when overlay cannot serve snapshots there at all, so that it can
// gate an install script or a systemd ExecStartPre.
func runCheck(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	root := fs.String("root", defaultRoot, "snapshotter root; probes run in a scratch dir under it")
	asJSON := fs.Bool("json", false, "print the findings as JSON")
	mode := fs.String("mode", "auto", "the daemon's configured mode, to show what it resolves to")
	limitBackend := fs.String("limit-backend", config.DefaultLimitBackend, "the daemon's limit_backend (auto or image), to show how size limits are enforced")
	remapFlag := fs.String("remap", config.DefaultRemap, "the daemon's remap setting (auto or copy), to show how user-namespaced snapshots are served")
	usageMaxAge := fs.Duration("usage-max-age", time.Duration(config.DefaultUsageMaxAge), "the daemon's usage_max_age, to show how Usage is answered")
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			return exitOK
		}
		return exitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "overclone check: unexpected arguments %v\n", fs.Args())
		return exitUsage
	}
	policy, err := snapshotter.ParseRemap(*remapFlag)
	if err != nil {
		fmt.Fprintf(stderr, "overclone check: %v\n", err)
		return exitUsage
	}
	f, rootMissing, at, done, err := probeRoot(ctx, *root)
	if err != nil {
		fmt.Fprintf(stderr, "overclone check: %v\n", err)
		return exitFail
	}
	defer func() {
		if err := done(); err != nil {
			fmt.Fprintf(stderr, "overclone check: %v\n", err)
		}
	}()
	// Size limits depend on the mode the daemon would serve in; a mode
	// that cannot serve has none to offer.
	m, why, modeErr := snapshotter.ChooseMode(snapshotter.Mode(*mode), f)
	limits := snapshotter.LimitMechanism{How: fmt.Sprint("no mode can serve: ", modeErr)}
	if modeErr == nil {
		limits = snapshotter.ProbeRootLimits(m, at, snapshotter.LimitBackend(*limitBackend))
		// What a missing root was probed at is gone after check: name
		// the root instead.
		limits.How = strings.ReplaceAll(limits.How, at, f.Root)
		limits.Note = strings.ReplaceAll(limits.Note, at, f.Root)
	}
	usage := snapshotter.UsageMechanism(limits, *usageMaxAge)
	if *asJSON {
		r := checkReport{Features: f, RootMissing: rootMissing, CanServe: f.CanServe(), Intercepts: f.Intercepts(), MaxLowers: f.MaxLowers(), SizeLimits: limits, Usage: usage}
		if modeErr == nil {
			r.Mode = string(m)
			r.RemapIDs, r.RemapIDsWhy = snapshotter.RemapMechanism(m, f, policy)
		}
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(r); err != nil {
			fmt.Fprintf(stderr, "overclone check: %v\n", err)
			return exitFail
		}
	} else {
		printChecks(stdout, f)
		if rootMissing {
			fmt.Fprintf(stdout, "\nroot %s does not exist yet: probed in a scratch dir on the filesystem the daemon would create it on, and left as it was\n", f.Root)
		}
		if modeErr != nil {
			fmt.Fprintf(stdout, "\nmode (%s): cannot serve: %v\n", *mode, modeErr)
		} else {
			fmt.Fprintf(stdout, "\nmode (%s): %s: %s\n", *mode, m, why)
			remap, rwhy := snapshotter.RemapMechanism(m, f, policy)
			fmt.Fprintf(stdout, "remap-ids:   %s: %s\n", remap, rwhy)
		}
		fmt.Fprintf(stdout, "size limits: %s: %s\n", yesNo(limits.OK), limits.How)
		if limits.Note != "" {
			fmt.Fprintf(stdout, "             %s\n", limits.Note)
		}
		fmt.Fprintf(stdout, "usage:       %s\n", usage)
		if d := f.Get(overlayutil.CheckDedupe); d.OK {
			fmt.Fprintln(stdout, "dedupe: layers can share extents here (config dedupe = \"commit\" or \"background\" turns it on)")
		} else {
			fmt.Fprintf(stdout, "dedupe: not on this filesystem (%s); a configured dedupe stays off\n", d.Reason)
		}
	}
	if !f.CanServe() {
		if !*asJSON {
			fmt.Fprintf(stderr, "overclone check: overlayfs cannot serve snapshots under %s\n", f.Root)
		}
		return exitFail
	}
	return exitOK
}

func printChecks(w io.Writer, f *overlayutil.Features) {
	fmt.Fprintf(w, "root:        %s\n", f.Root)
	fmt.Fprintf(w, "backing fs:  %s\n", f.BackingFS)
	fmt.Fprintf(w, "kernel:      %s\n", f.KernelRelease)
	fmt.Fprintf(w, "can serve:   %s\n\n", yesNo(f.CanServe()))
	var table bytes.Buffer
	tw := tabwriter.NewWriter(&table, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CHECK\tRESULT\tVALUE\tREASON")
	for _, c := range f.Checks {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.Name, yesNo(c.OK), c.Value, c.Reason)
	}
	tw.Flush()
	// tabwriter pads a column even where the row's last cell is empty.
	for _, line := range strings.SplitAfter(table.String(), "\n") {
		fmt.Fprint(w, strings.TrimRight(line, " \n")+strings.Repeat("\n", strings.Count(line, "\n")))
	}
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
