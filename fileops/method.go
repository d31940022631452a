package fileops

// Method is how data moved.
type Method uint8

const (
	MethodNone          Method = iota // nothing to move: already there, or no data
	MethodReflink                     // FICLONE / FICLONERANGE: extents shared
	MethodCopyFileRange               // copy_file_range(2): in-kernel copy
	MethodReadWrite                   // pread/pwrite through userspace
	MethodHardLink                    // linked to an earlier copy-up of the same lower inode
)

var methodNames = [...]string{"none", "reflink", "copy_file_range", "read_write", "hardlink"}

func (m Method) String() string {
	if int(m) < len(methodNames) {
		return methodNames[m]
	}
	return "unknown"
}

// CopyResult says how a copy-up was done.
type CopyResult struct {
	Method Method
	Bytes  int64 // file data written or shared
}

// RangeResult says how a range operation was done. Method is the one that
// moved most of the bytes; Cloned counts bytes shared by reflink.
type RangeResult struct {
	Method Method
	Bytes  int64 // bytes copied or cloned; for dedupe, bytes deduped
	Cloned int64
}
