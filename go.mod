module github.com/portkit/portkit

go 1.26.8

require golang.org/x/sys v0.50.0

require (
	github.com/containernetworking/cni v1.3.0 // indirect
	github.com/opencontainers/runtime-spec v1.3.0 // indirect
	github.com/vishvananda/netns v0.0.4 // indirect
)
