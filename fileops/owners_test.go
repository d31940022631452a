package fileops

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/overclone/overclone/test/loopfs"
)

// TestFlattenOwnerMap: WithOwnerMap makes each entry with the owner the map
// gives it, keeping what a chown afterwards would drop (the set-id bit and
// the capability the map hands back), and shifts a hard-linked inode once.
// The rest of the copy is the copy Flatten makes without it.
func TestFlattenOwnerMap(t *testing.T) {
	needRoot(t)
	base := loopfs.Mount(t, loopfs.XFS)
	layer := filepath.Join(base, "layer")
	mustMkdir(t, filepath.Join(layer, "d"))
	mustWrite(t, filepath.Join(layer, "d", "f"), []byte("f"), 0o644)
	if err := os.Lchown(filepath.Join(layer, "d"), 1000, 1000); err != nil {
		t.Fatal(err)
	}
	s := filepath.Join(layer, "s")
	mustWrite(t, s, []byte("s"), 0o755)
	// cap_net_raw+ep, version 2 (no owner), as setcap writes it.
	oldCaps := []byte{0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	if err := unix.Lsetxattr(s, capabilityXattr, oldCaps, 0); err != nil {
		t.Fatal(err)
	}
	if err := unix.Chmod(s, 0o4755); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(s, filepath.Join(layer, "s-link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("d/f", filepath.Join(layer, "l")); err != nil {
		t.Fatal(err)
	}
	stack, err := NewStack("", []string{layer}, WithVerbatim())
	if err != nil {
		t.Fatal(err)
	}

	const shift = 100000
	// The same, version 3, owned by the shifted root.
	newCaps := append([]byte{0x01, 0x00, 0x00, 0x03}, oldCaps[4:]...)
	newCaps = append(newCaps, 0xa0, 0x86, 0x01, 0x00) // 100000
	calls := 0
	shifted := WithOwnerMap(func(uid, gid uint32, caps []byte) (uint32, uint32, []byte, error) {
		calls++
		if caps != nil && !bytes.Equal(caps, oldCaps) {
			t.Errorf("the map got capability %x, want the source's %x", caps, oldCaps)
		}
		if caps != nil {
			caps = newCaps
		}
		return uid + shift, gid + shift, caps, nil
	})
	plain, mapped := filepath.Join(base, "plain"), filepath.Join(base, "mapped")
	if _, err := Flatten(context.Background(), stack, plain); err != nil {
		t.Fatal(err)
	}
	stats, err := Flatten(context.Background(), stack, mapped, shifted)
	if err != nil {
		t.Fatal(err)
	}
	// The root, d, d/f, s (once for both names), l.
	if calls != 5 || stats.HardLinks != 1 {
		t.Errorf("the map was called %d times (hard links %d), want 5: once per inode", calls, stats.HardLinks)
	}

	for _, p := range []string{".", "d", "d/f", "s", "s-link", "l"} {
		var want, got unix.Stat_t
		if err := unix.Lstat(filepath.Join(plain, p), &want); err != nil {
			t.Fatal(err)
		}
		if err := unix.Lstat(filepath.Join(mapped, p), &got); err != nil {
			t.Fatal(err)
		}
		if got.Uid != want.Uid+shift || got.Gid != want.Gid+shift {
			t.Errorf("%s owned by %d:%d, want %d:%d", p, got.Uid, got.Gid, want.Uid+shift, want.Gid+shift)
		}
		if got.Mode != want.Mode || got.Nlink != want.Nlink || got.Size != want.Size || got.Mtim != want.Mtim {
			t.Errorf("%s is mode %o nlink %d size %d mtime %v, want what the plain copy has: %o %d %d %v",
				p, got.Mode, got.Nlink, got.Size, got.Mtim, want.Mode, want.Nlink, want.Size, want.Mtim)
		}
	}
	buf := make([]byte, 64)
	n, err := unix.Lgetxattr(filepath.Join(mapped, "s"), capabilityXattr, buf)
	if err != nil || !bytes.Equal(buf[:n], newCaps) {
		t.Errorf("s's capability is %x (%v), want the mapped %x", buf[:max(n, 0)], err, newCaps)
	}

	// A map that refuses an owner stops the copy with its error.
	refused := errors.New("outside the mapping")
	_, err = Flatten(context.Background(), stack, filepath.Join(base, "refused"), WithOwnerMap(func(uid, gid uint32, caps []byte) (uint32, uint32, []byte, error) {
		if uid == 1000 {
			return 0, 0, nil, refused
		}
		return uid, gid, caps, nil
	}))
	if !errors.Is(err, refused) {
		t.Errorf("Flatten with a refused owner: %v, want %v", err, refused)
	}
}
