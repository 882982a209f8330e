package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestMapUID(t *testing.T) {
	tests := []struct {
		uidMap    string
		uid, want int
		wantErr   bool
	}{
		{"         0       1001          1\n", 0, 1001, false},    // rootless container root
		{"         0          0 4294967295\n", 1001, 1001, false}, // the initial user namespace
		{"0 1001 1\n1 100000 65536\n", 1000, 100999, false},       // subordinate range
		{"0 1001 1\n", 5, 0, true},                                // unmapped
		{"garbage\n0 2000 1\n", 0, 2000, false},                   // unparsable lines skipped
	}
	for _, tc := range tests {
		got, err := mapUID(tc.uidMap, tc.uid)
		if (err != nil) != tc.wantErr || (err == nil && got != tc.want) {
			t.Errorf("mapUID(%q, %d) = %d, %v; want %d (error %v)", tc.uidMap, tc.uid, got, err, tc.want, tc.wantErr)
		}
	}
}

func TestFindCreateContainerHook(t *testing.T) {
	tests := []struct {
		name, config string
		wantErr      string
	}{
		{"installed name", `{"hooks":{"createContainer":[{"path":"/usr/local/bin/portkit-oci-hook","args":["portkit-oci-hook","createContainer"]}]}}`, ""},
		{"wrong stage argument", `{"hooks":{"createContainer":[{"path":"/usr/local/bin/portkit-oci-hook","args":["portkit-oci-hook","createRuntime"]}]}}`, "no createContainer hook"},
		{"another hook only", `{"hooks":{"createContainer":[{"path":"/usr/bin/other","args":["other","createContainer"]}]}}`, "no createContainer hook"},
		{"no hooks", `{}`, `"args": ["portkit-oci-hook", "createContainer"]`},
		{"bad json", `{`, "bundle config"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(tc.config), 0o644); err != nil {
				t.Fatal(err)
			}
			err := findCreateContainerHook(dir)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err %v, want it to contain %q", err, tc.wantErr)
			}
		})
	}
	if err := findCreateContainerHook(""); err == nil {
		t.Error("no bundle: want an error")
	}
}
