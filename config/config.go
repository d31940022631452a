// Package config is overclone's TOML configuration: what each setting
// means, its default, and how a file is read. A setting the file does not
// name keeps its default; a key the file names that overclone does not know
// is an error, so that a typo never silently falls back to a default.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
)

const (
	// DefaultPath is read when --config is not given; its absence is
	// fine and means defaults.
	DefaultPath = "/etc/containerd-overclone/config.toml"
	// DefaultRoot follows the containerd-<name> convention of proxy
	// snapshotters; containerd's own state lives in /var/lib/containerd.
	DefaultRoot = "/var/lib/containerd-overclone"
	// DefaultAddress is the socket containerd's [proxy_plugins] names.
	DefaultAddress = "/run/containerd-overclone/containerd-overclone-grpc.sock"
	// DefaultLogLevel is containerd's own default.
	DefaultLogLevel = "info"
	// DefaultMode lets overclone decide from what the kernel can do.
	DefaultMode = "auto"
	// DefaultShutdownTimeout bounds how long SIGTERM waits for calls in
	// flight; kubelet's default grace period is 30 s, so stay under it.
	DefaultShutdownTimeout = Duration(10 * time.Second)
	// DefaultContainerdAddress is containerd's own default socket: the
	// diff service writes the layers it makes to containerd's content
	// store through it.
	DefaultContainerdAddress = "/run/containerd/containerd.sock"
	// DefaultLimitBackend uses btrfs qgroups for size limits where the
	// operator enabled quotas on the root's btrfs, images elsewhere.
	DefaultLimitBackend = "auto"
	// DefaultUsageMaxAge is off: Usage as fresh as the built-in's unless
	// the operator trades freshness for CPU (snapshotter/usagecache.go).
	DefaultUsageMaxAge = Duration(0)
	// MinMaxSize is the smallest default_max_size (snapshotter.MinMaxSize).
	MinMaxSize = 32 << 20
	// DefaultRemap uses idmapped layers for user-namespaced snapshots
	// where the kernel has them, and the shifted copy elsewhere.
	DefaultRemap = "auto"
	// DefaultDedupe is off until a node's images are known to share
	// files across layers: a pass reads every indexed file once.
	DefaultDedupe = "off"
	// DefaultDedupeMinSize indexes every file with data: most of an
	// image's files are a block or two, and the disk target of issue 17
	// (<= 0.15x the built-in) needs them (16 KiB gave 0.238x, 1 byte
	// 0.121x). Their cost is kept out of Commit by
	// DefaultDedupeCommitMinSize.
	DefaultDedupeMinSize = 1
	// DefaultDedupeCommitMinSize is the smallest file a Commit dedupes in
	// "commit" mode; the smaller ones are left to the idle worker. At
	// 64 KiB Commit has 296 files of a Debian base's 4504 (101 of its
	// 130 MiB) to share, and an unpack with "commit" stayed within
	// 1.15x of one without in 5 runs of 5 (README).
	DefaultDedupeCommitMinSize = 64 << 10
)

