// Package api speaks RootlessKit's REST API v1 over a unix socket, server
// and client, so that unmodified rootlessctl, nerdctl and dockerd can drive a
// portkit forwarder through $ROOTLESSKIT_STATE_DIR/api.sock.
//
// The wire format, as RootlessKit 1.1 and 3.x serve it:
//
//	GET    /v1/info       200 Info
//	GET    /v1/ports      200 [Status, …], or null when no port is published
//	POST   /v1/ports      Spec → 201 Status
//	DELETE /v1/ports/{id} 200, empty body
//	errors                4xx/5xx {"message":"…"}
//
// Success bodies carry no trailing newline, error bodies one (RootlessKit
// writes them with json.Encoder). Where RootlessKit is loose we are strict
// without changing what a well-behaved client sees: every error is JSON (its
// router answers 404 and 405 in plain text), POST bodies are limited in size
// and decoded strictly, and /v1/info always carries both driver objects.
package api

import (
	"net"

	"github.com/portkit/portkit/libport"
)

// APIVersion is the version of RootlessKit's REST API this package speaks.
const APIVersion = "1.1.1"

// ImplementationVersion is what /v1/info reports as "version" when the
// server's info function leaves it empty.
var ImplementationVersion = "0.1.0"

// Info is the body of GET /v1/info (RootlessKit's api.Info): field names,
// order and omissions as RootlessKit's, so that `info --json` prints the
// same bytes as rootlessctl. The server always fills both driver objects
// (nerdctl reads them without nil checks); they are pointers so that a
// client can tell when a real RootlessKit (--net=host, --port-driver=none)
// left one out.
type Info struct {
	APIVersion    string              `json:"apiVersion"` // REST API version, APIVersion
	Version       string              `json:"version"`    // implementation version
	StateDir      string              `json:"stateDir"`
	ChildPID      int                 `json:"childPID"`
	NetworkDriver *NetworkDriverInfo  `json:"networkDriver,omitempty"`
	PortDriver    *libport.DriverInfo `json:"portDriver,omitempty"`
}

// NetworkDriverInfo describes the network driver (RootlessKit's
// NetworkDriverInfo). Driver is empty when the child has no network of ours.
type NetworkDriverInfo struct {
	Driver         string   `json:"driver"` // slirp4netns, pasta, or ""
	DNS            []net.IP `json:"dns,omitempty"`
	ChildIP        net.IP   `json:"childIP,omitempty"`        // the child's address, e.g. 10.0.2.100
	DynamicChildIP bool     `json:"dynamicChildIP,omitempty"` // the child's address may change
}

// errorJSON is the body of every error response.
type errorJSON struct {
	Message string `json:"message"`
}
