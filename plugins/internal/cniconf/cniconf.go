// Package cniconf holds what portkit's CNI plugins share in reading their
// configuration and reporting errors: a bad field becomes CNI error 7 naming
// it, an unknown key is refused, and any other error keeps its CNI code.
package cniconf

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
)

// ErrPluginNotAvailable is the spec's STATUS code 50: the plugin cannot
// service ADD (libcni has no constant for it).
const ErrPluginNotAvailable = 50

// specFields are the keys the CNI spec lets any runtime put in a plugin's
// configuration.
var specFields = []string{"cniVersion", "name", "type", "capabilities", "ipam", "dns",
	"args", "runtimeConfig", "prevResult", "ipMasq"}

// FieldError is a bad configuration value.
type FieldError struct {
	Plugin string
	Field  string
	Err    error
}

func (e *FieldError) Error() string {
	return fmt.Sprintf("%s config field %q: %v", e.Plugin, e.Field, e.Err)
}

func (e *FieldError) Unwrap() error { return e.Err }

// Bad returns a FieldError with a formatted reason.
func Bad(plugin, field, format string, args ...any) error {
	return &FieldError{Plugin: plugin, Field: field, Err: fmt.Errorf(format, args...)}
}

// CheckFields refuses a key of stdin that is neither one of own, nor the
// spec's, nor a cni.dev/ convention key, naming the first such key.
func CheckFields(plugin string, stdin []byte, own ...string) error {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(stdin, &raw); err != nil {
		return fmt.Errorf("%s config is not a JSON object: %w", plugin, err)
	}
	known := map[string]bool{}
	for _, k := range append(own, specFields...) {
		known[k] = true
	}
	var unknown []string
	for k := range raw {
		if !known[k] && !strings.HasPrefix(k, "cni.dev/") {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) == 0 {
		return nil
	}
	sort.Strings(unknown)
	return Bad(plugin, unknown[0], "unknown field: %s reads %s", plugin, strings.Join(own, ", "))
}

// Error turns err into a CNI error object: a FieldError is code 7 (invalid
// configuration), a *types.Error keeps its code, anything else is 999.
func Error(err error) error {
	var fe *FieldError
	var te *types.Error
	switch {
	case err == nil:
		return nil
	case errors.As(err, &te):
		return te
	case errors.As(err, &fe):
		return types.NewError(types.ErrInvalidNetworkConfig, fe.Error(), "")
	}
	return types.NewError(types.ErrInternal, err.Error(), "")
}
