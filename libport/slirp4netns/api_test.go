package slirp4netns

import (
	"errors"
	"strings"
	"testing"
)

// The replies below are what slirp4netns 1.2.0 sent on this machine (see
// TestPublishThroughSlirp4netnsAsUnprivilegedUser for the live exchange).
func TestParseReplies(t *testing.T) {
	id, err := parseAddReply([]byte(`{"return":{"id":7}}`))
	if err != nil || id != 7 {
		t.Fatalf("add reply: %d, %v", id, err)
	}
	_, err = parseAddReply([]byte(`{"error":{"desc":"bad request: add_hostfwd: slirp_add_hostfwd failed"}}`))
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.Desc != "bad request: add_hostfwd: slirp_add_hostfwd failed" {
		t.Fatalf("add error reply: %v", err)
	}
	for _, bad := range []string{``, `{}`, `{"return":{}}`, `{"return":{"id":0}}`, `{"return":{"id":1.5}}`, `{"return":{"id":-3}}`, `[1]`, `{"return":{"id":"1"}}`} {
		if _, err := parseAddReply([]byte(bad)); err == nil {
			t.Errorf("parseAddReply(%q) succeeded", bad)
		}
	}

	// 1.2.0 sends entries at the top level; the man page shows them under "return".
	for _, reply := range []string{
		`{"entries":[{"id":1,"proto":"tcp","host_addr":"127.0.0.1","host_port":18080,"guest_addr":"10.0.2.100","guest_port":80}]}`,
		`{"return": {"entries": [{"id": 1, "proto": "tcp", "host_addr": "127.0.0.1", "host_port": 18080, "guest_addr": "10.0.2.100", "guest_port": 80}]}}`,
	} {
		list, err := parseListReply([]byte(reply))
		if err != nil || len(list) != 1 || list[0].String() != "127.0.0.1:18080:10.0.2.100:80/tcp (slirp4netns id 1)" {
			t.Errorf("parseListReply(%s) = %v, %v", reply, list, err)
		}
	}
	if list, err := parseListReply([]byte(`{"entries":[]}`)); err != nil || len(list) != 0 {
		t.Errorf("empty list: %v, %v", list, err)
	}
	for _, bad := range []string{`{}`, `{"entries":null}`, `{"entries":[{"id":"x"}]}`, `{"entries":[{"id":1,"host_port":1e10}]}`} {
		if _, err := parseListReply([]byte(bad)); err == nil {
			t.Errorf("parseListReply(%q) succeeded", bad)
		}
	}

	if err := parseRemoveReply([]byte(`{"return":{}}`)); err != nil {
		t.Errorf("remove reply: %v", err)
	}
	err = parseRemoveReply([]byte(`{"error":{"desc":"bad request: remove_hostfwd: bad arguments.id"}}`))
	if err == nil || !strings.Contains(err.Error(), `"bad request: remove_hostfwd: bad arguments.id"`) {
		t.Errorf("remove error reply: %v", err)
	}
}

// FuzzParseReplies feeds arbitrary bytes to every reply parser: no panics,
// and what parses is sane.
func FuzzParseReplies(f *testing.F) {
	for _, seed := range []string{
		`{"return":{"id":1}}`,
		`{"return":{}}`,
		`{"entries":[]}`,
		`{"entries":[{"id":1,"proto":"tcp","host_addr":"0.0.0.0","host_port":8080,"guest_addr":"10.0.2.100","guest_port":80}]}`,
		`{"return":{"entries":[{"id":2,"proto":"udp","host_addr":"0.0.0.0","host_port":53,"guest_addr":"10.0.2.100","guest_port":53}]}}`,
		`{"error":{"desc":"bad request: add_hostfwd: bad arguments.proto"}}`,
		`{"error":{"desc":"bad request: cannot parse JSON"}}`,
		`{"error":{}}`,
		`{"return":null}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if id, err := parseAddReply(b); err == nil && id < 1 {
			t.Fatalf("parseAddReply(%q) = id %d without error", b, id)
		}
		if list, err := parseListReply(b); err == nil {
			for _, e := range list {
				if e.ID < 0 || e.HostPort < 0 || e.GuestPort < 0 {
					t.Fatalf("parseListReply(%q) gave negative numbers: %+v", b, e)
				}
			}
		}
		err := parseRemoveReply(b)
		var apiErr *APIError
		if errors.As(err, &apiErr) && apiErr.Desc == "" {
			t.Fatalf("parseRemoveReply(%q): API error without a description", b)
		}
	})
}
