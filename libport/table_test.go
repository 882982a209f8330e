package libport_test

import (
	"context"
	"fmt"
	"net"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/api/apitest"
)

// freePort returns a TCP port that was free on 127.0.0.1 a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func spec(t *testing.T, text string) libport.Spec {
	t.Helper()
	s, err := libport.ParseSpec(text)
	if err != nil {
		t.Fatal(err)
	}
	return s[0]
}

func ids(list []libport.Status) []int {
	var out []int
	for _, st := range list {
		out = append(out, st.ID)
	}
	return out
}

// dialable reports whether a TCP connection to addr succeeds and echoes.
func dialable(addr string) bool {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return false
	}
	defer c.Close()
	if _, err := c.Write([]byte("x")); err != nil {
		return false
	}
	b := make([]byte, 1)
	_, err = c.Read(b)
	return err == nil && b[0] == 'x'
}

func TestTableIDsStartAtOneAndAreNeverReused(t *testing.T) {
	ctx := context.Background()
	d := apitest.NewEchoDriver()
	table := apitest.NewTable(t, d)
	port := freePort(t)
	add := func(text string) libport.Status {
		t.Helper()
		st, err := table.Add(ctx, spec(t, text))
		if err != nil {
			t.Fatalf("Add(%s): %v", text, err)
		}
		return st
	}
	a := add(fmt.Sprintf("127.0.0.1:%d:80/tcp", port))
	b := add(fmt.Sprintf("127.0.0.2:%d:80/tcp", port))
	if a.ID != 1 || b.ID != 2 {
		t.Fatalf("first IDs are %d, %d; want 1, 2", a.ID, b.ID)
	}
	if !dialable(fmt.Sprintf("127.0.0.1:%d", port)) {
		t.Fatalf("port %d is not listening after Add", port)
	}
	if err := table.Remove(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if dialable(fmt.Sprintf("127.0.0.1:%d", port)) {
		t.Fatalf("port %d still answers after Remove", port)
	}
	// The freed spec may come back, under a new ID.
	c := add(fmt.Sprintf("127.0.0.1:%d:80/tcp", port))
	if c.ID != 3 {
		t.Fatalf("ID after removing 1 is %d, want 3 (IDs are never reused)", c.ID)
	}
	if got := ids(table.List()); !reflect.DeepEqual(got, []int{2, 3}) {
		t.Fatalf("List IDs = %v, want [2 3]", got)
	}
	if got := table.List()[1].Spec; got != spec(t, fmt.Sprintf("127.0.0.1:%d:80/tcp", port)) {
		t.Fatalf("List()[1].Spec = %v", got)
	}
}

func TestTableListIsOrderedByID(t *testing.T) {
	ctx := context.Background()
	table := apitest.NewTable(t, apitest.NewEchoDriver())
	port := freePort(t)
	for i := 1; i <= 40; i++ {
		if _, err := table.Add(ctx, spec(t, fmt.Sprintf("127.0.1.%d:%d:80/tcp", i, port))); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []int{3, 17, 18, 40} {
		if err := table.Remove(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	got := ids(table.List())
	if len(got) != 36 {
		t.Fatalf("List has %d entries, want 36", len(got))
	}
	for i := 1; i < len(got); i++ {
		if got[i-1] >= got[i] {
			t.Fatalf("List IDs are not ordered: %v", got)
		}
	}
}

func TestTableFailedAddLeavesNoEntry(t *testing.T) {
	ctx := context.Background()
	d := apitest.NewEchoDriver()
	table := apitest.NewTable(t, d)
	// Someone else holds the port: the driver's listen fails for real.
	taken, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	port := taken.Addr().(*net.TCPAddr).Port
	_, err = table.Add(ctx, spec(t, fmt.Sprintf("127.0.0.1:%d:80/tcp4", port)))
	if err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("Add on a taken port: %v, want EADDRINUSE", err)
	}
	if l := table.List(); len(l) != 0 {
		t.Fatalf("a failed Add left %v in the table", l)
	}
	if p := d.Ports(); len(p) != 0 {
		t.Fatalf("a failed Add left ports %v in the driver", p)
	}
	// The failed add's ID stays burnt; the spec is not held as a conflict.
	taken.Close()
	st, err := table.Add(ctx, spec(t, fmt.Sprintf("127.0.0.1:%d:80/tcp4", port)))
	if err != nil {
		t.Fatal(err)
	}
	if st.ID != 2 {
		t.Fatalf("ID after a failed add = %d, want 2", st.ID)
	}
}

func TestTableRefusesBeforeTheDriver(t *testing.T) {
	ctx := context.Background()
	d := apitest.NewEchoDriver()
	table := apitest.NewTable(t, d)
	port := freePort(t)
	if _, err := table.Add(ctx, spec(t, fmt.Sprintf("%d:80/tcp", port))); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		spec libport.Spec
		want string
	}{
		{libport.Spec{Proto: "sctp", ParentPort: port + 1, ChildPort: 80}, `unknown protocol "sctp"`},
		{libport.Spec{Proto: "tcp", ParentPort: 0, ChildPort: 80}, "parent port 0 is out of range"},
		{libport.Spec{Proto: "tcp4", ParentIP: "::1", ParentPort: port + 1, ChildPort: 80}, "is IPv6 but the protocol is IPv4-only"},
		{spec(t, fmt.Sprintf("127.0.0.1:%d:81/tcp4", port)), "conflicts with port 1"},
		{spec(t, fmt.Sprintf("[::1]:%d:81/tcp6", port)), "conflicts with port 1"},
	} {
		_, err := table.Add(ctx, tc.spec)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Add(%+v) = %v, want an error saying %q", tc.spec, err, tc.want)
		}
	}
	if got := d.Ports(); !reflect.DeepEqual(got, []int{1}) {
		t.Fatalf("driver ports after refused adds = %v, want [1]", got)
	}
	// A refused add burns no ID: it never reached the driver.
	st, err := table.Add(ctx, spec(t, fmt.Sprintf("%d:80/udp", port)))
	if err != nil {
		t.Fatal(err)
	}
	if st.ID != 2 {
		t.Fatalf("ID after refused adds = %d, want 2", st.ID)
	}
}

func TestTableRemoveUnknownID(t *testing.T) {
	ctx := context.Background()
	table := apitest.NewTable(t, apitest.NewEchoDriver())
	for _, id := range []int{0, 1, -5, 99} {
		err := table.Remove(ctx, id)
		if want := fmt.Sprintf("unknown id: %d", id); err == nil || err.Error() != want {
			t.Errorf("Remove(%d) = %v, want %q", id, err, want)
		}
	}
	st, err := table.Add(ctx, spec(t, fmt.Sprintf("127.0.0.1:%d:80/tcp", freePort(t))))
	if err != nil {
		t.Fatal(err)
	}
	if err := table.Remove(ctx, st.ID); err != nil {
		t.Fatal(err)
	}
	if err := table.Remove(ctx, st.ID); err == nil || err.Error() != "unknown id: 1" {
		t.Fatalf("second Remove(1) = %v, want unknown id: 1", err)
	}
}

// TestTableConcurrentAdds races adds and removes (run it with -race):
// every ID is handed out once, and of several adds of one spec exactly one wins.
func TestTableConcurrentAdds(t *testing.T) {
	ctx := context.Background()
	d := apitest.NewEchoDriver()
	table := apitest.NewTable(t, d)
	port := freePort(t)
	const n = 32
	var wg sync.WaitGroup
	got := make([]libport.Status, n)
	errs := make([]error, n)
	for i := range n {
		s := spec(t, fmt.Sprintf("127.0.2.%d:%d:80/tcp", i+1, port))
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[i], errs[i] = table.Add(ctx, s)
			table.List()
		}()
	}
	wg.Wait()
	seen := map[int]bool{}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("add %d: %v", i, errs[i])
		}
		if seen[got[i].ID] || got[i].ID < 1 || got[i].ID > n {
			t.Fatalf("ID %d handed out twice or out of 1..%d", got[i].ID, n)
		}
		seen[got[i].ID] = true
	}

	same := spec(t, fmt.Sprintf("127.0.3.1:%d:80/tcp", port))
	wins := make(chan libport.Status, n)
	conflicts := make(chan error, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := table.Add(ctx, same)
			if err != nil {
				conflicts <- err
				return
			}
			wins <- st
		}()
	}
	// Removes run alongside.
	for id := 1; id <= n; id += 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := table.Remove(ctx, id); err != nil {
				t.Errorf("Remove(%d): %v", id, err)
			}
		}()
	}
	wg.Wait()
	close(wins)
	close(conflicts)
	if len(wins) != 1 {
		t.Fatalf("%d concurrent adds of one spec succeeded, want 1", len(wins))
	}
	for err := range conflicts {
		if !strings.Contains(err.Error(), "conflicts with port") {
			t.Fatalf("losing add: %v, want a conflict", err)
		}
	}
	if l := table.List(); len(l) != n/2+1 {
		t.Fatalf("table has %d ports, want %d", len(l), n/2+1)
	}
	if p := d.Ports(); len(p) != n/2+1 {
		t.Fatalf("driver has %d ports, want %d", len(p), n/2+1)
	}
}

