package netns

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Option tunes a socket source.
type Option func(*options)

type options struct {
	logf func(format string, args ...any)
}

// WithLogf sets where a source reports events worth a line in the log, such
// as a helper restarted after it died. The default is to stay silent.
func WithLogf(logf func(format string, args ...any)) Option {
	return func(o *options) { o.logf = logf }
}

func buildOptions(opts []Option) options {
	o := options{logf: func(string, ...any) {}}
	for _, opt := range opts {
		opt(&o)
	}
	if o.logf == nil {
		o.logf = func(string, ...any) {}
	}
	return o
}

// Open returns a socket source for the network namespace at path: in-process
// setns when this process may enter it (root, or already inside the owning
// user namespace), and otherwise a helper inside the child's user+net
// namespaces.
func Open(path string, opts ...Option) (SocketSource, error) {
	s, err := NewSetnsSource(path)
	if err == nil {
		return s, nil
	}
	if !errors.Is(err, unix.EPERM) {
		return nil, err
	}
	h, herr := NewHelperSource(path, opts...)
	if herr != nil {
		return nil, fmt.Errorf("%w (and in-process setns was refused: %v)", herr, unix.EPERM)
	}
	return h, nil
}
