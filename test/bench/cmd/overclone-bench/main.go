// Command overclone-bench measures overclone against containerd's built-in
// overlayfs and native snapshotters, in one run, on loop-mounted ext4 and
// xfs, and writes the ratios as a table (stdout), Markdown and JSON (and
// with -plot an SVG chart) under a results directory.
//
// Every workload runs every target interleaved, several rounds, on the
// same filesystem: the machine it runs on is shared and noisy, so only the
// ratios measured side by side mean anything. Run it as root (loop
// devices, real mounts) with `make bench`, or `make bench BENCHFLAGS=-quick`.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/loopfs"
)

// params size the workloads. full fits `make bench` in about ten minutes
// on two loaded cores; quick in about one.
type params struct {
	fs           []loopfs.Kind
	loopSize     int64
	imageFiles   int
	calls        int
	callRounds   int
	walks        int
	unpackRounds int
	unpackCopy   int // rounds for the snapshotters that copy on Prepare
	starts       int
	startsCopy   int
	blockRounds  int
	commitFiles  int
	commitRounds int
	copyFiles    int
	copyRounds   int
	bigFile      int64
	bigRounds    int
	depths       []int
}

var full = params{
	fs:           []loopfs.Kind{loopfs.Ext4, loopfs.XFS},
	loopSize:     16 << 30,
	imageFiles:   10000,
	calls:        500, // 500 active + 500 views + 500 committed: Walk lists 1001
	callRounds:   1,
	walks:        50,
	unpackRounds: 2,
	unpackCopy:   1,
	starts:       100,
	startsCopy:   2,
	blockRounds:  3, // 1 on ext4, where both sides copy everything
	commitFiles:  10000,
	commitRounds: 3,
	copyFiles:    1000,
	copyRounds:   3,
	bigFile:      1 << 30,
	bigRounds:    3,
	depths:       []int{128, 500, 1000},
}

var quick = params{
	fs:           []loopfs.Kind{loopfs.XFS},
	loopSize:     8 << 30,
	imageFiles:   3000,
	calls:        200,
	callRounds:   1,
	walks:        5,
	unpackRounds: 1,
	unpackCopy:   1,
	starts:       20,
	startsCopy:   2,
	blockRounds:  2,
	commitFiles:  10000,
	commitRounds: 2,
	copyFiles:    1000,
	copyRounds:   2,
	bigFile:      256 << 20,
	bigRounds:    1,
	depths:       []int{128, 501},
}

var workloads = []string{"calls", "unpack", "commit", "copyup", "deep"}

func main() {
	var (
		quickFlag = flag.Bool("quick", false, "a one-minute run: xfs only, fewer rounds, smaller files, depths 128 and 501")
		out       = flag.String("out", "results", "directory for results.md, results.json and results.svg")
		plot      = flag.Bool("plot", false, "also write results.svg, a chart of the ratios")
		fsList    = flag.String("fs", "", "comma-separated filesystems (ext4,xfs); default: both, xfs with -quick")
		only      = flag.String("only", strings.Join(workloads, ","), "comma-separated workloads to run")
		child     = flag.String("child", "", "internal: measure one filesystem and write the raw report as JSON to this file")
		builtin   = flag.String("serve-builtin", "", "internal: serve containerd's built-in overlayfs snapshotter rooted here on -socket")
		socket    = flag.String("socket", "", "internal: the socket for -serve-builtin")
	)
	flag.Parse()
	if *builtin != "" {
		if err := serveBuiltin(*builtin, *socket); err != nil {
			fmt.Fprintln(os.Stderr, "serve built-in:", err)
			os.Exit(1)
		}
		return
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "overclone-bench needs root: it makes loop filesystems and mounts overlays")
		os.Exit(2)
	}
	p := full
	if *quickFlag {
		p = quick
	}
	if *fsList != "" {
		p.fs = nil
		for _, k := range strings.Split(*fsList, ",") {
			p.fs = append(p.fs, loopfs.Kind(k))
		}
	}
	want := map[string]bool{}
	for _, w := range strings.Split(*only, ",") {
		want[w] = true
	}
	flags := strings.Join(os.Args[1:], " ")
	rep := &Report{Started: time.Now(), Flags: flags, Host: hostInfo()}
	var err error
	if len(p.fs) > 1 && *child == "" {
		// One process per filesystem, so that nothing process-wide
		// carries from one loop filesystem to the next: before fileops
		// keyed what it learns about a filesystem by mount id, xfs on the
		// reused loop device inherited ext4's "no reflink" here.
		err = measureApart(rep, p.fs, *quickFlag, *only)
	} else {
		err = measure(rep, p, want)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	rep.Host.LoadEnd = loadavg()
	rep.Duration = time.Since(rep.Started).Round(time.Second).String()
	if *child != "" {
		js, err := json.Marshal(rep)
		if err == nil {
			err = os.WriteFile(*child, js, 0o644)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "write child report:", err)
			os.Exit(1)
		}
		return
	}
	rep.ratios()
	rep.check()
	rep.printTable(os.Stdout)
	if err := rep.write(*out, *plot); err != nil {
		fmt.Fprintln(os.Stderr, "write results:", err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "results in %s (took %s)\n", *out, rep.Duration)
}

