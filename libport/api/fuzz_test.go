package api_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/api"
)

// FuzzAPIDecode sends arbitrary POST /v1/ports bodies through the server
// (over the none driver, so no socket is ever bound) and DecodeSpec. Neither
// may panic; every refusal is a 4xx with a JSON message; the table stays
// empty; a body DecodeSpec accepts re-encodes to a body that decodes the same.
func FuzzAPIDecode(f *testing.F) {
	for _, seed := range []string{
		`{"proto":"tcp","parentIP":"127.0.0.1","parentPort":8080,"childPort":80}`,
		`{"proto":"udp6","parentIP":"::1","parentPort":53,"childPort":53,"childIP":"::1"}`,
		`{}`, `null`, `[]`, `{"proto":"tcp"} {}`, `{"proto":1}`, `{"x":1}`, ``, `{"parentPort":-1}`,
	} {
		f.Add([]byte(seed))
	}
	table := libport.NewTable(libport.NoneDriver{})
	h := api.NewServer(table, nil)
	f.Fuzz(func(t *testing.T, body []byte) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/v1/ports", bytes.NewReader(body)))
		if rec.Code != http.StatusBadRequest && rec.Code != http.StatusRequestEntityTooLarge {
			t.Fatalf("POST %q: status %d, want 400 or 413 from the none driver", body, rec.Code)
		}
		var e struct{ Message string }
		if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || e.Message == "" {
			t.Fatalf("POST %q: error body %q is not {\"message\":…}", body, rec.Body.Bytes())
		}
		if l := table.List(); len(l) != 0 {
			t.Fatalf("POST %q left %v in the table", body, l)
		}

		spec, err := api.DecodeSpec(bytes.NewReader(body))
		if err != nil {
			return
		}
		again, err := json.Marshal(spec)
		if err != nil {
			t.Fatal(err)
		}
		spec2, err := api.DecodeSpec(bytes.NewReader(again))
		if err != nil || spec2 != spec {
			t.Fatalf("body %q decodes to %+v, re-encoded %s decodes to %+v, %v", body, spec, again, spec2, err)
		}
	})
}
