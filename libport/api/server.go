package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/portkit/portkit/libport"
)

// MaxBodyBytes bounds a request body; a port spec is well under 200 bytes.
const MaxBodyBytes = 1 << 20

// NewServer returns the API handler over table. info is called for every
// GET /v1/info; the fields it leaves empty are filled in: APIVersion,
// Version (ImplementationVersion), NetworkDriver (an object with an empty
// driver name), PortDriver (the table's driver's Info) and Protos ([]).
func NewServer(table *libport.Table, info func() Info) http.Handler {
	return &server{table: table, info: info}
}

type server struct {
	table *libport.Table
	info  func() Info
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path := r.URL.Path
	switch {
	case path == "/v1/info":
		if allow(w, r, http.MethodGet) {
			s.getInfo(w)
		}
	case path == "/v1/ports":
		if allow(w, r, http.MethodGet, http.MethodPost) {
			if r.Method == http.MethodGet {
				s.getPorts(w)
			} else {
				s.postPort(w, r)
			}
		}
	case strings.HasPrefix(path, "/v1/ports/") && !strings.Contains(path[len("/v1/ports/"):], "/"):
		if allow(w, r, http.MethodDelete) {
			s.deletePort(w, r, path[len("/v1/ports/"):])
		}
	default:
		writeError(w, http.StatusNotFound,
			fmt.Errorf("no such API path %q: this socket serves RootlessKit's API v1 (/v1/info, /v1/ports, /v1/ports/{id})", path))
	}
}

// allow answers 405 unless r uses one of methods.
func allow(w http.ResponseWriter, r *http.Request, methods ...string) bool {
	for _, m := range methods {
		if r.Method == m {
			return true
		}
	}
	w.Header().Set("Allow", strings.Join(methods, ", "))
	writeError(w, http.StatusMethodNotAllowed,
		fmt.Errorf("method %s is not allowed on %s: use %s", r.Method, r.URL.Path, strings.Join(methods, " or ")))
	return false
}

func (s *server) getInfo(w http.ResponseWriter) {
	var info Info
	if s.info != nil {
		info = s.info()
	}
	if info.APIVersion == "" {
		info.APIVersion = APIVersion
	}
	if info.Version == "" {
		info.Version = ImplementationVersion
	}
	if info.NetworkDriver == nil {
		info.NetworkDriver = &NetworkDriverInfo{}
	}
	if info.PortDriver == nil {
		pd := s.table.Driver().Info()
		info.PortDriver = &pd
	}
	if info.PortDriver.Protos == nil {
		// A copy, so the caller's DriverInfo is left as it was.
		pd := *info.PortDriver
		pd.Protos = []string{}
		info.PortDriver = &pd
	}
	writeJSON(w, http.StatusOK, info)
}

func (s *server) getPorts(w http.ResponseWriter) {
	var list []libport.Status
	if l := s.table.List(); len(l) > 0 {
		list = l // an empty table is null on the wire, as RootlessKit's nil slice
	}
	writeJSON(w, http.StatusOK, list)
}

func (s *server) postPort(w http.ResponseWriter, r *http.Request) {
	spec, err := DecodeSpec(http.MaxBytesReader(w, r.Body, MaxBodyBytes))
	if err != nil {
		code := http.StatusBadRequest
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			code = http.StatusRequestEntityTooLarge
		}
		writeError(w, code, err)
		return
	}
	status, err := s.table.Add(r.Context(), spec)
	if err != nil {
		// RootlessKit answers every refused add with 400, driver errors included.
		writeError(w, http.StatusBadRequest, err)
		return
	}
	writeJSON(w, http.StatusCreated, status)
}

func (s *server) deletePort(w http.ResponseWriter, r *http.Request, idText string) {
	id, err := strconv.Atoi(idText)
	if err != nil {
		writeError(w, http.StatusBadRequest, fmt.Errorf("bad id %q: a port ID is a number, as list-ports shows", idText))
		return
	}
	if err := s.table.Remove(r.Context(), id); err != nil {
		writeError(w, http.StatusBadRequest, err)
		return
	}
	w.WriteHeader(http.StatusOK)
}

// DecodeSpec reads the body of POST /v1/ports: exactly one JSON object with
// RootlessKit's Spec fields and nothing else. It does not validate the spec;
// the table does.
func DecodeSpec(r io.Reader) (libport.Spec, error) {
	var spec *libport.Spec // a pointer, to tell null from {}
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	err := dec.Decode(&spec)
	if err == nil {
		// Decode stops after one value: anything but white space after it is an error.
		var extra json.RawMessage
		if err = dec.Decode(&extra); err == nil {
			return libport.Spec{}, fmt.Errorf("bad port spec: more than one JSON value in the request body: send one object")
		}
		if err == io.EOF {
			if spec == nil {
				return libport.Spec{}, fmt.Errorf("bad port spec: want a JSON object, got null")
			}
			return *spec, nil
		}
	}
	var tooBig *http.MaxBytesError
	var syntax *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &tooBig):
		return libport.Spec{}, fmt.Errorf("bad port spec: request body over %d bytes: %w", tooBig.Limit, err)
	case errors.Is(err, io.EOF):
		return libport.Spec{}, errors.New(`bad port spec: empty request body: send a JSON object such as {"proto":"tcp","parentIP":"127.0.0.1","parentPort":8080,"childPort":80}`)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return libport.Spec{}, fmt.Errorf("bad port spec: the JSON ends early: %w", err)
	case errors.As(err, &syntax):
		return libport.Spec{}, fmt.Errorf("bad port spec: invalid JSON at byte %d: %w", syntax.Offset, err)
	case errors.As(err, &typ):
		if typ.Field == "" {
			return libport.Spec{}, fmt.Errorf("bad port spec: want a JSON object, got %s", typ.Value)
		}
		return libport.Spec{}, fmt.Errorf("bad port spec: field %q: want %s, got %s", typ.Field, typ.Type, typ.Value)
	}
	// json's own words name the field: `json: unknown field "x"`.
	return libport.Spec{}, fmt.Errorf("bad port spec: %w", err)
}

// writeJSON writes v without a trailing newline, as RootlessKit does.
func writeJSON(w http.ResponseWriter, code int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeError(w, http.StatusInternalServerError, fmt.Errorf("encode response: %w", err))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	w.Write(b)
}

// writeError writes {"message":…} and a newline, as RootlessKit does.
func writeError(w http.ResponseWriter, code int, err error) {
	var b bytes.Buffer
	json.NewEncoder(&b).Encode(errorJSON{Message: err.Error()})
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	w.Write(b.Bytes())
}
