// Package nodeimage builds the image the Kubernetes DaemonSet runs
// (deploy/kubernetes/overclone-daemonset.yaml): the daemon and the admin CLI,
// static, and the build host's mke2fs for size limits (mke2fs.go), on an
// otherwise empty root, written as an OCI archive that
// `ctr images import` reads. `make image` runs it through
// cmd/overclone-image.
//
// It lives under hack/, not cmd/: it is a build tool, not something a node
// runs. It must stay reproducible: the same source and Go toolchain give the
// same bytes, so that anyone can rebuild a published digest and compare.
// It never runs docker, and never pulls a base image: there is none.
package nodeimage

import (
	"archive/tar"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strings"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/overclone/overclone/config"
	"github.com/overclone/overclone/hack/ocilayout"
)

const (
	// Repository is where a release pushes the image.
	Repository = "ghcr.io/overclone/overclone"
	// DefaultVersion tags a build from a work tree. Not "latest": the
	// kubelet pulls a ":latest" image on every start (imagePullPolicy
	// Always), which fails for an image imported on the node and not
	// pushed anywhere.
	DefaultVersion = "dev"
	// BinDir holds both binaries in the image; the DaemonSet's command
	// and probes name them there.
	BinDir = "/usr/local/bin"
	// Daemon and CLI are the binaries' names, as cmd/ names them.
	Daemon = "containerd-overclone-grpc"
	CLI    = "overclone"
)

// DefaultName is the image `make image` writes and the DaemonSet runs.
var DefaultName = Repository + ":" + DefaultVersion

// Options say what to build.
type Options struct {
	RepoRoot string // the module to build the binaries from
	Name     string // the image name the archive carries; DefaultName if ""
	Version  string // what `containerd-overclone-grpc --version` prints; DefaultVersion if ""
	Arch     string // GOARCH of the binaries and the image platform
	Work     string // scratch dir for the binaries and the layout, emptied by the caller
}

// Result is what Build wrote.
type Result struct {
	Name     string
	Manifest ocispec.Descriptor // its digest is the image's digest
	Size     int64              // of the archive
}

// Build compiles the binaries, lays out the image under opts.Work and
// writes its archive to out.
func Build(opts Options, out string) (*Result, error) {
	if opts.Name == "" {
		opts.Name = DefaultName
	}
	if opts.Version == "" {
		opts.Version = DefaultVersion
	}
	files, err := hostMke2fs(opts.Arch)
	if err != nil {
		return nil, err
	}
	for _, name := range []string{Daemon, CLI} {
		b, err := goBuild(opts, name)
		if err != nil {
			return nil, err
		}
		files[path.Join(BinDir, name)] = entry{mode: 0o755, data: b}
	}
	l, err := ocilayout.New(filepath.Join(opts.Work, "layout"))
	if err != nil {
		return nil, err
	}
	layer, diffID, err := l.WriteLayer(true, func(w io.Writer) error { return writeRootfs(w, files) })
	if err != nil {
		return nil, fmt.Errorf("rootfs layer: %w", err)
	}
	platform := ocispec.Platform{OS: "linux", Architecture: opts.Arch}
	cfg := ocispec.Image{
		// No Created time: it would change the digest on every build.
		Platform: platform,
		Config: ocispec.ImageConfig{
			// So that `kubectl exec ... overclone usage` finds the CLI,
			// and the daemon mkfs.ext4.
			Env:        []string{"PATH=" + BinDir + ":" + ToolDir},
			Entrypoint: []string{path.Join(BinDir, Daemon)},
			WorkingDir: "/",
			Labels: map[string]string{
				ocispec.AnnotationVersion: opts.Version,
				ocispec.AnnotationSource:  "https://github.com/overclone/overclone",
			},
		},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{diffID}},
	}
	manifest, err := l.WriteImage(opts.Name, platform, cfg, []ocispec.Descriptor{layer})
	if err != nil {
		return nil, err
	}
	if err := l.WriteArchive(out); err != nil {
		return nil, err
	}
	fi, err := os.Stat(out)
	if err != nil {
		return nil, err
	}
	return &Result{Name: opts.Name, Manifest: manifest, Size: fi.Size()}, nil
}

// goBuild compiles ./cmd/<name> as the image needs it: static (no libc in
// the image, so no cgo), no paths of the build machine, no VCS stamp (a
// dirty tree or another clone would change the bytes), no build ID, and
// the version given rather than read from git.
func goBuild(opts Options, name string) ([]byte, error) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(opts.Work, "bin", name)
	cmd := exec.Command(goTool, "build", "-trimpath", "-buildvcs=false",
		"-ldflags", "-s -w -buildid= -X main.version="+opts.Version,
		"-o", bin, "./cmd/"+name)
	cmd.Dir = opts.RepoRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+opts.Arch, "GOFLAGS=")
	if b, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("go build ./cmd/%s: %w\n%s", name, err, b)
	}
	return os.ReadFile(bin)
}

// dirs are the image's directories besides BinDir's: the mount points the
// DaemonSet binds host paths onto, made here so that the image also runs
// under `ctr run` with plain bind mounts. Nothing else: the binaries exec
// no tool but mkfs.ext4 (overlay probes and mounts are syscalls), read no
// /etc/passwd, CA or zone file; /proc, /sys and /dev come from the runtime.
var dirs = map[string]int64{
	path.Dir(config.DefaultPath):    0o755, // /etc/containerd-overclone: the ConfigMap
	path.Dir(config.DefaultAddress): 0o700, // /run/containerd-overclone: the socket
	config.DefaultRoot:              0o700, // /var/lib/containerd-overclone
}

// entry is a file of the image: a regular file, a dir, or a symlink.
type entry struct {
	mode int64
	data []byte
	dir  bool
	link string
}

// writeRootfs writes the image's only layer: files, every dir of dirs
// and the parents of both, sorted by name, owned by 0:0, at
// ocilayout.Epoch.
func writeRootfs(w io.Writer, files map[string]entry) error {
	entries := map[string]entry{}
	addParents := func(p string) {
		for d := path.Dir(p); d != "/"; d = path.Dir(d) {
			if _, ok := entries[d]; !ok {
				entries[d] = entry{mode: 0o755, dir: true}
			}
		}
	}
	for d, mode := range dirs {
		entries[d] = entry{mode: mode, dir: true}
		addParents(d)
	}
	for p, e := range files {
		entries[p] = e
		addParents(p)
	}
	names := make([]string, 0, len(entries))
	for p := range entries {
		names = append(names, p)
	}
	sort.Strings(names)
	tw := tar.NewWriter(w)
	for _, p := range names {
		e := entries[p]
		hdr := &tar.Header{
			Name:     strings.TrimPrefix(p, "/"),
			Mode:     e.mode,
			ModTime:  ocilayout.Epoch,
			Typeflag: tar.TypeReg,
			Size:     int64(len(e.data)),
			Format:   tar.FormatUSTAR,
		}
		switch {
		case e.dir:
			hdr.Name += "/"
			hdr.Typeflag = tar.TypeDir
		case e.link != "":
			hdr.Typeflag = tar.TypeSymlink
			hdr.Linkname = e.link
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("tar header %s: %w", p, err)
		}
		if _, err := tw.Write(e.data); err != nil {
			return fmt.Errorf("write %s: %w", p, err)
		}
	}
	return tw.Close()
}
