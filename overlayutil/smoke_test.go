package overlayutil

import (
	"context"
	"encoding/json"
	"os"
	"testing"
)

func TestSmoke(t *testing.T) {
	root := os.Getenv("SMOKE_ROOT")
	if root == "" {
		t.Skip()
	}
	f, err := Probe(context.Background(), root)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.MarshalIndent(f, "", "  ")
	t.Logf("%s", b)
}
