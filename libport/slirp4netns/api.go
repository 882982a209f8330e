package slirp4netns

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"syscall"
	"time"
)

// This file speaks slirp4netns's API socket. The protocol, as slirp4netns
// 1.2.0 implements it (api.c): one request per connection, read by a single
// read(2) of at most 4095 bytes, so the request goes out in one write followed
// by shutdown(SHUT_WR); the reply is one JSON object and then EOF. Replies are
// {"return": {...}} or {"error": {"desc": "..."}}, except list_hostfwd, which
// answers {"entries": [...]} without the "return" wrapper the man page shows.

// maxRequest is slirp4netns's read buffer; a request that fills it is refused.
const maxRequest = 4095

// maxReply bounds what we read back; a list of a few thousand forwards fits.
const maxReply = 4 << 20

// hostfwd is one forward as slirp4netns's add_hostfwd takes it and
// list_hostfwd reports it. slirp4netns forwards IPv4 only.
type hostfwd struct {
	ID        int    `json:"id,omitempty"`
	Proto     string `json:"proto"` // "tcp" or "udp"
	HostAddr  string `json:"host_addr"`
	HostPort  int    `json:"host_port"`
	GuestAddr string `json:"guest_addr"`
	GuestPort int    `json:"guest_port"`
}

func (f hostfwd) same(g hostfwd) bool {
	return f.Proto == g.Proto && f.HostAddr == g.HostAddr && f.HostPort == g.HostPort &&
		f.GuestAddr == g.GuestAddr && f.GuestPort == g.GuestPort
}

type request struct {
	Execute   string `json:"execute"`
	Arguments any    `json:"arguments,omitempty"`
}

// APIError is an error reply from slirp4netns, with its own words in Desc.
type APIError struct {
	Execute string
	Desc    string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("slirp4netns answered %s with error %q", e.Execute, e.Desc)
}

// envelope is the outer shape of every reply.
type envelope struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Desc  string `json:"desc"`
		Class string `json:"class"`
	} `json:"error"`
}

// decodeReply returns the body of a successful reply (what "return" holds, or
// the whole object when there is no wrapper), or the APIError it carries.
func decodeReply(execute string, b []byte) (json.RawMessage, error) {
	b = bytes.TrimSpace(b)
	if len(b) == 0 {
		return nil, fmt.Errorf("slirp4netns closed the API connection without answering %s", execute)
	}
	var env envelope
	if err := json.Unmarshal(b, &env); err != nil {
		return nil, fmt.Errorf("slirp4netns answered %s with something that is not a JSON object (%q): %w", execute, truncate(b), err)
	}
	if env.Error != nil {
		desc := env.Error.Desc
		if desc == "" {
			desc = env.Error.Class
		}
		if desc == "" {
			desc = "(no description)"
		}
		return nil, &APIError{Execute: execute, Desc: desc}
	}
	if len(env.Return) > 0 && !bytes.Equal(env.Return, []byte("null")) {
		return env.Return, nil
	}
	return json.RawMessage(b), nil
}

// parseAddReply reads add_hostfwd's {"return":{"id":N}}.
func parseAddReply(b []byte) (int, error) {
	body, err := decodeReply("add_hostfwd", b)
	if err != nil {
		return 0, err
	}
	var r struct {
		ID *float64 `json:"id"`
	}
	if err := json.Unmarshal(body, &r); err != nil || r.ID == nil {
		return 0, fmt.Errorf("slirp4netns answered add_hostfwd without an id: %q", truncate(b))
	}
	id, err := wholeNumber(*r.ID)
	if err != nil || id < 1 {
		return 0, fmt.Errorf("slirp4netns answered add_hostfwd with a bad id %v: %q", *r.ID, truncate(b))
	}
	return id, nil
}

