package fakegemini

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// The token-count rule. The fake has no tokenizer; it counts so that a
// test can predict every number:
//
//   - a text part (any part with a "text" field) counts TextTokens(text),
//     i.e. ceil(runes/4), each part on its own;
//   - an inlineData or fileData part counts 258 (what Gemini charges for an
//     image);
//   - any other part (functionCall, functionResponse, ...) counts
//     TextTokens of its compact JSON;
//   - a non-empty "tools" list counts TextTokens of its compact JSON.
//
// The prompt of generateContent and streamGenerateContent is every part of
// "contents", plus "systemInstruction" and "tools". countTokens counts the
// same when given {"generateContentRequest": {...}}; given {"contents": ...}
// it counts the contents only, as the real API does. So countTokens of a
// generateContentRequest equals the promptTokenCount of generating it.
//
// The answer is OutputTokens tokens long: Model.OutputTokens (default 20),
// capped by generationConfig.maxOutputTokens (then finishReason is
// MAX_TOKENS, else STOP). Its text is 4 runes per token.

// ImageTokens is the count of one inlineData or fileData part.
const ImageTokens = 258

// TextTokens is the fake's token count of a text: ceil(runes/4).
func TextTokens(s string) int {
	return (utf8.RuneCountInString(s) + 3) / 4
}

// content is a Content of a request: a role and parts, each kept raw.
type content struct {
	Role  string            `json:"role,omitempty"`
	Parts []json.RawMessage `json:"parts"`
}

type thinkingConfig struct {
	ThinkingBudget      *int `json:"thinkingBudget"`
	ThinkingBudgetSnake *int `json:"thinking_budget"`
}

type generationConfig struct {
	MaxOutputTokens      *int            `json:"maxOutputTokens"`
	MaxOutputTokensSnake *int            `json:"max_output_tokens"`
	ThinkingConfig       *thinkingConfig `json:"thinkingConfig"`
	ThinkingConfigSnake  *thinkingConfig `json:"thinking_config"`
}

// generateRequest is the part of a GenerateContentRequest the fake reads.
// Like the real API it accepts the proto field names in camelCase and
// snake_case; it ignores fields it does not read.
type generateRequest struct {
	Contents               []content         `json:"contents"`
	SystemInstruction      *content          `json:"systemInstruction"`
	SystemInstructionSnake *content          `json:"system_instruction"`
	Tools                  json.RawMessage   `json:"tools"`
	GenerationConfig       *generationConfig `json:"generationConfig"`
	GenerationConfigSnake  *generationConfig `json:"generation_config"`
}

// countRequest is a CountTokensRequest.
type countRequest struct {
	Contents                    []content        `json:"contents"`
	GenerateContentRequest      *generateRequest `json:"generateContentRequest"`
	GenerateContentRequestSnake *generateRequest `json:"generate_content_request"`
}

// badRequest is a 400 INVALID_ARGUMENT with a message.
type badRequest string

func (b badRequest) Error() string { return string(b) }

// decodeBody decodes a JSON request body into v.
func decodeBody(body []byte, v any) error {
	if len(bytes.TrimSpace(body)) == 0 {
		return nil // an empty body is an empty request, as for the real API
	}
	d := json.NewDecoder(bytes.NewReader(body))
	if err := d.Decode(v); err != nil {
		return badRequest("Invalid JSON payload received. " + jsonProblem(err))
	}
	if _, err := d.Token(); err == nil {
		return badRequest("Invalid JSON payload received. Unexpected token.")
	}
	return nil
}

func jsonProblem(err error) string {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return fmt.Sprintf("Invalid value at '%s' (%s).", te.Field, te.Value)
	}
	return "Unexpected token."
}

// decodeStrict decodes exactly one JSON value, refusing unknown fields.
func decodeStrict(b []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return err
	}
	if _, err := d.Token(); err == nil {
		return errors.New("data after the JSON value")
	}
	return nil
}

func (r *generateRequest) system() *content {
	if r.SystemInstruction != nil {
		return r.SystemInstruction
	}
	return r.SystemInstructionSnake
}

func (r *generateRequest) genConfig() *generationConfig {
	if r.GenerationConfig != nil {
		return r.GenerationConfig
	}
	return r.GenerationConfigSnake
}

// maxOutput is generationConfig.maxOutputTokens, 0 when unset.
func (r *generateRequest) maxOutput() int {
	g := r.genConfig()
	switch {
	case g == nil:
		return 0
	case g.MaxOutputTokens != nil:
		return *g.MaxOutputTokens
	case g.MaxOutputTokensSnake != nil:
		return *g.MaxOutputTokensSnake
	}
	return 0
}

