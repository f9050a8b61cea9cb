package config

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzParse checks that Parse never panics and that whatever it accepts
// has keys and positive limits.
func FuzzParse(f *testing.F) {
	seed, err := os.ReadFile("testdata/seed-keys.json")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	f.Add([]byte(`{"keys": [{"key_id": "k1", "project": "p", "models": {"m": {"rpm": 10, "tpm": 250000, "rpd": 250, "burst_capacity": 5}}},
	  {"key_id": "k2", "project": "p", "model_name": "m", "rpm": 10, "tpm": 250000, "rpd": 250, "burst_capacity": 5}],
	 "lease_ttl": "1m", "day_reset_timezone": "UTC", "default_tokens": 7, "access": {"lease": {"uids": ["alice", 5], "groups": ["keyd"]}}}`))
	f.Add([]byte(`{"keys": [{"key_id": "a", "model_name": "m", "rpm": "15", "tpm": 1e3, "rpn": 1}], "acess": null}`))
	f.Add([]byte("{\"keys\": [\n{\"key_id\": \"a\"},\n]} x"))
	dir := f.TempDir()
	opts := Options{
		EnvFile:     filepath.Join(dir, "missing.env"),
		Getenv:      env{}.get,
		LookupUser:  fakeUser,
		LookupGroup: fakeGroup,
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(filepath.Join(dir, "keys.json"), data, opts)
		if err != nil {
			return
		}
		if len(c.Keys) == 0 {
			t.Fatal("no keys")
		}
		for _, k := range c.Keys {
			for m, l := range k.Models {
				if l.RPM <= 0 || l.TPM <= 0 || l.RPD < 0 || l.BurstCapacity < 0 || l.BurstCapacity > l.RPM {
					t.Fatalf("key %s: model %s: limits %+v", k.ID, m, l)
				}
			}
		}
		for b, l := range c.Buckets {
			if l.RPM <= 0 || l.TPM <= 0 {
				t.Fatalf("bucket %s: limits %+v", b, l)
			}
		}
	})
}
