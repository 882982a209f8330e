package integration

// Local container images for the engine tests. No registry is reachable
// from the test machines, so images are built here as OCI image layouts in
// a tar (what `nerdctl load`, `ctr images import` and `podman load` take):
// one uncompressed layer holding the static busybox from busybox-static
// with its applets, /echod (testenv's static echo server), /www/index.html
// and the few files a container expects.

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
)

// ociImage describes one image to build.
type ociImage struct {
	Ref        string   // e.g. localhost/portkit-busybox:test
	Entrypoint []string // the image's default process
	Cmd        []string
}

// engineImageRef is the image every engine test loads: busybox, echod and
// the page; its default command sleeps, which makes it the CRI sandbox
// ("pause") image too. Tests give the workload's command explicitly.
const engineImageRef = "localhost/portkit-busybox:test"

// buildEngineImage writes the engine tests' image to path.
func buildEngineImage(t *testing.T, path string) {
	t.Helper()
	buildOCIImage(t, path, ociImage{Ref: engineImageRef, Cmd: []string{"/bin/sleep", "2147483647"}})
}

// enginePage is the body of /www/index.html in every image: what the
// tests expect busybox httpd to serve.
const enginePage = "hello from portkit's engine test\n"

type ociDescriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    map[string]string `json:"platform,omitempty"`
}

// blob is one content-addressed file of the layout.
type blob struct {
	digest string
	data   []byte
}

func newBlob(data []byte) blob {
	sum := sha256.Sum256(data)
	return blob{digest: "sha256:" + hex.EncodeToString(sum[:]), data: data}
}