func TestTableCloseClosesTheDriver(t *testing.T) {
	ctx := context.Background()
	d := apitest.NewEchoDriver()
	table := libport.NewTable(d)
	port := freePort(t)
	if _, err := table.Add(ctx, spec(t, fmt.Sprintf("127.0.0.1:%d:80/tcp", port))); err != nil {
		t.Fatal(err)
	}
	if err := table.Close(); err != nil {
		t.Fatal(err)
	}
	if len(table.List()) != 0 || len(d.Ports()) != 0 {
		t.Fatalf("after Close: table %v, driver %v", table.List(), d.Ports())
	}
	if dialable(fmt.Sprintf("127.0.0.1:%d", port)) {
		t.Fatalf("port %d still answers after Close", port)
	}
}

func TestNoneDriverRefusesWithRootlessKitsMessage(t *testing.T) {
	table := libport.NewTable(libport.NoneDriver{})
	_, err := table.Add(context.Background(), spec(t, "127.0.0.1:8080:80/tcp"))
	if err == nil || err.Error() != "no PortDriver is available" {
		t.Fatalf("none driver Add = %v, want RootlessKit's %q", err, "no PortDriver is available")
	}
	if len(table.List()) != 0 {
		t.Fatal("none driver: a refused add left an entry")
	}
	if info := table.Driver().Info(); info.Driver != "none" || info.Protos == nil {
		t.Fatalf("none driver Info = %+v, want driver none and a non-nil protos list", info)
	}
}