// Config is the whole configuration file.
type Config struct {
	// Root holds the metadata database and every layer.
	// Default "/var/lib/containerd-overclone".
	Root string `toml:"root"`
	// Address is the unix socket the gRPC snapshots API is served on.
	// Default "/run/containerd-overclone/containerd-overclone-grpc.sock".
	Address string `toml:"address"`
	// LogLevel is one of trace, debug, info, warn, error. Default "info".
	LogLevel string `toml:"log_level"`
	// Mode is how snapshots are served: "overlay" (layers as diffs,
	// overlay mounts), "userspace" (every snapshot a complete directory
	// made by overclone's engine, reflinked where the filesystem can,
	// bind mounts: no overlay needed), or "auto", which picks overlay
	// where the kernel's overlay serves the root and intercepts file
	// operations on merged files. A root keeps the mode it was created
	// in. Default "auto".
	Mode string `toml:"mode"`
	// MaxStack caps the layers of one overlay mount; a deeper image gets
	// its bottom layers flattened into one cached layer. 0 means as deep
	// as the kernel and the one-page mount options allow (500 on Linux).
	// Default 0.
	MaxStack int `toml:"max_stack"`
	// MountOptions are appended verbatim to every overlay mount handed to
	// containerd (for example "metacopy=on"). Default none.
	MountOptions []string `toml:"mount_options"`
	// Volatile mounts active snapshots with overlay's "volatile": the
	// upper is never synced, so a crash of the host loses the container's
	// writes (never a committed layer). Default false.
	Volatile bool `toml:"volatile"`
	// SyncOnCommit makes Commit return only once the layer's data is on
	// disk. containerd syncs nothing by default, and a power cut can leave
	// committed layers with empty files that a re-pull does not repair.
	// Default true.
	SyncOnCommit bool `toml:"sync_on_commit"`
	// ShutdownTimeout is how long SIGTERM waits for calls in flight
	// before closing anyway. Default "10s".
	ShutdownTimeout Duration `toml:"shutdown_timeout"`
	// MetricsAddress serves Prometheus metrics on /metrics and a health
	// check on /healthz (200 only while the metadata is readable and the
	// root writable): "127.0.0.1:PORT" or "unix:///path". Default ""
	// (off), as containerd's own metrics are opt-in.
	MetricsAddress string `toml:"metrics_address"`
	// DefaultMaxSize limits the writable layer of every container whose
	// active snapshot carries no containerd.io/snapshot/max-size label,
	// in bytes: writes past it fail with ENOSPC inside the container.
	// Layers being unpacked are never limited by it. A label of "0"
	// opts a container out. Needs overlay mode, and mkfs.ext4 and loop
	// devices or a btrfs root with quotas enabled (`overclone check`
	// says); the daemon refuses to start if it
	// is set and cannot be honoured. Default 0 (no limit).
	DefaultMaxSize int64 `toml:"default_max_size"`
	// LimitBackend is how size limits are enforced: "auto" makes a
	// limited container's writable layer a btrfs subvolume with a qgroup
	// limit where the root is on btrfs and quotas are enabled on its
	// filesystem (the daemon never enables them: `btrfs quota enable
	// ROOT`), and an ext4 image elsewhere; "image" always uses an image.
	// Default "auto".
	LimitBackend string `toml:"limit_backend"`
	// UsageMaxAge is how stale the Usage of an unlimited active snapshot
	// may be when polled (CRI asks every 10 s; each answer is a walk of
	// the container's upper). "0s" walks on every call, as containerd's
	// built-in does; "30s" cuts a node's polling CPU to a third for
	// figures up to 30 s older. Size-limited snapshots' bytes come from
	// their image's or qgroup's counters and are never stale; on the
	// qgroup path their inodes are counted again in the background at
	// most every 30 s, or every usage_max_age where that is longer.
	// Default "0s".
	UsageMaxAge Duration `toml:"usage_max_age"`
	// Remap is how user-namespaced snapshots (containerd's uid/gid
	// mapping labels) are served: "auto" hands out idmapped lower layers
	// where the kernel and the root's filesystem have them, and a
	// reflinked copy of the image with the owners shifted elsewhere;
	// "copy" always makes that copy, for nodes whose kernel has idmapped
	// mounts that misbehave (a copy per image and mapping, shared by the
	// snapshots that use it; see README "User-namespaced containers").
	// Default "auto".
	Remap string `toml:"remap"`
	// Dedupe makes identical files in different committed layers share
	// their extents (FIDEDUPERANGE: the kernel compares the bytes and
	// shares only what is equal), on filesystems that can (xfs with
	// reflink=1, btrfs; elsewhere it stays off with a log line): "off",
	// "commit" (in each Commit, after its metadata is recorded: Commit
	// returns once the layer is deduped) or "background" (a worker
	// dedupes committed layers one at a time, and at start those it has
	// not seen). `overclone dedupe` does the layers committed before it
	// was on. Default "off": it reads every file of every layer it
	// indexes, and what it saves depends on the images a node holds.
	Dedupe string `toml:"dedupe"`
	// DedupeMinSize is the smallest file, in bytes, dedupe indexes.
	// Default 1.
	DedupeMinSize int64 `toml:"dedupe_min_size"`
	// DedupeCommitMinSize, when above dedupe_min_size, splits "commit"
	// mode: Commit dedupes the files of at least this many bytes and
	// returns; the smaller ones (down to dedupe_min_size) are deduped by
	// a worker once no layer is being unpacked. 0 (or not above
	// dedupe_min_size): every file in Commit. Default 65536.
	DedupeCommitMinSize int64 `toml:"dedupe_commit_min_size"`
	// DebugAddress serves Go's pprof on /debug/pprof/: a unix socket
	// ("unix:///path") or a loopback "127.0.0.1:PORT" only. Default ""
	// (off).
	DebugAddress string `toml:"debug_address"`
	// DiffService serves containerd's diff API on Address too, for
	// [proxy_plugins.overclone-diff] type = "diff": a Compare of an
	// overclone snapshot writes its layer from the overlay upper instead
	// of walking the image twice. It costs nothing until containerd
	// calls it. Default true.
	DiffService bool `toml:"diff_service"`
	// ContainerdAddress is the socket of the containerd the diff service
	// writes layers to (its content store, in the caller's namespace).
	// Default "/run/containerd/containerd.sock".
	ContainerdAddress string `toml:"containerd_address"`
}

