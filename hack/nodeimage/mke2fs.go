package nodeimage

import (
	"bufio"
	"bytes"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
)

// ToolDir holds mke2fs in the image, under the name overclone runs it by
// (mkfs.ext4, a link to mke2fs, which takes the filesystem type from the
// name it was called by); the image's PATH names it after BinDir.
const ToolDir = "/usr/sbin"

// Mke2fsConf is mke2fs's profile: it says what an ext4 is made of (the
// features of [fs_types] ext4). Shipping the build host's keeps the
// images the containerized daemon makes the same as the host's daemon
// makes, rather than whatever default mke2fs was compiled with.
const Mke2fsConf = "/etc/mke2fs.conf"

// A size limit is an ext4 image that overclone formats with mkfs.ext4
// (snapshotter/loopimage.go): the only tool the daemon runs. No Go
// library formats ext4, and mke2fs is a dynamically linked C program, so
// the image carries the build host's mke2fs (Debian's e2fsprogs, which
// `make deps` installs) with the shared libraries it links and their ELF
// loader, each at the path the host's loader found it, so that the
// loader finds them there again in the image. Nothing else of the host
// comes along: no shell, no libc for anything but mke2fs.

// hostMke2fs reads, from the build host, the files that make mke2fs run
// in the image, keyed by their path there. arch is the image's GOARCH:
// the host's mke2fs must be built for it.
func hostMke2fs(arch string) (map[string]entry, error) {
	bin, err := findMke2fs()
	if err != nil {
		return nil, err
	}
	f, err := elf.Open(bin)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", bin, err)
	}
	defer f.Close()
	if want, ok := elfMachines[arch]; !ok || f.Machine != want {
		return nil, fmt.Errorf("%s is for %s, not %s: build the image for %s on a %s host (it ships the host's mke2fs)", bin, f.Machine, arch, arch, arch)
	}
	loader := ""
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			b := make([]byte, p.Filesz)
			if _, err := p.ReadAt(b, 0); err != nil {
				return nil, fmt.Errorf("read the loader of %s: %w", bin, err)
			}
			loader = string(bytes.TrimRight(b, "\x00"))
		}
	}
	if loader == "" {
		return nil, fmt.Errorf("%s has no ELF loader (PT_INTERP)", bin)
	}
	libs, err := linkedLibraries(loader, bin)
	if err != nil {
		return nil, err
	}
	files := map[string]entry{}
	add := func(at, from string, mode int64) error {
		// Read through links: the image gets a regular file at the
		// path the loader looks at.
		b, err := os.ReadFile(from)
		if err != nil {
			return fmt.Errorf("read %s for the image: %w", from, err)
		}
		files[at] = entry{mode: mode, data: b}
		return nil
	}
	if err := add(path.Join(ToolDir, "mke2fs"), bin, 0o755); err != nil {
		return nil, err
	}
	files[path.Join(ToolDir, "mkfs.ext4")] = entry{mode: 0o777, link: "mke2fs"}
	for _, lib := range append(libs, loader) {
		if err := add(lib, lib, 0o755); err != nil {
			return nil, err
		}
	}
	if err := add(Mke2fsConf, Mke2fsConf, 0o644); err != nil {
		return nil, err
	}
	return files, nil
}

var elfMachines = map[string]elf.Machine{
	"amd64":   elf.EM_X86_64,
	"arm64":   elf.EM_AARCH64,
	"ppc64le": elf.EM_PPC64,
	"s390x":   elf.EM_S390,
	"riscv64": elf.EM_RISCV,
}

// findMke2fs is the host's mke2fs, links resolved (/sbin is often a link
// to /usr/sbin).
func findMke2fs() (string, error) {
	bin, err := exec.LookPath("mke2fs")
	if err != nil {
		for _, p := range []string{"/usr/sbin/mke2fs", "/sbin/mke2fs"} {
			if _, statErr := os.Stat(p); statErr == nil {
				bin, err = p, nil
				break
			}
		}
	}
	if err != nil {
		return "", fmt.Errorf("mke2fs not found on the build host (make deps installs e2fsprogs): %w", err)
	}
	return filepath.EvalSymlinks(bin)
}

// linkedLibraries asks the ELF loader which shared libraries bin loads
// and where (what ldd does): "name => /path (0x...)" lines; the vDSO has
// no file and the loader its own line.
func linkedLibraries(loader, bin string) ([]string, error) {
	out, err := exec.Command(loader, "--list", bin).Output()
	if err != nil {
		return nil, fmt.Errorf("%s --list %s: %w", loader, bin, err)
	}
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		_, after, ok := strings.Cut(sc.Text(), " => ")
		if !ok {
			continue
		}
		lib, _, _ := strings.Cut(strings.TrimSpace(after), " ")
		if !path.IsAbs(lib) {
			return nil, fmt.Errorf("%s --list %s: %q not found", loader, bin, sc.Text())
		}
		libs = append(libs, lib)
	}
	if len(libs) == 0 {
		return nil, fmt.Errorf("%s --list %s listed no libraries: %s", loader, bin, out)
	}
	return libs, nil
}