// refusingRemover forwards like EchoDriver but cannot stop a port, as pasta
// cannot drop one it was started with.
type refusingRemover struct{ *apitest.EchoDriver }

func (refusingRemover) Remove(context.Context, int) error {
	return fmt.Errorf("this port stays forwarded")
}

// TestTableRefusedRemoveKeepsTheEntry: when the driver cannot stop a port the
// entry stays listed (the port still answers) and still blocks conflicts.
func TestTableRefusedRemoveKeepsTheEntry(t *testing.T) {
	ctx := context.Background()
	table := apitest.NewTable(t, refusingRemover{apitest.NewEchoDriver()})
	s := spec(t, fmt.Sprintf("127.0.0.1:%d:80/tcp", freePort(t)))
	st, err := table.Add(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	if err := table.Remove(ctx, st.ID); err == nil || !strings.Contains(err.Error(), "stays forwarded") {
		t.Fatalf("Remove = %v, want the driver's refusal", err)
	}
	if list := table.List(); len(list) != 1 || list[0].ID != st.ID {
		t.Fatalf("after a refused remove the list is %v, want port %d still there", list, st.ID)
	}
	if _, err := table.Add(ctx, s); err == nil || !strings.Contains(err.Error(), "conflicts with port 1") {
		t.Fatalf("re-adding the kept spec = %v, want a conflict", err)
	}
}
