// Package e2e holds keyd's end-to-end tests: testscript scripts and Go
// tests that run the real keyd and keyctl as separate processes over a
// real Unix socket and a real store. It has no non-test code.
package e2e
