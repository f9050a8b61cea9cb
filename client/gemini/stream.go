package gemini

import (
	"context"
	"iter"
	"net/http"

	"google.golang.org/genai"

	"github.com/keyd/keyd/api"
)

// GenerateContentStream generates content for model chunk by chunk, as
// genai.Models.GenerateContentStream does, with a key leased from keyd.
//
// The call is reported once, when it ends: success with the usage of the
// last chunk that carried one when the stream ended normally; the error's
// status and body when it failed (a failure before the first chunk may be
// retried under another lease, as GenerateContent's; one after it ends
// the sequence with that error). When the consumer stops early, the call
// is reported a success with the usage of the last chunk seen. The
// sequence yields at most one error, as its last element.
func (g *Generator) GenerateContentStream(ctx context.Context, model string, contents []*genai.Content, cfg *genai.GenerateContentConfig) iter.Seq2[*genai.GenerateContentResponse, error] {
	return func(yield func(*genai.GenerateContentResponse, error) bool) {
		tokens, err := g.estimate(ctx, model, contents, cfg)
		if err != nil {
			yield(nil, &Error{Op: OpStream, Model: model, Err: err})
			return
		}
		callCfg := callConfig(cfg)
		stopped := false
		err = g.run(ctx, OpStream, model, tokens, func(ctx context.Context, l *api.Lease, c *genai.Client) (bool, int, error) {
			tctx, st := g.trace(ctx)
			var (
				last      *genai.GenerateContentResponseUsageMetadata
				chunks    int
				streamErr error
				reported  bool
			)
			defer func() {
				if !reported { // the consumer panicked: report what was seen
					g.report(ctx, l, seen(chunks, last))
				}
			}()
			for chunk, err := range c.Models.GenerateContentStream(tctx, model, contents, callCfg) {
				if err != nil {
					streamErr = err
					break
				}
				if chunk != nil && chunk.UsageMetadata != nil {
					last = chunk.UsageMetadata
				}
				chunks++
				if !yield(chunk, nil) {
					stopped = true
					break
				}
			}
			reported = true
			switch {
			case stopped:
				g.report(ctx, l, seen(chunks, last))
				return true, http.StatusOK, nil
			case streamErr == nil:
				g.report(ctx, l, api.ReportRequest{Status: http.StatusOK, Usage: usageOf(last)})
				return false, http.StatusOK, nil
			}
			rep, status, cerr := g.failure(ctx, l, streamErr, st)
			if chunks > 0 && rep.Outcome == api.OutcomeUnused {
				rep = api.ReportRequest{Status: 0} // answered, so sent
			}
			g.report(ctx, l, rep)
			return chunks > 0, status, cerr
		})
		if err != nil && !stopped {
			yield(nil, err)
		}
	}
}

// seen is the report of a stream the consumer left early: a success with
// the last usage when a chunk came, else a network error (status 0).
func seen(chunks int, last *genai.GenerateContentResponseUsageMetadata) api.ReportRequest {
	if chunks == 0 {
		return api.ReportRequest{Status: 0}
	}
	return api.ReportRequest{Status: http.StatusOK, Usage: usageOf(last)}
}
