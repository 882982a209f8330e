package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
)

// hooksDFile is one oci-hooks 1.0.0 file, as Podman and CRI-O read it.
type hooksDFile struct {
	Version string `json:"version"`
	Hook    struct {
		Path string   `json:"path"`
		Args []string `json:"args"`
	} `json:"hook"`
	When struct {
		Annotations map[string]string `json:"annotations"`
	} `json:"when"`
	Stages []string `json:"stages"`
}

type ociHook struct {
	Path string   `json:"path"`
	Args []string `json:"args"`
}

// TestHooksDFiles checks the installed oci-hooks files: one per stage the
// hook serves, each naming that stage as its argument, all matching
// exactly the io.portkit.* annotations.
func TestHooksDFiles(t *testing.T) {
	files := readHooksD(t, "/usr/local/bin")
	var stages []string
	for name, f := range files {
		if f.Version != "1.0.0" {
			t.Errorf("%s: version %q, want 1.0.0", name, f.Version)
		}
		if len(f.Stages) != 1 || len(f.Hook.Args) != 2 || f.Hook.Args[1] != f.Stages[0] || f.Hook.Args[0] != "portkit-oci-hook" {
			t.Errorf("%s: want one stage and args [portkit-oci-hook STAGE], got stages %v args %v", name, f.Stages, f.Hook.Args)
		}
		if f.Hook.Path != "/usr/local/bin/portkit-oci-hook" {
			t.Errorf("%s: path %q", name, f.Hook.Path)
		}
		if !reflect.DeepEqual(f.When.Annotations, map[string]string{`^io\.portkit\.`: ".*"}) {
			t.Errorf("%s: when.annotations %v", name, f.When.Annotations)
		}
		stages = append(stages, f.Stages...)
	}
	sort.Strings(stages)
	if want := []string{"createContainer", "createRuntime", "poststop"}; !reflect.DeepEqual(stages, want) {
		t.Errorf("stages %v, want %v", stages, want)
	}
}

// TestDocsConfigSnippet checks that the config.json hooks docs/oci-hook.md
// shows are what the hooks.d files give (installed in /usr/local/bin), and
// that its annotation table lists every annotation the hook knows.
func TestDocsConfigSnippet(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("..", "..", "docs", "oci-hook.md"))
	if err != nil {
		t.Fatal(err)
	}
	doc := string(data)
	const marker = "<!-- config.json hooks: checked against hooks.d by hooks/portkit-oci-hook/docs_test.go -->\n```json\n"
	i := strings.Index(doc, marker)
	if i < 0 {
		t.Fatal("docs/oci-hook.md: config.json hooks snippet marker not found")
	}
	block := doc[i+len(marker):]
	block = block[:strings.Index(block, "```")]
	var shown map[string]map[string][]ociHook
	if err := json.Unmarshal([]byte("{"+block+"}"), &shown); err != nil {
		t.Fatalf("docs/oci-hook.md config.json hooks snippet: %v\n%s", err, block)
	}
	want := map[string][]ociHook{}
	for _, f := range readHooksD(t, "/usr/local/bin") {
		for _, st := range f.Stages {
			want[st] = append(want[st], ociHook{Path: f.Hook.Path, Args: f.Hook.Args})
		}
	}
	if !reflect.DeepEqual(shown["hooks"], want) {
		t.Errorf("docs/oci-hook.md shows hooks %+v; hooks.d gives %+v", shown["hooks"], want)
	}
	installed, err := os.ReadFile(filepath.Join("hooks.d", "portkit-createRuntime.json"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(doc, strings.ReplaceAll(string(installed), "@BINDIR@", "/usr/local/bin")) {
		t.Error("docs/oci-hook.md does not show hooks.d/portkit-createRuntime.json as make install installs it")
	}
	for _, k := range knownKeys {
		if !strings.Contains(doc, "| `"+k+"` |") {
			t.Errorf("docs/oci-hook.md: annotation table lacks %s", k)
		}
	}
}

func readHooksD(t *testing.T, bindir string) map[string]hooksDFile {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join("hooks.d", "*.json"))
	if err != nil || len(paths) == 0 {
		t.Fatalf("no hooks.d/*.json (%v)", err)
	}
	out := map[string]hooksDFile{}
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		var f hooksDFile
		dec := json.NewDecoder(strings.NewReader(strings.ReplaceAll(string(data), "@BINDIR@", bindir)))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&f); err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		out[filepath.Base(p)] = f
	}
	return out
}
