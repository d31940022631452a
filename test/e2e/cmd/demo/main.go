// Command demo is what `make demo` runs: it starts overclone and a private
// containerd pointed at it, imports the test image with
// `--snapshotter overclone`, runs a container that writes the merged view it
// sees to a dir bound from the host, and stops everything it started, also
// when a step fails or on ^C.
//
//	go run ./test/e2e/cmd/demo -overclone bin/containerd-overclone-grpc
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/overclone/overclone/test/e2e/harness"
)

func main() {
	var (
		overclone     = flag.String("overclone", "bin/containerd-overclone-grpc", "the overclone daemon binary")
		containerdBin = flag.String("containerd-bin", harness.Containerd16Bin, "dir holding containerd, ctr and containerd-shim-runc-v2 (1.6 from Debian, or a 2.x build)")
		keep          = flag.Bool("keep", false, "keep the work dir (logs, configs) instead of removing it")
	)
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("demo: ")

	// ^C or SIGTERM cancels the current step; the deferred cleanup in run
	// then stops the daemons in order.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *overclone, *containerdBin, *keep); err != nil {
		log.Printf("FAILED: %v", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, overcloneBin, containerdBin string, keep bool) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("needs root: it starts containerd and mounts overlays")
	}
	if m := harness.Missing(containerdBin, harness.ContainerdTools...); m != "" {
		return fmt.Errorf("%s missing: `make deps` installs containerd and runc from Debian", m)
	}
	if overcloneBin, err = filepath.Abs(overcloneBin); err != nil {
		return err
	}
	if _, err := os.Stat(overcloneBin); err != nil {
		return fmt.Errorf("overclone daemon: %w (`make build` builds it)", err)
	}
	repo, err := os.Getwd()
	if err != nil {
		return err
	}

	dir, err := harness.TempDir("overclone-demo-")
	if err != nil {
		return err
	}
	// Cleanup runs last, whatever failed: the daemons first (containerd
	// removes its containers, overclone gets SIGTERM), then mounts, then
	// the dir.
	var stops []func() error
	defer func() {
		for i := len(stops) - 1; i >= 0; i-- {
			if serr := stops[i](); serr != nil {
				log.Printf("cleanup: %v", serr)
				if err == nil {
					err = serr
				}
			}
		}
		if uerr := harness.UnmountUnder(dir); uerr != nil {
			log.Printf("cleanup: %v", uerr)
		}
		if keep {
			log.Printf("kept %s", dir)
		} else {
			os.RemoveAll(dir)
		}
		log.Printf("stopped everything the demo started")
	}()

	step("building the test image (static viewer, 4 layers: whiteouts, an opaque dir, caps, a sparse and a 64 MiB file)")
	img, archive, err := harness.BuildImage(dir, repo)
	if err != nil {
		return err
	}

	step("starting overclone")
	if err := os.Mkdir(filepath.Join(dir, "oc"), 0o700); err != nil {
		return err
	}
	oc, err := harness.NewOverclone(overcloneBin, filepath.Join(dir, "oc"), "", log.Printf)
	if err != nil {
		return err
	}
	if err := oc.Start(ctx); err != nil {
		return err
	}
	stops = append(stops, oc.Stop)

	step("starting a private containerd with [proxy_plugins.overclone]")
	if err := os.Mkdir(filepath.Join(dir, "containerd"), 0o700); err != nil {
		return err
	}
	c, err := harness.StartContainerd(ctx, filepath.Join(dir, "containerd"),
		harness.ContainerdOptions{BinDir: containerdBin, Proxies: []harness.Proxy{{Name: harness.SnapshotterName, Overclone: oc}}}, log.Printf)
	if err != nil {
		return err
	}
	stops = append(stops, c.Stop)
	fmt.Printf("   config: %s\n", c.Config)

	ctr := func(args ...string) (string, error) {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		fmt.Printf("   $ ctr %s\n", strings.Join(args, " "))
		return c.Ctr(cctx, args...)
	}

	step("importing the image into overclone")
	start := time.Now()
	if _, err := ctr("images", "import", "--snapshotter", harness.SnapshotterName, archive); err != nil {
		return err
	}
	fmt.Printf("   imported and unpacked in %s\n", time.Since(start).Round(time.Millisecond))
	out, err := ctr("snapshots", "--snapshotter", harness.SnapshotterName, "ls")
	if err != nil {
		return err
	}
	fmt.Print(indent(out))

	step("running a container on overclone: it writes the merged view of /data to a dir bound from the host")
	// A file, not ctr's stdout: ctr now and then loses the output of a
	// process that exits at once (containerd/containerd#770).
	const id, viewFile = "overclone-demo", "view.txt"
	vo, err := harness.NewViewerOut(dir, id)
	if err != nil {
		return err
	}
	args := append([]string{"run", "--rm"}, vo.MountFlags()...)
	args = append(append(args, "--snapshotter", harness.SnapshotterName, harness.ImageName, id), vo.Command("view", viewFile)...)
	if out, err = ctr(args...); err != nil {
		return err
	}
	if out, err = vo.Read(viewFile, out); err != nil {
		return err
	}
	fmt.Print(indent(out))
	if out != img.Expected {
		return fmt.Errorf("the container's view differs from the image's layers:\n--- got\n%s--- want\n%s", out, img.Expected)
	}
	fmt.Println("   matches the image: deleted.txt whited out, opaque/ shows only new.txt,")
	fmt.Println("   deleted-dir/ recreated opaque, caps/ping keeps cap_net_raw, checksums right")

	step("removing the image; containerd's garbage collector removes overclone's snapshots")
	if _, err := ctr("images", "rm", "--sync", harness.ImageName); err != nil {
		return err
	}
	out, err = ctr("snapshots", "--snapshotter", harness.SnapshotterName, "ls")
	if err != nil {
		return err
	}
	fmt.Print(indent(out))
	return nil
}

func step(s string) { fmt.Printf("\n== %s\n", s) }

func indent(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString("   " + l + "\n")
	}
	return b.String()
}
