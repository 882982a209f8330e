package libport

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
)

// FuzzParseSpec checks that ParseSpec never panics, that every error quotes
// the input, and that every spec it returns is valid and reads back from
// its String() as itself. Seeds: the grammar tables and testdata/fuzz.
func FuzzParseSpec(f *testing.F) {
	for _, tc := range parseCases {
		f.Add(tc.in)
	}
	for _, tc := range parseErrorCases {
		f.Add(tc.in)
	}
	f.Fuzz(func(t *testing.T, text string) {
		specs, err := ParseSpec(text)
		if err != nil {
			if !strings.Contains(err.Error(), fmt.Sprintf("port spec %q", text)) {
				t.Fatalf("ParseSpec(%q) error %q does not quote the input", text, err)
			}
			return
		}
		if len(specs) == 0 {
			t.Fatalf("ParseSpec(%q) returned no spec and no error", text)
		}
		// A range of all 65535 ports is valid; checking its ends is enough.
		check := specs
		if len(check) > 16 {
			check = append(append([]Spec(nil), specs[:8]...), specs[len(specs)-8:]...)
		}
		for _, s := range check {
			if err := s.Validate(); err != nil {
				t.Fatalf("ParseSpec(%q) gave an invalid spec %+v: %v", text, s, err)
			}
			again, err := ParseSpec(s.String())
			if err != nil {
				t.Fatalf("ParseSpec(%q) gave %+v whose String %q does not parse: %v", text, s, s.String(), err)
			}
			if !reflect.DeepEqual(again, []Spec{s}) {
				t.Fatalf("ParseSpec(%q) gave %+v; its String %q parses to %+v", text, s, s.String(), again)
			}
		}
	})
}
