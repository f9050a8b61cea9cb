package config

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/joho/godotenv"
)

// secretSources are the places a key's secret is looked up, in order.
type secretSources struct {
	getenv  func(string) string
	envFile string            // absolute
	dotenv  map[string]string // envFile's variables; nil when it does not exist
	credDir string            // absolute; "" when unset
}

// readDotenv returns the variables of the .env file at path, or nil when
// it does not exist. Its errors never quote the file, which holds secrets.
func readDotenv(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("cannot read .env file %s: %v: make it readable by keyd or remove it", path, pathErr(err))
	}
	vars, err := godotenv.UnmarshalBytes(data)
	if err != nil {
		return nil, fmt.Errorf(".env file %s: line %d does not parse: write NAME=value, quoting a value that spans lines", path, badLine(data))
	}
	return vars, nil
}

// badLine returns the line where data stops parsing: the one after the
// longest run of whole lines that parses.
func badLine(data []byte) int {
	good, end := 0, 0
	for i, line := range bytes.SplitAfter(data, []byte("\n")) {
		end += len(line)
		if _, err := godotenv.UnmarshalBytes(data[:end]); err == nil {
			good = i + 1
		}
	}
	return good + 1
}

// pathErr strips the operation and path from a *fs.PathError.
func pathErr(err error) error {
	if pe, ok := errors.AsType[*fs.PathError](err); ok {
		return pe.Err
	}
	return err
}

// resolve sets k's Secret and SecretSource from the first source with a
// non-blank value, or else SecretError. It fails only on a credential
// that exists but cannot be read.
func (s *secretSources) resolve(k *Key) error {
	var blank []string
	// found takes v from source unless it is blank; where names it in
	// SecretError.
	found := func(v, source, where string) bool {
		if v = strings.TrimSpace(v); v == "" {
			blank = append(blank, where+" is empty")
			return false
		}
		k.Secret, k.SecretSource = v, source
		return true
	}
	if v := s.getenv(k.SecretEnv); v != "" && found(v, "environment", k.SecretEnv+" in the environment") {
		return nil
	}
	if v, ok := s.dotenv[k.SecretEnv]; ok && found(v, ".env file "+s.envFile, k.SecretEnv+" in .env file "+s.envFile) {
		return nil
	}
	cred := ""
	if s.credDir != "" {
		cred = filepath.Join(s.credDir, k.ID)
		data, err := os.ReadFile(cred)
		switch {
		case err == nil && found(string(data), "credential "+cred, "credential "+cred):
			return nil
		case err != nil && !errors.Is(err, fs.ErrNotExist):
			return fmt.Errorf("key %s: cannot read credential %s: %v", k.ID, cred, pathErr(err))
		}
	}
	msg := "key " + k.ID + ": no secret: " + strings.Join(append(blank, ""), ": ")
	msg += fmt.Sprintf("set %s in the environment or .env (%s)", k.SecretEnv, s.envFile)
	if cred != "" {
		msg += ", or write it to credential " + cred
	}
	k.SecretError = msg
	return nil
}

// sharedSecrets warns about keys that hold the same secret but sit in
// different projects: the limiter would count one quota twice.
func sharedSecrets(keys []*Key) []string {
	var out []string
	first := map[string]*Key{}
	for _, k := range keys {
		if k.Secret == "" {
			continue
		}
		if f, ok := first[k.Secret]; !ok {
			first[k.Secret] = k
		} else if f.Project != k.Project {
			out = append(out, fmt.Sprintf(`keys %s and %s have the same secret but different projects: set the same "project" on both`, f.ID, k.ID))
		}
	}
	return out
}