// thinkingBudget is thinkingConfig.thinkingBudget; ok is false when unset.
func (r *generateRequest) thinkingBudget() (budget int, ok bool) {
	g := r.genConfig()
	if g == nil {
		return 0, false
	}
	t := g.ThinkingConfig
	if t == nil {
		t = g.ThinkingConfigSnake
	}
	switch {
	case t == nil:
		return 0, false
	case t.ThinkingBudget != nil:
		return *t.ThinkingBudget, true
	case t.ThinkingBudgetSnake != nil:
		return *t.ThinkingBudgetSnake, true
	}
	return 0, false
}

// validate checks what the real API checks first.
func (r *generateRequest) validate() error {
	if len(r.Contents) == 0 {
		return badRequest("* GenerateContentRequest.contents: contents is not specified\n")
	}
	for i, c := range r.Contents {
		if len(c.Parts) == 0 {
			return badRequest(fmt.Sprintf("* GenerateContentRequest.contents[%d].parts: contents.parts must not be empty.\n", i))
		}
	}
	if n := r.maxOutput(); n < 0 {
		return badRequest("* GenerateContentRequest.generation_config.max_output_tokens: max_output_tokens must be positive.\n")
	}
	return nil
}

// tokens is a prompt's count by modality.
type tokens struct {
	text, image int
}

func (t tokens) total() int { return t.text + t.image }

// details is the promptTokensDetails list.
func (t tokens) details() []modalityCount {
	var d []modalityCount
	if t.text > 0 {
		d = append(d, modalityCount{"TEXT", t.text})
	}
	if t.image > 0 {
		d = append(d, modalityCount{"IMAGE", t.image})
	}
	return d
}

func (t *tokens) addContent(c *content) {
	if c == nil {
		return
	}
	for _, p := range c.Parts {
		t.addPart(p)
	}
}

func (t *tokens) addPart(raw json.RawMessage) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		t.text += TextTokens(compact(raw))
		return
	}
	if txt, ok := fields["text"]; ok {
		var s string
		if json.Unmarshal(txt, &s) == nil {
			t.text += TextTokens(s)
			return
		}
	}
	for _, k := range []string{"inlineData", "inline_data", "fileData", "file_data"} {
		if _, ok := fields[k]; ok {
			t.image += ImageTokens
			return
		}
	}
	t.text += TextTokens(compact(raw))
}

// prompt counts the prompt of a generate request.
func (r *generateRequest) prompt() tokens {
	var t tokens
	for i := range r.Contents {
		t.addContent(&r.Contents[i])
	}
	t.addContent(r.system())
	if tl := bytes.TrimSpace(r.Tools); len(tl) > 0 && !bytes.Equal(tl, []byte("null")) && !bytes.Equal(tl, []byte("[]")) {
		t.text += TextTokens(compact(tl))
	}
	return t
}

func compact(raw []byte) string {
	var b bytes.Buffer
	if json.Compact(&b, raw) != nil {
		return string(raw)
	}
	return b.String()
}

// lastUserText is the text of the request's last content, for the answer.
func (r *generateRequest) lastUserText() string {
	for i := len(r.Contents) - 1; i >= 0; i-- {
		var sb strings.Builder
		for _, p := range r.Contents[i].Parts {
			var f struct {
				Text string `json:"text"`
			}
			if json.Unmarshal(p, &f) == nil {
				sb.WriteString(f.Text)
			}
		}
		if sb.Len() > 0 {
			return sb.String()
		}
	}
	return ""
}

// answerText is the fake's answer of n tokens (4n runes) to prompt:
// "Fake answer to: " and the prompt's first words, then filler, cut to
// length. It depends on the prompt only.
func answerText(prompt string, n int) string {
	if n <= 0 {
		return ""
	}
	prompt = strings.Join(strings.Fields(prompt), " ")
	if utf8.RuneCountInString(prompt) > 40 {
		prompt = string([]rune(prompt)[:40])
	}
	seed := "Fake answer to: " + prompt + ". "
	const filler = "The quick brown fox jumps over the lazy dog. "
	want := 4 * n
	var sb strings.Builder
	sb.WriteString(seed)
	for utf8.RuneCountInString(sb.String()) < want {
		sb.WriteString(filler)
	}
	return string([]rune(sb.String())[:want])
}
