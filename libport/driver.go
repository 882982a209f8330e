package libport

import "context"

// Status is a published port as the port table holds it. Its JSON form is
// RootlessKit's port.Status.
type Status struct {
	ID   int  `json:"id"`
	Spec Spec `json:"spec"`
}

// DriverInfo describes a port driver for GET /v1/info (RootlessKit's PortDriverInfo).
type DriverInfo struct {
	Driver                  string   `json:"driver"`
	Protos                  []string `json:"protos"`
	DisallowLoopbackChildIP bool     `json:"disallowLoopbackChildIP,omitempty"`
}

// Driver forwards published ports. The Table calls it with specs that are
// valid and free of conflicts, one call at a time per ID.
type Driver interface {
	// Info names the driver and the protocols it forwards.
	Info() DriverInfo
	// Add starts forwarding spec under id; on error nothing of it remains.
	Add(ctx context.Context, id int, spec Spec) error
	// Remove stops forwarding id and closes its connections.
	Remove(ctx context.Context, id int) error
	// Close removes every port and releases the driver.
	Close() error
}
