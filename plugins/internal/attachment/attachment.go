// Package attachment keeps the record of one CNI attachment — a (network
// name, container ID, ifname) triple a plugin served — and names the state
// directory of the forwarder serving it.
//
// Records live in STATEBASE/cni (STATEBASE is /run/portkit for root,
// $XDG_RUNTIME_DIR/portkit otherwise): KEYHASH.json is the record and
// KEYHASH/ the forwarder's state directory. The hash keeps the path short
// (a unix socket path holds at most 107 bytes, and a container ID alone is
// 64) and free of anything the runtime sent; the record keeps the names,
// so GC can tell which attachments belong to which network.
package attachment

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/portkit/portkit/libport/state"
)

// Key names one attachment of one plugin.
type Key struct {
	Plugin      string `json:"plugin"` // usernet or portdriver: each has its own forwarder
	Network     string `json:"network"`
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifname"`
}

func (k Key) String() string {
	return fmt.Sprintf("%s attachment %s/%s/%s", k.Plugin, k.Network, k.ContainerID, k.IfName)
}

func (k Key) id() string {
	h := sha256.Sum256([]byte(k.Plugin + "\x00" + k.Network + "\x00" + k.ContainerID + "\x00" + k.IfName))
	return hex.EncodeToString(h[:8])
}

// Record is what a plugin keeps about an attachment between ADD and DEL.
type Record struct {
	Key
	Netns    string `json:"netns"`
	StateDir string `json:"stateDir"` // the forwarder's state directory, when this attachment owns one
	// Ports added to another attachment's forwarder (portdriver publishing
	// through usernet's): the API socket and the IDs it gave, so DEL removes
	// exactly these.
	APISocket string `json:"apiSocket,omitempty"`
	PortIDs   []int  `json:"portIDs,omitempty"`
}

// Store is the directory holding the records.
type Store struct{ dir *state.Dir }

// Open opens (creating it 0700) the record directory under the state base dir.
func Open() (*Store, error) {
	base, err := state.BaseDir()
	if err != nil {
		return nil, err
	}
	return OpenAt(filepath.Join(base, "cni"))
}

// OpenForDel is Open for DEL: when the state directory never existed and
// cannot be made now, no ADD recorded anything, so it returns nil and no
// error (a runtime would otherwise retry the DEL for ever).
func OpenForDel() (*Store, error) {
	s, err := Open()
	if errors.Is(err, state.ErrCannotCreate) {
		return nil, nil
	}
	return s, err
}

// OpenAt opens the record directory at path.
func OpenAt(path string) (*Store, error) {
	d, err := state.Create(path)
	if err != nil {
		return nil, err
	}
	return &Store{dir: d}, nil
}

// Close releases the directory.
func (s *Store) Close() error { return s.dir.Close() }

// StateDir is the forwarder state directory for k (not created here).
func (s *Store) StateDir(k Key) string { return s.dir.Join(k.id()) }

// Load returns k's record; a missing one matches os.ErrNotExist.
func (s *Store) Load(k Key) (*Record, error) {
	var r Record
	if err := s.dir.ReadJSON(k.id()+".json", &r); err != nil {
		return nil, err
	}
	if r.Key != k {
		return nil, fmt.Errorf("record %s holds %s, not %s: remove it", s.dir.Join(k.id()+".json"), r.Key, k)
	}
	return &r, nil
}

// Save writes r atomically.
func (s *Store) Save(r *Record) error { return s.dir.WriteJSON(r.id()+".json", r) }

// Delete removes k's record; a missing record is not an error.
func (s *Store) Delete(k Key) error { return s.dir.Remove(k.id() + ".json") }

// List returns the records of plugin for network, ordered by container ID
// and ifname. Unreadable records are reported in the error after the rest
// are returned, so GC keeps going.
func (s *Store) List(plugin, network string) ([]Record, error) {
	entries, err := os.ReadDir(s.dir.Path())
	if err != nil {
		return nil, err
	}
	var out []Record
	var errs []error
	for _, e := range entries {
		name := e.Name()
		if !strings.HasSuffix(name, ".json") || strings.HasPrefix(name, ".") {
			continue
		}
		var r Record
		if err := s.dir.ReadJSON(name, &r); err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
			continue
		}
		if r.Plugin == plugin && r.Network == network {
			out = append(out, r)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].ContainerID != out[j].ContainerID {
			return out[i].ContainerID < out[j].ContainerID
		}
		return out[i].IfName < out[j].IfName
	})
	return out, errors.Join(errs...)
}
