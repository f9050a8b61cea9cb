package gemini

import (
	"context"
	"encoding/json"
	"errors"

	"google.golang.org/genai"
)

// MediaTokens is HeuristicTokens' count of one inline or file data part:
// what Gemini charges for one image of up to 384×384 pixels.
const MediaTokens = 258

// HeuristicTokens estimates the input tokens of a generateContent request
// without asking Gemini: ceil(bytes/4) of each text part of contents and
// of cfg's system instruction; ceil(bytes/4) of the compact JSON of every
// other part (function calls and responses, code and its results) and of
// cfg's tools; MediaTokens per inline or file data part; then 10% more,
// rounded up; at least 1. Four bytes a token is about right for English
// and code, high for most other scripts in UTF-8. Cached content named by
// cfg is not counted.
func HeuristicTokens(contents []*genai.Content, cfg *genai.GenerateContentConfig) int64 {
	raw := contentTokens(contents)
	if cfg != nil {
		if cfg.SystemInstruction != nil {
			raw += contentTokens([]*genai.Content{cfg.SystemInstruction})
		}
		raw += toolTokens(cfg.Tools)
	}
	return max(1, (raw*11+9)/10)
}

func contentTokens(contents []*genai.Content) int64 {
	var n int64
	for _, c := range contents {
		if c == nil {
			continue
		}
		for _, p := range c.Parts {
			if p != nil {
				n += partTokens(p)
			}
		}
	}
	return n
}

func partTokens(p *genai.Part) int64 {
	switch {
	case p.Text != "":
		return quarter(len(p.Text))
	case p.InlineData != nil || p.FileData != nil:
		return MediaTokens
	}
	b, err := json.Marshal(p)
	if err != nil || len(b) <= 2 { // "{}": nothing the API would count
		return 0
	}
	return quarter(len(b))
}

func toolTokens(tools []*genai.Tool) int64 {
	if len(tools) == 0 {
		return 0
	}
	b, err := json.Marshal(tools)
	if err != nil {
		return 0
	}
	return quarter(len(b))
}

// quarter is ceil(n/4).
func quarter(n int) int64 { return int64(n+3) / 4 }

// estimate returns the token estimate of a request, by the options.
func (g *Generator) estimate(ctx context.Context, model string, contents []*genai.Content, cfg *genai.GenerateContentConfig) (int64, error) {
	if g.opts.EstimateFunc != nil {
		n, err := g.opts.EstimateFunc(ctx, model, contents, cfg)
		if err != nil {
			return 0, err
		}
		return max(n, 0), nil // 0: keyd's default_tokens
	}
	h := HeuristicTokens(contents, cfg)
	if g.opts.Estimate != EstimateCountTokens {
		return h, nil
	}
	return g.countTokens(ctx, model, contents, cfg, h)
}

// countTokens counts the prompt's tokens with Gemini's countTokens, under
// a lease reported unused; on failure it returns the heuristic h, unless
// ctx ended.
func (g *Generator) countTokens(ctx context.Context, model string, contents []*genai.Content, cfg *genai.GenerateContentConfig, h int64) (int64, error) {
	counted := contents
	var tools int64
	if cfg != nil {
		if cfg.SystemInstruction != nil {
			si := *cfg.SystemInstruction
			si.Role = genai.RoleUser
			counted = append(append([]*genai.Content(nil), contents...), &si)
		}
		tools = toolTokens(cfg.Tools)
	}
	for range g.opts.MaxAttempts {
		l, err := g.lease(ctx, model, 1)
		if err != nil {
			if ctx.Err() != nil {
				return 0, context.Cause(ctx)
			}
			return h, nil // the generation's own lease meets the same answer and handles it
		}
		c, err := g.genaiClient(ctx, l)
		if err != nil {
			g.reportUnused(ctx, l)
			return h, nil
		}
		resp, err := c.Models.CountTokens(ctx, model, counted, nil)
		if err == nil {
			g.reportUnused(ctx, l)
			return max(1, int64(resp.TotalTokens)+tools), nil
		}
		if ae, ok := errors.AsType[genai.APIError](err); ok && isKeyProblem(ae) {
			rep, _, _ := g.failure(ctx, l, err, nil)
			g.report(ctx, l, rep) // keyd disables the key; try another
			continue
		}
		// countTokens has a quota of its own: its 429 says nothing of the
		// model's bucket. Nothing else it answers is worth a penalty.
		g.reportUnused(ctx, l)
		if ctx.Err() != nil {
			return 0, context.Cause(ctx)
		}
		return h, nil
	}
	return h, nil
}

// isKeyProblem reports whether ae blames the key itself (invalid, denied).
func isKeyProblem(ae genai.APIError) bool {
	return retryKind(ae) == retryOther && ae.Code != 429
}
