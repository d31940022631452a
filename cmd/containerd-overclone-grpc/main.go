// Command containerd-overclone-grpc serves overclone's snapshotter to
// containerd over its snapshots gRPC API on a unix socket; containerd
// reaches it through [proxy_plugins].
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/containerd/log"

	"github.com/overclone/overclone/config"
	"github.com/overclone/overclone/overlayutil"
	"github.com/overclone/overclone/snapshotter"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "containerd-overclone-grpc: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fl := flag.NewFlagSet("containerd-overclone-grpc", flag.ContinueOnError)
	var (
		address     = fl.String("address", config.DefaultAddress, "unix socket to serve the snapshots API on")
		root        = fl.String("root", config.DefaultRoot, "directory for the metadata database and the layers")
		configPath  = fl.String("config", config.DefaultPath, "TOML configuration file (a missing default file means defaults)")
		logLevel    = fl.String("log-level", config.DefaultLogLevel, "trace, debug, info, warn or error")
		printConfig = fl.Bool("print-config", false, "print the effective configuration and exit")
		showVersion = fl.Bool("version", false, "print the version and exit")
	)
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fl.Args())
	}
	if *showVersion {
		fmt.Println("containerd-overclone-grpc", version)
		return nil
	}

	set := map[string]bool{}
	fl.Visit(func(f *flag.Flag) { set[f.Name] = true })
	cfg, err := config.Load(*configPath, !set["config"])
	if err != nil {
		return err
	}
	// Flags the user gave win over the file; the file wins over defaults.
	if set["address"] {
		cfg.Address = *address
	}
	if set["root"] {
		cfg.Root = *root
	}
	if set["log-level"] {
		cfg.LogLevel = *logLevel
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	if *printConfig {
		out, err := cfg.Encode()
		if err != nil {
			return err
		}
		_, err = os.Stdout.Write(out)
		return err
	}

	if err := log.SetLevel(cfg.LogLevel); err != nil {
		return err
	}
	if err := log.SetFormat(log.TextFormat); err != nil {
		return err
	}
	ctx := log.WithLogger(context.Background(), log.L.WithField("daemon", "overclone"))

	features, err := overlayutil.Probe(ctx, cfg.Root)
	if err != nil {
		return err
	}
	features.Log(ctx)
	opts := []snapshotter.Opt{
		snapshotter.WithMode(snapshotter.Mode(cfg.Mode)),
		snapshotter.WithFeatures(features),
		snapshotter.WithMaxStack(cfg.MaxStack),
		snapshotter.WithMountOptions(cfg.MountOptions),
		snapshotter.WithSyncOnCommit(cfg.SyncOnCommit),
		snapshotter.WithDefaultMaxSize(cfg.DefaultMaxSize),
		snapshotter.WithLimitBackend(snapshotter.LimitBackend(cfg.LimitBackend)),
		snapshotter.WithUsageMaxAge(time.Duration(cfg.UsageMaxAge)),
		snapshotter.WithDedupe(snapshotter.DedupeMode(cfg.Dedupe), cfg.DedupeMinSize),
		snapshotter.WithRemap(snapshotter.RemapPolicy(cfg.Remap)),
		snapshotter.WithDedupeCommitMinSize(cfg.DedupeCommitMinSize),
	}
	if cfg.Volatile {
		opts = append(opts, snapshotter.WithVolatile)
	}
	sn, err := snapshotter.New(ctx, cfg.Root, opts...)
	if err != nil {
		return err
	}
	return serve(ctx, cfg, sn)
}