// parseListReply reads list_hostfwd's entries, with or without the "return" wrapper.
func parseListReply(b []byte) ([]hostfwd, error) {
	body, err := decodeReply("list_hostfwd", b)
	if err != nil {
		return nil, err
	}
	var r struct {
		Entries *[]struct {
			ID        float64 `json:"id"`
			Proto     string  `json:"proto"`
			HostAddr  string  `json:"host_addr"`
			HostPort  float64 `json:"host_port"`
			GuestAddr string  `json:"guest_addr"`
			GuestPort float64 `json:"guest_port"`
		} `json:"entries"`
	}
	if err := json.Unmarshal(body, &r); err != nil || r.Entries == nil {
		return nil, fmt.Errorf("slirp4netns answered list_hostfwd without entries: %q", truncate(b))
	}
	list := make([]hostfwd, 0, len(*r.Entries))
	for _, e := range *r.Entries {
		id, err1 := wholeNumber(e.ID)
		hp, err2 := wholeNumber(e.HostPort)
		gp, err3 := wholeNumber(e.GuestPort)
		if err := errors.Join(err1, err2, err3); err != nil {
			return nil, fmt.Errorf("slirp4netns answered list_hostfwd with a bad entry: %w: %q", err, truncate(b))
		}
		list = append(list, hostfwd{ID: id, Proto: e.Proto, HostAddr: e.HostAddr, HostPort: hp, GuestAddr: e.GuestAddr, GuestPort: gp})
	}
	return list, nil
}

// parseRemoveReply reads remove_hostfwd's {"return":{}}.
func parseRemoveReply(b []byte) error {
	_, err := decodeReply("remove_hostfwd", b)
	return err
}

func wholeNumber(f float64) (int, error) {
	if math.IsNaN(f) || f != math.Trunc(f) || f < 0 || f > math.MaxInt32 {
		return 0, fmt.Errorf("%v is not a whole number in range", f)
	}
	return int(f), nil
}

func truncate(b []byte) string {
	if len(b) > 200 {
		return string(b[:200]) + "…"
	}
	return string(b)
}

// call sends one request to the API socket and returns the raw reply. It
// gives up at ctx's deadline: slirp4netns "stops the world" while it
// answers, so a wedged slirp4netns must not wedge us.
func call(ctx context.Context, socket string, req request) ([]byte, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if len(body) >= maxRequest {
		return nil, fmt.Errorf("%s request is %d bytes; slirp4netns reads at most %d", req.Execute, len(body), maxRequest-1)
	}
	conn, err := dial(ctx, socket)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	// One write: slirp4netns takes whatever its single read(2) returns as the request.
	if _, err := conn.Write(body); err != nil {
		return nil, fmt.Errorf("send %s to slirp4netns API socket %s: %w", req.Execute, socket, ctxErr(ctx, err))
	}
	if err := conn.CloseWrite(); err != nil {
		return nil, fmt.Errorf("send %s to slirp4netns API socket %s: %w", req.Execute, socket, ctxErr(ctx, err))
	}
	reply, err := io.ReadAll(io.LimitReader(conn, maxReply+1))
	if err != nil {
		return nil, fmt.Errorf("read slirp4netns's answer to %s on %s: %w", req.Execute, socket, ctxErr(ctx, err))
	}
	if len(reply) > maxReply {
		return nil, fmt.Errorf("slirp4netns's answer to %s on %s exceeds %d bytes", req.Execute, socket, maxReply)
	}
	return reply, nil
}

// dial connects to the API socket. slirp4netns listens with a backlog of 0,
// so a connect can bounce with EAGAIN while it serves someone else: retry
// until ctx ends.
func dial(ctx context.Context, socket string) (*net.UnixConn, error) {
	var d net.Dialer
	for delay := time.Millisecond; ; delay = min(2*delay, 50*time.Millisecond) {
		c, err := d.DialContext(ctx, "unix", socket)
		if err == nil {
			return c.(*net.UnixConn), nil
		}
		if !errors.Is(err, syscall.EAGAIN) || ctx.Err() != nil {
			return nil, fmt.Errorf("connect to slirp4netns API socket %s: %w (is slirp4netns running with --api-socket %s?)", socket, ctxErr(ctx, err), socket)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connect to slirp4netns API socket %s: %w", socket, ctx.Err())
		case <-time.After(delay):
		}
	}
}

// ctxErr names the context's end when it caused err (a deadline we set).
func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%w)", ctx.Err(), err)
	}
	// The socket's deadline is the context's: it can fire a moment before
	// the context's own timer marks it done.
	if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
		return fmt.Errorf("%w (%w)", context.DeadlineExceeded, err)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("timed out: slirp4netns did not answer in time: %w", err)
	}
	return err
}
