package integration

import (
	"testing"

	"github.com/portkit/portkit/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }
