package gemini

import (
	"regexp"
	"strings"
	"unicode/utf8"
)

// RedactedKey replaces an API key in text that Redact cleans.
const RedactedKey = "AIza…"

var (
	// apiKeyRe matches a Google API key: "AIza" and at least 35 more key
	// characters (real keys have exactly 35; longer runs are hidden whole).
	apiKeyRe = regexp.MustCompile(`AIza[0-9A-Za-z_\-]{35,}`)
	// consumerRe matches a consumer token naming a key, as in
	// "Consumer 'api_key:AIza...' has been suspended.", whatever follows.
	consumerRe = regexp.MustCompile(`(?i)api_key:[^\s'"\x60,;()\[\]{}<>]+`)
)

// Redact returns s with anything that looks like an API key replaced by
// "AIza…": every "AIza" followed by 35 or more of [A-Za-z0-9_-], and the
// token after every "api_key:" (which becomes "api_key:AIza…"). It is safe
// on any string; invalid UTF-8 is replaced by U+FFFD.
func Redact(s string) string {
	if s == "" { // the common case, a success's empty fields: no regexp work
		return s
	}
	s = strings.ToValidUTF8(s, "\uFFFD")
	s = consumerRe.ReplaceAllStringFunc(s, func(m string) string {
		return m[:len("api_key:")] + RedactedKey
	})
	return apiKeyRe.ReplaceAllString(s, RedactedKey)
}

// sanitize returns s redacted and clipped to n bytes. Only the start of a
// long s is redacted; the cut drops any run of key characters it ends in,
// so no part of a key cut there can survive.
func sanitize(s string, n int) string {
	if limit := 4*n + 64; len(s) > limit {
		s = strings.TrimRightFunc(s[:limit], isKeyChar)
	}
	return clip(Redact(s), n)
}

// isKeyChar reports whether r may appear in an API key after "AIza".
func isKeyChar(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-'
}

// clip returns s cut to at most n bytes at a character boundary, ending in
// "…" when it was cut. s must be valid UTF-8.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	const ellipsis = "…"
	cut := n - len(ellipsis)
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return strings.TrimRight(s[:cut], " \t\r\n") + ellipsis
}
