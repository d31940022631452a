// Command viewer is the entrypoint of the end-to-end test image. It is built
// static (CGO_ENABLED=0) because the image has no libc.
//
// It prints the merged view a container sees, one line per path, in the same
// format test/image.Image.ExpectedView produces from the layer model, so a
// test compares the two byte for byte:
//
//	viewer view [root [out]]   print the view of root (default /data)
//	viewer write [root [out]]  change files the lower layers own, then print the view
//	viewer sleep               print "ready" and wait for SIGTERM (restart tests)
//	viewer rename old new      rename a file or dir, as mv does (CRI exec tests)
//	viewer fill path bytes [errout]
//	                           write a file of that many bytes and fsync it;
//	                           on failure, write the error to errout too
//
// With out, the view goes to the file out instead of stdout. The tests bind
// a host dir into the container and read the view from there: ctr now and
// then loses the stdout of a process that exits right after writing it
// (containerd/containerd#770), which the tests saw as an empty view.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/overclone/overclone/test/image/view"
)

const defaultRoot = "/data"

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "viewer:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 4 && args[0] == "fill" {
		// The error goes to a file the test reads from the host: ctr
		// may lose what a process writes just before it exits.
		err := run(args[:3])
		if err != nil {
			if werr := os.WriteFile(args[3], []byte(err.Error()), 0o644); werr != nil {
				return fmt.Errorf("%w (and writing it to %s: %v)", err, args[3], werr)
			}
		}
		return err
	}
	if len(args) == 3 {
		switch args[0] {
		case "rename":
			return rename(args[1], args[2])
		case "fill":
			size, err := strconv.ParseInt(args[2], 10, 64)
			if err != nil {
				return fmt.Errorf("fill: size: %w", err)
			}
			return fill(args[1], size)
		}
	}
	cmd, root, out := "view", defaultRoot, ""
	if len(args) > 0 {
		cmd = args[0]
	}
	if len(args) > 1 {
		root = args[1]
	}
	if len(args) > 2 {
		out = args[2]
	}
	if len(args) > 3 {
		return fmt.Errorf("too many arguments: %q", args[3:])
	}
	switch cmd {
	case "view":
		return emit(root, out)
	case "write":
		if err := write(root); err != nil {
			return err
		}
		return emit(root, out)
	case "sleep":
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		fmt.Println("ready")
		<-sig
		return nil
	default:
		return fmt.Errorf("unknown command %q (view, write, sleep, rename, fill)", cmd)
	}
}

// emit writes the view of root to stdout, or to the file out. The file
// appears under its name only once complete (written under a temporary
// name, then renamed), so a test that finds it never reads half a view. It
// is not fsynced: the test reads it through the same host's page cache
// after the container exited, and a sync would add a journal commit to the
// runs the tests time.
func emit(root, out string) error {
	if out == "" {
		return view.Write(os.Stdout, root)
	}
	f, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	err = view.Write(f, root)
	if cerr := f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close %s: %w", tmp, cerr)
	}
	if err == nil {
		err = os.Rename(tmp, out)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// write changes the container's upper layer in the ways that make a
// snapshotter copy up or white out: append to a lower file, create a file and
// a dir, remove a lower file, chmod a lower file.
func write(root string) error {
	f, err := os.OpenFile(filepath.Join(root, view.AppendFile), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(view.AppendLine); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(root, view.CreatedDir), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(root, view.CreatedFile), []byte(view.CreatedContent), 0o644); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(root, view.RemovedFile)); err != nil {
		return err
	}
	return os.Chmod(filepath.Join(root, view.ChmodFile), 0o600)
}
