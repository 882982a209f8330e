package main

// rootlessctl's verbs: add-ports, list-ports, remove-ports, info. They talk
// to any RootlessKit-compatible API socket (portkit's or RootlessKit's) and
// print what rootlessctl 1.1 prints, byte for byte, so scripts written
// against rootlessctl keep working. Beyond rootlessctl: add-ports takes port
// ranges and, when one spec of several fails, removes the ones it added.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/api"
)

func init() {
	commands["add-ports"] = command{summary: "publish ports: add-ports SPEC... (ranges allowed)", run: addPorts}
	commands["list-ports"] = command{summary: "list published ports", run: listPorts}
	commands["remove-ports"] = command{summary: "unpublish ports: remove-ports ID...", run: removePorts}
	commands["info"] = command{summary: "show the API server's network and port drivers", run: info}
}

// callTimeout bounds each API call; adding a port is the slowest (a driver
// may start a listener in another namespace).
const callTimeout = 30 * time.Second

// apiFlags are the flags every API command takes, defaulting to the globals.
type apiFlags struct {
	socket string
	json   bool
}

func newAPIFlags(name string, withJSON bool) (*flag.FlagSet, *apiFlags) {
	fs := flag.NewFlagSet("portkit "+name, flag.ContinueOnError)
	f := &apiFlags{}
	fs.StringVar(&f.socket, "socket", globals.socket,
		"API socket `path` (default $ROOTLESSKIT_STATE_DIR/api.sock, then $PORTKIT_STATE_DIR/api.sock)")
	if withJSON {
		fs.BoolVar(&f.json, "json", globals.json, "print JSON, one object per line (info: one indented object)")
	}
	return fs, f
}

func (f *apiFlags) client() (*api.Client, error) {
	sock, err := apiSocket(f.socket)
	if err != nil {
		return nil, err
	}
	return api.NewClient(sock), nil
}

const addPortsUsage = `Usage: portkit add-ports [flags] SPEC...

Publishes each SPEC and prints its ID, one per line (with --json, its
status object). A SPEC is [parentIP:]parentPort:[childIP:]childPort/proto:
proto is tcp, tcp4, tcp6, udp, udp4 or udp6; IPv6 addresses go in brackets;
equal-length port ranges publish one port each. If one SPEC fails, the ports
this command added before it are removed again and nothing is printed.

Examples:
  portkit add-ports 127.0.0.1:8080:80/tcp
  portkit add-ports [::1]:8443:[::1]:443/tcp6 0.0.0.0:5353:53/udp
  portkit add-ports 8000-8009:9000-9009/tcp

Flags:
`

func addPorts(args []string) error {
	fs, f := newAPIFlags("add-ports", true)
	texts, err := parseFlags(fs, addPortsUsage, args)
	if err != nil {
		return err
	}
	if len(texts) == 0 {
		return errors.New("no port specified: add-ports SPEC..., e.g. add-ports 127.0.0.1:8080:80/tcp")
	}
	// Every spec is checked before any is sent.
	var specs []libport.Spec
	for _, text := range texts {
		s, err := libport.ParseSpec(text)
		if err != nil {
			return err
		}
		specs = append(specs, s...)
	}
	c, err := f.client()
	if err != nil {
		return err
	}
	var added []libport.Status
	for _, spec := range specs {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		st, err := c.AddPort(ctx, spec)
		cancel()
		if err != nil {
			return undoAdds(c, added, spec, len(specs), err)
		}
		added = append(added, st)
	}
	w := bufio.NewWriter(stdout)
	for _, st := range added {
		if f.json {
			b, err := json.Marshal(st)
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "%s\n", b)
		} else {
			fmt.Fprintf(w, "%d\n", st.ID)
		}
	}
	return w.Flush()
}

// undoAdds removes the ports an add-ports added before spec failed with err.
// A lone spec's error is the server's message alone, as rootlessctl prints it.
func undoAdds(c *api.Client, added []libport.Status, spec libport.Spec, total int, err error) error {
	if total == 1 {
		return err
	}
	if !strings.Contains(err.Error(), spec.String()) {
		err = fmt.Errorf("%s: %w", spec, err)
	}
	if len(added) == 0 {
		return err
	}
	var ids, failed []string
	for i := len(added) - 1; i >= 0; i-- {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		rerr := c.RemovePort(ctx, added[i].ID)
		cancel()
		if rerr != nil {
			failed = append(failed, fmt.Sprintf("%d (%v)", added[i].ID, rerr))
		} else {
			ids = append(ids, strconv.Itoa(added[i].ID))
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%w; removing the ports added before it failed for IDs %s: remove them with remove-ports",
			err, strings.Join(failed, ", "))
	}
	return fmt.Errorf("%w (removed the ports added before it again: IDs %s)", err, strings.Join(ids, ", "))
}