// measure runs the workloads on each filesystem of p in this process.
func measure(rep *Report, p params, want map[string]bool) error {
	// The snapshotters log every build and start, and containerd's content
	// store warns that loop filesystems lack fsverity; the table is the
	// output, failures reach it as notes.
	log.SetLevel("error")
	ctx := namespaces.WithNamespace(context.Background(), "bench")
	tmp, err := os.MkdirTemp("", "overclone-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	// An interrupted run still unmounts its loop filesystems.
	var (
		mu   sync.Mutex
		open []*runTB
	)
	track := func(t *runTB) *runTB {
		mu.Lock()
		defer mu.Unlock()
		open = append(open, t)
		return t
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM)
	go func() {
		sig := <-sigs
		fmt.Fprintf(os.Stderr, "%v: cleaning up\n", sig)
		mu.Lock()
		for i := len(open) - 1; i >= 0; i-- {
			open[i].close()
		}
		os.RemoveAll(tmp)
		os.Exit(130)
	}()

	imgTB := track(newRunTB("image", tmp))
	var img *image
	if want["unpack"] {
		step("generate image", func() error {
			start := time.Now()
			img, err = genImage(ctx, imgTB.TempDir(), p.imageFiles)
			if err == nil {
				var gz int64
				for _, l := range img.layers {
					gz += l.Size
				}
				rep.note("test image: %d layers, %d regular files, %d MiB uncompressed, %d MiB gzipped, generated in %s",
					len(img.layers), img.files, img.bytes>>20, gz>>20, time.Since(start).Round(time.Millisecond))
			}
			return err
		}, rep)
	}
	for _, kind := range p.fs {
		tb := track(newRunTB(string(kind), tmp))
		e := &env{ctx: ctx, kind: kind, tb: tb, rep: rep, p: p, img: img, noted: map[string]bool{}}
		ok := step(fmt.Sprintf("%s: make loop filesystem", kind), func() error {
			e.dir = loopfs.MountSize(tb, kind, p.loopSize)
			return nil
		}, rep)
		if ok {
			for _, w := range []struct {
				name string
				run  func() error
			}{
				{"calls", e.benchCalls},
				{"unpack", e.benchUnpack},
				{"commit", e.benchCommit},
				{"copyup", e.benchCopyUp},
				{"deep", e.benchDeep},
			} {
				if !want[w.name] || (w.name == "unpack" && img == nil) {
					continue
				}
				step(fmt.Sprintf("%s: %s", kind, w.name), w.run, rep)
			}
		}
		mu.Lock()
		tb.close()
		mu.Unlock()
	}
	mu.Lock()
	imgTB.close()
	mu.Unlock()
	return nil
}

// step runs one workload; a failure (or a helper's Fatal) becomes a note
// in the report and the run goes on with the next one.
func step(name string, f func() error, rep *Report) (ok bool) {
	start := time.Now()
	fmt.Fprintf(os.Stderr, "%s %s ...\n", time.Now().Format("15:04:05"), name)
	defer func() {
		if r := recover(); r != nil {
			fe, isFatal := r.(fatalError)
			if !isFatal {
				panic(r)
			}
			rep.note("%s failed: %v", name, fe)
			ok = false
		}
	}()
	if err := f(); err != nil {
		rep.note("%s failed: %v", name, err)
		return false
	}
	fmt.Fprintf(os.Stderr, "%s %s done in %s\n", time.Now().Format("15:04:05"), name, time.Since(start).Round(time.Millisecond))
	return true
}

func hostInfo() HostInfo {
	var u unix.Utsname
	unix.Uname(&u)
	return HostInfo{
		Kernel:    unix.ByteSliceToString(u.Release[:]),
		CPUs:      runtime.NumCPU(),
		LoadStart: loadavg(),
		GoVersion: runtime.Version(),
	}
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// progress says what a workload is doing, so that a slow run shows where.
func (e *env) progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s   %s: %s\n", time.Now().Format("15:04:05"), e.kind, fmt.Sprintf(format, args...))
}
