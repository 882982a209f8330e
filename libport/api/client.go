package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"syscall"

	"github.com/portkit/portkit/libport"
)

// Client talks to an API socket: portkit's or a real RootlessKit's.
type Client struct {
	socketPath string
	http       *http.Client
}

// NewClient returns a client for the API socket at socketPath. It does not
// connect until the first call.
func NewClient(socketPath string) *Client {
	return &Client{
		socketPath: socketPath,
		http: &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", socketPath)
			},
		}},
	}
}

// Error is a refusal from the server: its status code and its message.
type Error struct {
	StatusCode int
	Message    string
}

// Error returns the server's message alone, as rootlessctl prints it.
func (e *Error) Error() string { return e.Message }

// Bounds on what the client reads: a list of every port of a host fits in
// the first, an error message in the second.
const (
	maxReplyBytes = 64 << 20
	maxErrorBytes = 64 << 10
)

// Info returns GET /v1/info.
func (c *Client) Info(ctx context.Context) (Info, error) {
	var info Info
	err := c.do(ctx, http.MethodGet, "/v1/info", nil, &info)
	return info, err
}

// ListPorts returns GET /v1/ports, in the server's order (portkit's is by ID).
func (c *Client) ListPorts(ctx context.Context) ([]libport.Status, error) {
	var list []libport.Status
	err := c.do(ctx, http.MethodGet, "/v1/ports", nil, &list)
	return list, err
}

// AddPort publishes spec (POST /v1/ports) and returns it with its ID.
func (c *Client) AddPort(ctx context.Context, spec libport.Spec) (libport.Status, error) {
	body, err := json.Marshal(spec)
	if err != nil {
		return libport.Status{}, err
	}
	var status libport.Status
	err = c.do(ctx, http.MethodPost, "/v1/ports", body, &status)
	return status, err
}

// RemovePort unpublishes the port with id (DELETE /v1/ports/{id}).
func (c *Client) RemovePort(ctx context.Context, id int) error {
	return c.do(ctx, http.MethodDelete, "/v1/ports/"+strconv.Itoa(id), nil, nil)
}

func (c *Client) do(ctx context.Context, method, path string, body []byte, out any) error {
	// The host part is ignored by the server; RootlessKit's clients send this one.
	req, err := http.NewRequestWithContext(ctx, method, "http://rootlesskit"+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return c.connError(method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBytes))
		var e errorJSON
		if json.Unmarshal(b, &e) == nil && e.Message != "" {
			return &Error{StatusCode: resp.StatusCode, Message: e.Message}
		}
		return &Error{StatusCode: resp.StatusCode,
			Message: fmt.Sprintf("%s %s on %s: unexpected HTTP status %s, body %q", method, path, c.socketPath, resp.Status, b)}
	}
	if out == nil {
		return nil
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxReplyBytes+1))
	if err != nil {
		return fmt.Errorf("%s %s on %s: read reply: %w", method, path, c.socketPath, err)
	}
	if len(b) > maxReplyBytes {
		return fmt.Errorf("%s %s on %s: reply over %d bytes", method, path, c.socketPath, maxReplyBytes)
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("%s %s on %s: decode reply %.200q: %w", method, path, c.socketPath, b, err)
	}
	return nil
}

// connError says why the socket could not be reached and what usually fixes it.
func (c *Client) connError(method, path string, err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	hint := ""
	switch {
	case errors.Is(err, syscall.ENOENT):
		hint = ": no API socket there; is the daemon running, and is the path its state directory's api.sock?"
	case errors.Is(err, syscall.ECONNREFUSED):
		hint = ": nothing listens on it (a stale socket of a daemon that died)"
	case errors.Is(err, syscall.EACCES):
		hint = ": permission denied; the socket belongs to another user"
	}
	return fmt.Errorf("API socket %s: %s %s: %w%s", c.socketPath, method, path, err, hint)
}