// buildOCIImage writes img as an OCI-layout tar at path, readable by everyone.
func buildOCIImage(t *testing.T, path string, img ociImage) {
	t.Helper()
	layer := newBlob(busyboxLayer(t))
	config := newBlob(mustJSON(t, map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"created":      time.Unix(0, 0).UTC().Format(time.RFC3339),
		"config": map[string]any{
			"Entrypoint": img.Entrypoint,
			"Cmd":        img.Cmd,
			"Env":        []string{"PATH=/bin"},
			"WorkingDir": "/",
		},
		// Uncompressed layer: its diff ID is its digest.
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{layer.digest}},
	}))
	manifest := newBlob(mustJSON(t, map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        ociDescriptor{MediaType: "application/vnd.oci.image.config.v1+json", Digest: config.digest, Size: int64(len(config.data))},
		"layers":        []ociDescriptor{{MediaType: "application/vnd.oci.image.layer.v1.tar", Digest: layer.digest, Size: int64(len(layer.data))}},
	}))
	// containerd names imported images after io.containerd.image.name;
	// Podman and skopeo read org.opencontainers.image.ref.name.
	index := mustJSON(t, map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.index.v1+json",
		"manifests": []ociDescriptor{{
			MediaType: "application/vnd.oci.image.manifest.v1+json",
			Digest:    manifest.digest, Size: int64(len(manifest.data)),
			Annotations: map[string]string{
				"io.containerd.image.name":          img.Ref,
				"org.opencontainers.image.ref.name": img.Ref,
			},
			Platform: map[string]string{"architecture": "amd64", "os": "linux"},
		}},
	})

	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(f)
	writeDir := func(name string) {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755, ModTime: time.Unix(0, 0)}); err != nil {
			t.Fatal(err)
		}
	}
	writeFile := func(name string, data []byte) {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: time.Unix(0, 0)}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(data); err != nil {
			t.Fatal(err)
		}
	}
	writeFile("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`))
	writeFile("index.json", index)
	writeDir("blobs/")
	writeDir("blobs/sha256/")
	for _, b := range []blob{layer, config, manifest} {
		writeFile("blobs/sha256/"+strings.TrimPrefix(b.digest, "sha256:"), b.data)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// busyboxLayer returns the image's single layer as an uncompressed tar,
// everything owned by 0:0 (root in the container).
func busyboxLayer(t *testing.T) []byte {
	t.Helper()
	const busybox = "/bin/busybox"
	if _, err := os.Stat(busybox); err != nil {
		t.Skip("busybox-static is not installed (make test installs it as root)")
	}
	bb, err := os.ReadFile(busybox)
	if err != nil {
		t.Fatal(err)
	}
	echod, err := os.ReadFile(testenv.Binary(t, "echod"))
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(busybox, "--list").Output()
	if err != nil {
		t.Fatalf("busybox --list: %v", err)
	}
	applets := strings.Fields(string(out))
	sort.Strings(applets)

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	epoch := time.Unix(0, 0)
	add := func(h *tar.Header, data []byte) {
		h.ModTime, h.Uid, h.Gid = epoch, 0, 0
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(data))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if len(data) > 0 {
			if _, err := tw.Write(data); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, d := range []string{"bin", "etc", "proc", "sys", "dev", "run", "var", "www"} {
		add(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755}, nil)
	}
	add(&tar.Header{Typeflag: tar.TypeDir, Name: "tmp/", Mode: 0o1777}, nil)
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "bin/busybox", Mode: 0o755}, bb)
	for _, a := range applets {
		if a == "busybox" {
			continue
		}
		add(&tar.Header{Typeflag: tar.TypeSymlink, Name: filepath.Join("bin", a), Linkname: "busybox", Mode: 0o777}, nil)
	}
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "echod", Mode: 0o755}, echod)
	for _, f := range []struct{ name, body string }{
		{"etc/passwd", "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"},
		{"etc/group", "root:x:0:\nnogroup:x:65534:\n"},
		{"etc/hosts", "127.0.0.1 localhost\n::1 localhost\n"},
		{"www/index.html", enginePage},
	} {
		add(&tar.Header{Typeflag: tar.TypeReg, Name: f.name, Mode: 0o644}, []byte(f.body))
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestOCIImageLayout checks the image builder against the layout's own
// rules: every blob named by its digest, the index pointing at a manifest
// whose config and layer are in the archive, and the layer holding busybox
// httpd, echod and the page. Engines would reject anything else with a
// less helpful message.
func TestOCIImageLayout(t *testing.T) {
	path := filepath.Join(t.TempDir(), "img.tar")
	buildEngineImage(t, path)
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	files := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(tr)
		files[h.Name] = data
	}
	for name, data := range files {
		if hexsum, ok := strings.CutPrefix(name, "blobs/sha256/"); ok && hexsum != "" {
			if got := newBlob(data).digest; got != "sha256:"+hexsum {
				t.Errorf("blob %s has digest %s", name, got)
			}
		}
	}
	blobOf := func(d ociDescriptor) []byte {
		data, ok := files["blobs/sha256/"+strings.TrimPrefix(d.Digest, "sha256:")]
		if !ok || int64(len(data)) != d.Size {
			t.Fatalf("descriptor %s (size %d) has no matching blob", d.Digest, d.Size)
		}
		return data
	}
	var index struct{ Manifests []ociDescriptor }
	if err := json.Unmarshal(files["index.json"], &index); err != nil || len(index.Manifests) != 1 {
		t.Fatalf("index.json: %v: %s", err, files["index.json"])
	}
	if got := index.Manifests[0].Annotations["io.containerd.image.name"]; got != engineImageRef {
		t.Errorf("image name annotation %q", got)
	}
	var manifest struct {
		Config ociDescriptor
		Layers []ociDescriptor
	}
	if err := json.Unmarshal(blobOf(index.Manifests[0]), &manifest); err != nil || len(manifest.Layers) != 1 {
		t.Fatalf("manifest: %v", err)
	}
	var config struct {
		Config struct{ Entrypoint, Cmd []string }
		Rootfs struct {
			DiffIDs []string `json:"diff_ids"`
		}
	}
	if err := json.Unmarshal(blobOf(manifest.Config), &config); err != nil {
		t.Fatal(err)
	}
	if len(config.Rootfs.DiffIDs) != 1 || config.Rootfs.DiffIDs[0] != manifest.Layers[0].Digest {
		t.Errorf("diff_ids %v, layer %s", config.Rootfs.DiffIDs, manifest.Layers[0].Digest)
	}
	if len(config.Config.Entrypoint) != 0 || strings.Join(config.Config.Cmd, " ") != "/bin/sleep 2147483647" {
		t.Errorf("entrypoint %q, cmd %q", config.Config.Entrypoint, config.Config.Cmd)
	}
	layer := map[string]*tar.Header{}
	lr := tar.NewReader(bytes.NewReader(blobOf(manifest.Layers[0])))
	for {
		h, err := lr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		layer[h.Name] = h
	}
	for _, want := range []string{"bin/busybox", "bin/httpd", "bin/nc", "bin/sleep", "echod", "www/index.html"} {
		if layer[want] == nil {
			t.Errorf("layer lacks %s", want)
		}
	}
}
