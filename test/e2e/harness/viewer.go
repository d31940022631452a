package harness

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strconv"

	"github.com/overclone/overclone/test/image"
)

// viewerOutDir is where a container sees its ViewerOut.
const viewerOutDir = "/out"

// ViewerOut is a host dir bind-mounted into a container, where the test
// image's viewer writes the views the tests compare. ctr now and then
// loses the stdout of a process that exits right after writing it
// (containerd/containerd#770): with containerd 1.6 one run of the suite in
// ten read an empty view from the built-in overlayfs. A file on the host is
// read after ctr returns, when the process has exited, so nothing races.
type ViewerOut struct{ Dir string }

// NewViewerOut makes a fresh out dir under parent for container id.
func NewViewerOut(parent, id string) (ViewerOut, error) {
	dir, err := os.MkdirTemp(parent, "out-"+id+"-")
	if err != nil {
		return ViewerOut{}, err
	}
	return ViewerOut{Dir: dir}, nil
}

// MountFlags are the `ctr run` flags that bind the dir into the container.
func (o ViewerOut) MountFlags() []string {
	return []string{"--mount", "type=bind,src=" + o.Dir + ",dst=" + viewerOutDir + ",options=rbind:rw"}
}

// Command is the process args that run the viewer's cmd (view or write)
// on the image's data dir and write the view to name in the dir.
func (o ViewerOut) Command(cmd, name string) []string {
	return []string{"/bin/viewer", cmd, "/" + image.DataDir, path.Join(viewerOutDir, name)}
}

// Read returns the view the viewer wrote to name. ctrOut is what ctr
// printed; the error shows it when the viewer wrote no view.
func (o ViewerOut) Read(name, ctrOut string) (string, error) {
	b, err := os.ReadFile(filepath.Join(o.Dir, name))
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("the viewer wrote no %s although ctr succeeded; ctr printed %q", name, ctrOut)
	}
	if err != nil {
		return "", err
	}
	return string(b), nil
}

// FillCommand is the process args that write size bytes in the
// container at file and, if that fails, the error to name in the dir.
func (o ViewerOut) FillCommand(file string, size int64, name string) []string {
	return []string{"/bin/viewer", "fill", file, strconv.FormatInt(size, 10), path.Join(viewerOutDir, name)}
}
