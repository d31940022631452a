// Command overclone-image writes the DaemonSet's image as an OCI archive
// (`make image`); see hack/nodeimage.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"github.com/overclone/overclone/hack/nodeimage"
)

func main() {
	out := flag.String("out", "bin/overclone-image.tar", "the archive to write")
	name := flag.String("name", nodeimage.DefaultName, "the image name the archive carries")
	version := flag.String("version", nodeimage.DefaultVersion, "the version the binaries report")
	arch := flag.String("arch", runtime.GOARCH, "GOARCH of the binaries and the image")
	repo := flag.String("repo", ".", "the overclone module to build")
	flag.Parse()

	if err := run(*out, nodeimage.Options{RepoRoot: *repo, Name: *name, Version: *version, Arch: *arch}); err != nil {
		fmt.Fprintln(os.Stderr, "overclone-image:", err)
		os.Exit(1)
	}
}

func run(out string, opts nodeimage.Options) error {
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	work, err := os.MkdirTemp(filepath.Dir(out), ".overclone-image-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	opts.Work = work
	res, err := nodeimage.Build(opts, out)
	if err != nil {
		return err
	}
	fmt.Printf("%s: %s %s (%.1f MiB)\n", out, res.Name, res.Manifest.Digest, float64(res.Size)/(1<<20))
	return nil
}
