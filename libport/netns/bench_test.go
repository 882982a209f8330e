package netns

import (
	"testing"

	"github.com/portkit/portkit/internal/testenv"
	"golang.org/x/sys/unix"
)

// BenchmarkSocket measures what one TCP socket in the child costs, each way
// a source can make it. Each iteration also closes the socket, as "direct"
// (a plain socket(2) in our own netns) does, so differences are the source's.
//
//	timeout 300 go test -run '^$' -bench BenchmarkSocket -benchtime 20000x ./libport/netns/
func BenchmarkSocket(b *testing.B) {
	testenv.RequireRoot(b)
	u := testenv.Unprivileged(b)
	n := testenv.ChildNetns(b, u)
	tcp := kind{unix.AF_INET, unix.SOCK_STREAM, 0}

	b.Run("direct", func(b *testing.B) {
		for b.Loop() {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
			if err != nil {
				b.Fatal(err)
			}
			unix.Close(fd)
		}
	})

	setns, err := NewSetnsSource(n.Path)
	if err != nil {
		b.Fatal(err)
	}
	defer setns.Close()
	b.Run("setns/pooled", func(b *testing.B) { benchSocket(b, setns) })
	b.Run("setns/request", func(b *testing.B) {
		ss := setns.(*setnsSource)
		for b.Loop() {
			fds, err := ss.makeSockets(tcp, 1)
			if err != nil {
				b.Fatal(err)
			}
			unix.Close(fds[0])
		}
	})

	// As root the helper joins the user's namespaces just as it does for
	// the user; the IPC it costs is the same.
	helper, err := NewHelperSource(n.Path)
	if err != nil {
		b.Fatal(err)
	}
	defer helper.Close()
	hs := helper.(*helperSource)
	b.Run("helper/pooled", func(b *testing.B) { benchSocket(b, helper) })
	b.Run("helper/request", func(b *testing.B) {
		for b.Loop() {
			fds, err := hs.makeSockets(tcp, 1)
			if err != nil {
				b.Fatal(err)
			}
			unix.Close(fds[0])
		}
	})
	b.Run("helper/batch64-in-caller", func(b *testing.B) {
		// The cost of a refill, per socket, when the caller pays it itself.
		left := 0
		var fds []int
		for b.Loop() {
			if left == 0 {
				if fds, err = hs.makeSockets(tcp, poolBatch); err != nil {
					b.Fatal(err)
				}
				left = len(fds)
			}
			left--
			unix.Close(fds[left])
		}
		closeFds(fds[:left])
	})
}

func benchSocket(b *testing.B, src SocketSource) {
	for b.Loop() {
		fd, err := src.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
		if err != nil {
			b.Fatal(err)
		}
		unix.Close(fd)
	}
}
