module github.com/overclone/overclone

go 1.26.6

require (
	github.com/opencontainers/go-digest v1.0.0
	github.com/opencontainers/image-spec v1.1.1
	golang.org/x/sys v0.50.0
)
