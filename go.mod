module github.com/overclone/overclone

go 1.26.6

require golang.org/x/sys v0.50.0