const listPortsUsage = `Usage: portkit list-ports [flags]

Lists published ports as a table (ID PROTO PARENTIP PARENTPORT CHILDIP
CHILDPORT), or with --json one status object per line, in the server's
order (portkit's: by ID).

Flags:
`

func listPorts(args []string) error {
	fs, f := newAPIFlags("list-ports", true)
	rest, err := parseFlags(fs, listPortsUsage, args)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("list-ports takes no arguments, got %q", rest)
	}
	c, err := f.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	list, err := c.ListPorts(ctx)
	if err != nil {
		return err
	}
	return writePorts(stdout, list, f.json)
}

// writePorts prints list as rootlessctl list-ports does: a tab-aligned table
// whose every line ends in a cell terminator (hence trailing blanks), or one
// JSON object per line.
func writePorts(out io.Writer, list []libport.Status, asJSON bool) error {
	if asJSON {
		w := bufio.NewWriter(out)
		for _, st := range list {
			b, err := json.Marshal(st)
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "%s\n", b)
		}
		return w.Flush()
	}
	w := tabwriter.NewWriter(out, 4, 8, 4, ' ', 0)
	fmt.Fprint(w, "ID\tPROTO\tPARENTIP\tPARENTPORT\tCHILDIP\tCHILDPORT\t\n")
	for _, st := range list {
		s := st.Spec
		fmt.Fprintf(w, "%d\t%s\t%s\t%d\t%s\t%d\t\n", st.ID, s.Proto, s.ParentIP, s.ParentPort, s.ChildIP, s.ChildPort)
	}
	return w.Flush()
}

const removePortsUsage = `Usage: portkit remove-ports [flags] ID...

Unpublishes the ports with these IDs (list-ports shows them) and prints each
ID once it is gone. Stops at the first ID that fails.

Flags:
`

func removePorts(args []string) error {
	fs, f := newAPIFlags("remove-ports", false)
	texts, err := parseFlags(fs, removePortsUsage, args)
	if err != nil {
		return err
	}
	if len(texts) == 0 {
		return errors.New("no ID specified: remove-ports ID..., with IDs from list-ports")
	}
	var ids []int
	for _, text := range texts {
		id, err := strconv.Atoi(text)
		if err != nil {
			return fmt.Errorf("port ID %q is not a number: list-ports shows the IDs", text)
		}
		ids = append(ids, id)
	}
	c, err := f.client()
	if err != nil {
		return err
	}
	for _, id := range ids {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		err := c.RemovePort(ctx, id)
		cancel()
		if err != nil {
			return err
		}
		// Printed as each goes, so a later failure still shows what is gone.
		if _, err := fmt.Fprintf(stdout, "%d\n", id); err != nil {
			return err
		}
	}
	return nil
}

const infoUsage = `Usage: portkit info [flags]

Shows the API server's versions, state directory, child PID, network driver
(DNS, child IP) and port driver (protocols), as rootlessctl info does.

Flags:
`

func info(args []string) error {
	fs, f := newAPIFlags("info", true)
	rest, err := parseFlags(fs, infoUsage, args)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("info takes no arguments, got %q", rest)
	}
	c, err := f.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	in, err := c.Info(ctx)
	if err != nil {
		return err
	}
	return writeInfo(stdout, in, f.json)
}

// writeInfo prints in as rootlessctl info does: an indented JSON object, or
// a list whose driver sections appear only when the server sent them.
func writeInfo(out io.Writer, in api.Info, asJSON bool) error {
	w := bufio.NewWriter(out)
	if asJSON {
		b, err := json.MarshalIndent(in, "", "    ")
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "%s\n", b)
		return w.Flush()
	}
	fmt.Fprintf(w, "- REST API version: %s\n", in.APIVersion)
	fmt.Fprintf(w, "- Implementation version: %s\n", in.Version)
	fmt.Fprintf(w, "- State Directory: %s\n", in.StateDir)
	fmt.Fprintf(w, "- Child PID: %d\n", in.ChildPID)
	if nd := in.NetworkDriver; nd != nil {
		fmt.Fprintf(w, "- Network Driver: %s\n", nd.Driver)
		fmt.Fprintf(w, "  - DNS: %v\n", nd.DNS)
		if nd.ChildIP != nil {
			fmt.Fprintf(w, "  - IP: %v\n", nd.ChildIP)
		}
	}
	if pd := in.PortDriver; pd != nil {
		fmt.Fprintf(w, "- Port Driver: %s\n", pd.Driver)
		fmt.Fprintf(w, "  - Supported protocols: %v\n", pd.Protos)
	}
	return w.Flush()
}
