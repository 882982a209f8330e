package netns

import "errors"

// NewHelperSource starts a helper inside the child's user+net namespaces.
func NewHelperSource(path string, opts ...Option) (SocketSource, error) {
	return nil, errors.New("netns: helper source not implemented yet")
}
