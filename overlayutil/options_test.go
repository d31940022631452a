package overlayutil

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
)

func TestOverlayMountShapes(t *testing.T) {
	opts := Options{IndexOff: true, UserXattr: true, RedirectDir: true, Volatile: true, MountOptions: []string{"nosuid", "xino=off"}}
	for _, tc := range []struct {
		name          string
		lowers        []string
		upper, work   string
		opts          Options
		want          mount.Mount
		wantErrSubstr string
	}{
		{
			name: "active", lowers: []string{"/r/l/2", "/r/l/1"}, upper: "/r/s/3/fs", work: "/r/s/3/work", opts: opts,
			want: mount.Mount{Type: "overlay", Source: "overlay", Options: []string{
				"index=off", "userxattr", "redirect_dir=on", "volatile", "nosuid", "xino=off",
				"workdir=/r/s/3/work", "upperdir=/r/s/3/fs", "lowerdir=/r/l/2:/r/l/1"}},
		},
		{
			name: "view: no volatile without an upper", lowers: []string{"/r/l/2", "/r/l/1"}, opts: opts,
			want: mount.Mount{Type: "overlay", Source: "overlay", Options: []string{
				"index=off", "userxattr", "redirect_dir=on", "nosuid", "xino=off", "lowerdir=/r/l/2:/r/l/1"}},
		},
		{
			name: "the config's choice wins", lowers: []string{"/r/l/1"}, upper: "/u", work: "/w",
			opts: Options{IndexOff: true, RedirectDir: true, Volatile: true, MountOptions: []string{"index=on", "redirect_dir=follow", "volatile"}},
			want: mount.Mount{Type: "overlay", Source: "overlay", Options: []string{
				"index=on", "redirect_dir=follow", "volatile", "workdir=/w", "upperdir=/u", "lowerdir=/r/l/1"}},
		},
		{
			name: "no options", lowers: []string{"/r/l/1"}, upper: "/u", work: "/w",
			want: mount.Mount{Type: "overlay", Source: "overlay", Options: []string{"workdir=/w", "upperdir=/u", "lowerdir=/r/l/1"}},
		},
		{
			name: "no parent: bind of the upper", upper: "/u", work: "/w", opts: opts,
			want: mount.Mount{Type: "bind", Source: "/u", Options: []string{"rw", "rbind"}},
		},
		{
			name: "view of one layer: read-only bind", lowers: []string{"/r/l/1"}, opts: opts,
			want: mount.Mount{Type: "bind", Source: "/r/l/1", Options: []string{"ro", "rbind"}},
		},
		{name: "nothing", wantErrSubstr: "no lowers and no upper"},
		{name: "upper without work", lowers: []string{"/a"}, upper: "/u", wantErrSubstr: "both upper"},
		{name: "colon in a path", lowers: []string{"/a:b", "/c"}, wantErrSubstr: "contains ':'"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := OverlayMount(tc.lowers, tc.upper, tc.work, tc.opts)
			if tc.wantErrSubstr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErrSubstr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErrSubstr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got  %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

// TestCompactionModel pins the model to what containerd v2.4's
// compactLowerdirOption does with each shape; TestDeepStacks checks it
// against the lowerdir the kernel really got.
func TestCompactionModel(t *testing.T) {
	pad := "upperdir=/" + strings.Repeat("u", 3600) // past the compaction threshold
	for _, tc := range []struct {
		name      string
		opts      []string
		wantChdir string
		wantLower string
	}{
		{"short options are left alone", []string{"lowerdir=/r/l/ab:/r/l/ac"}, "", "lowerdir=/r/l/ab:/r/l/ac"},
		{"prefix inside a name is cut to its dir", []string{pad, "lowerdir=/r/l/ab:/r/l/ac"}, "/r/l/", "lowerdir=ab:ac"},
		{"prefix ending on a slash", []string{pad, "lowerdir=/r/l/b:/r/l/c"}, "/r/l/", "lowerdir=b:c"},
		{"built-in shape", []string{pad, "lowerdir=/r/snapshots/12/fs:/r/snapshots/11/fs"}, "/r/snapshots/", "lowerdir=12/fs:11/fs"},
		{"one lower", []string{pad, "lowerdir=/r/l/ab"}, "", "lowerdir=/r/l/ab"},
		{"common dir is /", []string{pad, "lowerdir=/a:/b"}, "", "lowerdir=/a:/b"},
		{"relative, no common dir", []string{pad, "lowerdir=a:b"}, "", "lowerdir=a:b"},
		{"a lower is the common dir", []string{pad, "lowerdir=/r/l/:/r/l/a"}, "", "lowerdir=/r/l/:/r/l/a"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			chdir, data := MountData(mount.Mount{Type: "overlay", Options: append([]string{"ro"}, tc.opts...)}, 4096)
			if chdir != tc.wantChdir {
				t.Errorf("chdir = %q, want %q", chdir, tc.wantChdir)
			}
			if !strings.HasSuffix(data, tc.wantLower) {
				t.Errorf("data ends %q, want %q", data[max(0, len(data)-60):], tc.wantLower)
			}
			if strings.Contains(data, "ro,") || strings.HasPrefix(data, "ro") {
				t.Errorf("flag ro left in the data: %.40q", data)
			}
		})
	}
}

func TestStackTooDeep(t *testing.T) {
	lowers := make([]string, DefaultMaxLowers+1)
	for i := range lowers {
		lowers[i] = "/r/l/" + string(rune('a'+i%26))
	}
	_, err := OverlayMount(lowers, "/u", "/w", Options{})
	var fe *FitError
	if !errors.Is(err, ErrStackTooDeep) || !errors.As(err, &fe) {
		t.Fatalf("err = %v, want ErrStackTooDeep", err)
	}
	if fe.Fits != DefaultMaxLowers || fe.Lowers != DefaultMaxLowers+1 || fe.Limit != DefaultMaxLowers {
		t.Errorf("FitError = %+v", fe)
	}
	if _, err := OverlayMount(lowers[:10], "/u", "/w", Options{MaxLowers: 9}); !errors.Is(err, ErrStackTooDeep) {
		t.Errorf("probed limit 9 not applied: %v", err)
	}
	if n := FitDepth(lowers, "/u", "/w", Options{MaxLowers: 9}); n != 9 {
		t.Errorf("FitDepth with limit 9 = %d", n)
	}
}