// Default returns the configuration used when no file is given.
func Default() Config {
	return Config{
		Root:                DefaultRoot,
		Address:             DefaultAddress,
		LogLevel:            DefaultLogLevel,
		Mode:                DefaultMode,
		SyncOnCommit:        true,
		ShutdownTimeout:     DefaultShutdownTimeout,
		DiffService:         true,
		ContainerdAddress:   DefaultContainerdAddress,
		UsageMaxAge:         DefaultUsageMaxAge,
		LimitBackend:        DefaultLimitBackend,
		Remap:               DefaultRemap,
		Dedupe:              DefaultDedupe,
		DedupeMinSize:       DefaultDedupeMinSize,
		DedupeCommitMinSize: DefaultDedupeCommitMinSize,
	}
}

// Load reads the file at path over the defaults. A missing file is an error
// unless missingOK (the default path was not named by the user).
func Load(path string, missingOK bool) (Config, error) {
	cfg := Default()
	data, err := os.ReadFile(path)
	if err != nil {
		if missingOK && errors.Is(err, os.ErrNotExist) {
			return cfg, nil
		}
		return cfg, fmt.Errorf("read config: %w", err)
	}
	if err := Parse(data, &cfg); err != nil {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// Parse decodes TOML data over cfg and checks the result.
func Parse(data []byte, cfg *Config) error {
	dec := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields()
	if err := dec.Decode(cfg); err != nil {
		var strict *toml.StrictMissingError
		if errors.As(err, &strict) {
			var keys []string
			for _, e := range strict.Errors {
				row, _ := e.Position()
				keys = append(keys, fmt.Sprintf("%q (line %d)", strings.Join(e.Key(), "."), row))
			}
			return fmt.Errorf("unknown key %s", strings.Join(keys, ", "))
		}
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, col := de.Position()
			return fmt.Errorf("line %d, column %d: %s", row, col, de.Error())
		}
		return err
	}
	return cfg.Validate()
}

// Validate checks values a TOML decoder cannot.
func (c *Config) Validate() error {
	if c.Root == "" {
		return errors.New("root must not be empty")
	}
	if c.Address == "" {
		return errors.New("address must not be empty")
	}
	switch c.LogLevel {
	case "trace", "debug", "info", "warn", "warning", "error", "fatal", "panic":
	default:
		return fmt.Errorf("log_level %q: want trace, debug, info, warn or error", c.LogLevel)
	}
	if c.MetricsAddress != "" {
		if _, _, err := ListenAddress(c.MetricsAddress); err != nil {
			return fmt.Errorf("metrics_address %w", err)
		}
	}
	if c.DebugAddress != "" {
		if err := localOnly(c.DebugAddress); err != nil {
			return fmt.Errorf("debug_address %w", err)
		}
	}
	switch c.Mode {
	case "auto", "overlay", "userspace":
	default:
		return fmt.Errorf("mode %q: want auto, overlay or userspace", c.Mode)
	}
	if c.MaxStack < 0 || c.MaxStack == 1 {
		return fmt.Errorf("max_stack %d: want 0 (as deep as the kernel allows) or at least 2", c.MaxStack)
	}
	if c.DiffService && c.ContainerdAddress == "" {
		return errors.New("containerd_address must not be empty when diff_service is on")
	}
	if c.DefaultMaxSize != 0 && c.DefaultMaxSize < MinMaxSize {
		return fmt.Errorf("default_max_size %d: want 0 (no limit) or at least %d bytes", c.DefaultMaxSize, MinMaxSize)
	}
	switch c.LimitBackend {
	case "auto", "image":
	default:
		return fmt.Errorf("limit_backend %q: want auto or image", c.LimitBackend)
	}
	if c.UsageMaxAge < 0 {
		return fmt.Errorf("usage_max_age %s must not be negative", c.UsageMaxAge)
	}
	switch c.Remap {
	case "auto", "copy":
	default:
		return fmt.Errorf("remap %q: want auto (idmapped layers where the kernel has them) or copy (always a shifted copy of the image)", c.Remap)
	}
	switch c.Dedupe {
	case "off", "commit", "background":
	default:
		return fmt.Errorf("dedupe %q: want off, commit or background", c.Dedupe)
	}
	if c.DedupeMinSize < 0 {
		return fmt.Errorf("dedupe_min_size %d must not be negative", c.DedupeMinSize)
	}
	if c.DedupeCommitMinSize < 0 {
		return fmt.Errorf("dedupe_commit_min_size %d must not be negative", c.DedupeCommitMinSize)
	}
	if c.ShutdownTimeout < 0 {
		return fmt.Errorf("shutdown_timeout %s must not be negative", c.ShutdownTimeout)
	}
	return nil
}

// Encode writes cfg as TOML, as --print-config shows it.
func (c Config) Encode() ([]byte, error) {
	var buf bytes.Buffer
	enc := toml.NewEncoder(&buf)
	if err := enc.Encode(c); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
