package forwarder

import (
	"errors"

	"github.com/portkit/portkit/libport"
)

// implicitDriver is wired to libport/implicit once that package lands.
func implicitDriver([]libport.Spec) (libport.Driver, error) {
	return nil, errors.New("not available in this build yet")
}
