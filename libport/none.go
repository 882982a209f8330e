package libport

import (
	"context"
	"errors"
)

// NoneDriver publishes nothing: every Add is refused (RootlessKit's --port-driver=none).
type NoneDriver struct{}

// ErrNoPortDriver is what NoneDriver answers to an Add: RootlessKit's words
// (its API says this when started with --port-driver=none), so clients that
// match on them keep working.
var ErrNoPortDriver = errors.New("no PortDriver is available")

func (NoneDriver) Info() DriverInfo                       { return DriverInfo{Driver: "none", Protos: []string{}} }
func (NoneDriver) Add(context.Context, int, Spec) error   { return ErrNoPortDriver }
func (NoneDriver) Remove(_ context.Context, id int) error { return ErrNoPortDriver }
func (NoneDriver) Close() error                           { return nil }
