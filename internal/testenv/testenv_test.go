package testenv

import (
	"io"
	"net"
	"testing"
)

func TestMain(m *testing.M) { Main(m) }

// TestChildNetnsIsolatedAndReachableFromPeer proves the harness itself: a
// listener made in the child netns is not visible from ours, and a peer's
// connection to our end of the veth arrives from the peer's own address.
func TestChildNetnsIsolatedAndReachableFromPeer(t *testing.T) {
	u := Unprivileged(t)
	n := ChildNetns(t, u)
	l := Listen(t, n.Path, "tcp4", "127.0.0.1:0")
	if c, err := net.Dial("tcp4", l.Addr().String()); err == nil {
		c.Close()
		t.Fatalf("listener in the child netns answered from the host netns")
	}

	p := NewPeer(t)
	hl, err := net.Listen("tcp4", p.LocalIP4.String()+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer hl.Close()
	go func() {
		c, err := p.Dial("tcp4", hl.Addr().String())
		if err != nil {
			t.Errorf("dial from peer: %v", err)
			hl.Close()
			return
		}
		io.WriteString(c, "hi")
		c.Close()
	}()
	c, err := hl.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := c.RemoteAddr().(*net.TCPAddr).IP
	if !got.Equal(p.PeerIP4) {
		t.Fatalf("peer connection came from %v, want %v", got, p.PeerIP4)
	}
}
