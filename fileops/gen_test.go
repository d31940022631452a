package fileops

import (
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// genOpts shape a generated stack.
type genOpts struct {
	prefix    string // overlay xattr namespace
	redirects bool
	ops       int // per layer
}

var (
	genDirNames  = []string{"a", "b", "c"}
	genFileNames = []string{"a", "b", "f", "g", "h"}
	genLinks     = []string{"f", "../a", "/etc/passwd", "../../../../../etc", "a/b/c", "/"}
)

// capV2 is a valid security.capability (v2, effective, cap_net_bind_service).
var capV2 = []byte{0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}

// genStack fills layer dirs (given bottom first) with random entries drawn
// from a small name space, so that layers collide: replacements in both
// directions, whiteouts of both forms, opaque dirs, redirects, hard links,
// sparse files, xattrs. It is deterministic for a seed.
func genStack(t testing.TB, seed int64, layers []string, o genOpts) {
	t.Helper()
	rng := rand.New(rand.NewSource(seed))
	var lowerDirs []string // dirs created in layers below, for redirects
	for li, root := range layers {
		var files, whiteouts, dirs []string
		randPath := func(maxDepth int) string {
			d := 1 + rng.Intn(maxDepth)
			var parts []string
			for i := 0; i < d-1; i++ {
				parts = append(parts, genDirNames[rng.Intn(len(genDirNames))])
			}
			parts = append(parts, genFileNames[rng.Intn(len(genFileNames))])
			return strings.Join(parts, "/")
		}
		// prepare makes the parents of rel as dirs in this layer; it fails
		// when a parent is already a non-dir here or rel exists here.
		prepare := func(rel string) bool {
			p := filepath.Join(root, rel)
			dir, _ := parentName(rel)
			cur := root
			for _, c := range splitPath(dir) {
				cur = filepath.Join(cur, c)
				fi, err := os.Lstat(cur)
				if err == nil && !fi.IsDir() {
					return false
				}
				if err != nil {
					if err := os.Mkdir(cur, 0o755); err != nil {
						t.Fatal(err)
					}
				}
			}
			_, err := os.Lstat(p)
			return err != nil
		}
		meta := func(p string, dir bool) {
			modes := []uint32{0o644, 0o755, 0o600, 0o640, 0o4755, 0o2750, 0o1777}
			if dir {
				modes = []uint32{0o755, 0o700, 0o1777, 0o2775}
			}
			uid, gid := []int{0, 1000, 65534}[rng.Intn(3)], []int{0, 100, 1000}[rng.Intn(3)]
			if err := os.Lchown(p, uid, gid); err != nil {
				t.Fatal(err)
			}
			if rng.Intn(3) == 0 {
				mustXattr(t, p, "user.gen", "v"+string(rune('0'+rng.Intn(10))))
			}
			if rng.Intn(4) == 0 {
				mustXattr(t, p, "trusted.gen", "t")
			}
			if err := unix.Chmod(p, modes[rng.Intn(len(modes))]); err != nil {
				t.Fatal(err)
			}
			if !dir && rng.Intn(5) == 0 {
				// After chown and chmod: chown would drop it.
				mustXattr(t, p, "security.capability", string(capV2))
			}
		}
		for op := 0; op < o.ops; op++ {
			rel := randPath(3)
			p := filepath.Join(root, rel)
			switch r := rng.Intn(100); {
			case r < 35: // regular file
				if !prepare(rel) {
					continue
				}
				var data []byte
				switch rng.Intn(4) {
				case 0:
				case 1, 2:
					data = make([]byte, 1+rng.Intn(9000))
					rng.Read(data)
				case 3: // sparse: data, hole, data
					f, err := os.Create(p)
					if err != nil {
						t.Fatal(err)
					}
					b := make([]byte, 5000)
					rng.Read(b)
					f.WriteAt(b, 0)
					f.WriteAt(b, 3<<20+int64(rng.Intn(5000)))
					f.Close()
					meta(p, false)
					files = append(files, rel)
					continue
				}
				if err := os.WriteFile(p, data, 0o644); err != nil {
					t.Fatal(err)
				}
				meta(p, false)
				files = append(files, rel)
			case r < 50: // dir, maybe opaque
				if !prepare(rel) {
					continue
				}
				if err := os.Mkdir(p, 0o755); err != nil {
					t.Fatal(err)
				}
				if li > 0 && rng.Intn(4) == 0 {
					mustXattr(t, p, o.prefix+"opaque", "y")
				}
				// something inside, so that opaque and merge show
				mustWrite(t, filepath.Join(p, genFileNames[rng.Intn(len(genFileNames))]), []byte(rel), 0o644)
				meta(p, true)
				dirs = append(dirs, rel)
			case r < 58: // symlink
				if !prepare(rel) {
					continue
				}
				if err := os.Symlink(genLinks[rng.Intn(len(genLinks))], p); err != nil {
					t.Fatal(err)
				}
				if err := os.Lchown(p, 1000, 1000); err != nil {
					t.Fatal(err)
				}
			case r < 70: // char 0/0 whiteout, sometimes a hard link of another
				if !prepare(rel) {
					continue
				}
				if len(whiteouts) > 0 && rng.Intn(2) == 0 {
					if err := os.Link(filepath.Join(root, whiteouts[rng.Intn(len(whiteouts))]), p); err != nil {
						t.Fatal(err)
					}
				} else {
					mustWhiteout(t, p)
				}
				whiteouts = append(whiteouts, rel)
			case r < 76: // xattr whiteout in a dir marked opaque=x
				if !strings.Contains(rel, "/") || !prepare(rel) {
					continue
				}
				if err := os.WriteFile(p, nil, 0o644); err != nil {
					t.Fatal(err)
				}
				mustXattr(t, p, o.prefix+"whiteout", "")
				dir := filepath.Dir(p)
				if v, ok, _ := getXattr(dir, o.prefix+"opaque"); !ok || string(v) != "y" {
					mustXattr(t, dir, o.prefix+"opaque", "x")
				}
			case r < 84: // hard link inside this layer
				if len(files) == 0 || !prepare(rel) {
					continue
				}
				if err := os.Link(filepath.Join(root, files[rng.Intn(len(files))]), p); err != nil {
					t.Fatal(err)
				}
			case r < 88: // fifo and socket
				if !prepare(rel) {
					continue
				}
				mode := uint32(unix.S_IFIFO)
				if rng.Intn(2) == 0 {
					mode = unix.S_IFSOCK
				}
				if err := unix.Mknod(p, mode|0o640, 0); err != nil {
					t.Fatal(err)
				}
			default: // redirect to a dir of a lower layer
				if !o.redirects || len(lowerDirs) == 0 {
					continue
				}
				target := lowerDirs[rng.Intn(len(lowerDirs))]
				rel = joinRel(filepath.Dir(target), "r"+string(rune('0'+rng.Intn(3))))
				if filepath.Dir(target) == "." {
					rel = "r" + string(rune('0'+rng.Intn(3)))
				}
				if rng.Intn(2) == 0 {
					rel = "r" + string(rune('0'+rng.Intn(3)))
				}
				// A redirect is what a rename leaves: the old name is whited
				// out in the same layer. Without that whiteout the kernel
				// sees one lower dir at two places and refuses (ESTALE).
				if rel == target || strings.HasPrefix(target, rel+"/") || strings.HasPrefix(rel, target+"/") ||
					!prepare(target) || !prepare(rel) {
					continue
				}
				mustWhiteout(t, filepath.Join(root, target))
				p = filepath.Join(root, rel)
				if err := os.Mkdir(p, 0o755); err != nil {
					t.Fatal(err)
				}
				pd, _ := parentName(rel)
				td, tn := parentName(target)
				if pd == td {
					mustXattr(t, p, o.prefix+"redirect", tn)
				} else {
					mustXattr(t, p, o.prefix+"redirect", "/"+target)
				}
				mustWrite(t, filepath.Join(p, "g"), []byte("redirected "+rel), 0o644)
				dirs = append(dirs, rel)
			}
		}
		lowerDirs = append(lowerDirs, dirs...)
	}
}

// newLayers makes n empty layer dirs under base, returned bottom first.
func newLayers(t testing.TB, base string, n int) []string {
	t.Helper()
	var out []string
	for i := 0; i < n; i++ {
		d := filepath.Join(base, "l"+string(rune('0'+i/10))+string(rune('0'+i%10)))
		mustMkdir(t, d)
		out = append(out, d)
	}
	return out
}

// topFirst reverses a bottom-first list.
func topFirst(l []string) []string {
	out := make([]string, len(l))
	for i, d := range l {
		out[len(l)-1-i] = d
	}
	return out
}
