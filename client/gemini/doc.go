// Package gemini calls the Gemini API with keys leased from keyd, on
// google.golang.org/genai.
//
// A Generator does for each call what a generator would do by hand with
// the client package: estimate the prompt's tokens, lease a key for the
// model, call Gemini with it, report the outcome (status, error body,
// usage) and, when the failure belongs to the key or its quota bucket,
// try again under another lease.
//
//	kc := client.New("")
//	g := gemini.New(kc, gemini.Options{Wait: 30 * time.Second})
//	defer g.Close()
//	resp, err := g.GenerateContent(ctx, "gemini-2.5-flash", genai.Text("hello"), nil)
//
//	for chunk, err := range g.GenerateContentStream(ctx, "gemini-2.5-flash", contents, cfg) {
//		if err != nil { ... }
//		fmt.Print(chunk.Text())
//	}
//
// # One attempt
//
//  1. Lease a key for the model from keyd, with the token estimate, the
//     options' Workload and ClientName, and wait_ms = Options.Wait (cut
//     to what is left of ctx's deadline, so that keyd answers before ctx
//     ends).
//  2. Call Gemini with a genai.Client for that key: APIKey = the lease's
//     secret, Backend = BackendGeminiAPI, HTTPOptions.BaseURL =
//     Options.BaseURL. Clients are cached per key id (and rebuilt when
//     keyd hands out a different secret for the id) and share one
//     http.Client, so connections are reused across keys. The SDK's
//     automatic continuation is turned off: each continuation would be
//     another request under the same lease, which keyd never counted.
//  3. Report, before anything else happens:
//     - success: status 200 and the usage: usageMetadata.promptTokenCount →
//     prompt_tokens, candidatesTokenCount + thoughtsTokenCount →
//     output_tokens, totalTokenCount → total_tokens. For a stream, the
//     usage of the last chunk that carried one (Gemini's stream usage is
//     cumulative: the last is the total, never a sum).
//     - a Gemini error (genai.APIError): its Code as the status, and the
//     error body rebuilt from it as {"error":{"code","message","status",
//     "details"}}, which keyd classifies as it would the raw body.
//     - a network or context error: status 0 (keyd counts it, without
//     penalty), unless the request certainly never left: then "unused",
//     which refunds the reservation. "Never left" is known by an
//     httptrace hook (no request headers were written) when the
//     http.Client's Transport is nil or an *http.Transport; with any other
//     Transport only a ctx already done before the call counts as never
//     sent.
//     - a report that cannot reach keyd (not running, e.g. restarting; the
//     connection refused or reset) is resent, the same, with backoff for
//     up to Options.ReportRetry (default 30s); keyd answers a repeat as a
//     duplicate. The call waits for its report meanwhile.
//
// # Retries
//
// The failures that belong to the key, its project or its quota bucket,
// which keyd acts on when they are reported so that the next lease goes
// elsewhere, are tried again under a new lease:
//
//   - any 429 (per-minute or per-day quota, quota 0, capacity, billing):
//     keyd cools, exhausts or disables that bucket or project;
//   - 400 with reason API_KEY_INVALID, and any 403: keyd disables the key;
//   - a 5xx, once per call, after a pause of 1 s: a model error is not the
//     key's fault and usually passes, but hammering an overloaded model
//     helps nobody, so a second 5xx ends the call.
//
// Anything else ends the call at once: another 4xx is the request's fault
// (another key would get the same answer), and a network error is not
// retried because the request may have reached Gemini. The Gemini
// classification is keyd's own (internal/gemini.Classify), so the client
// retries exactly what keyd penalizes.
//
// A call makes at most Options.MaxAttempts requests to Gemini (default
// 3), and stops as soon as ctx is done. When keyd refuses a lease with
// no_capacity and a retry_after that ends before ctx's deadline (or ctx
// has none), the Generator sleeps that long (waking when ctx ends) and
// leases again; such waits do not count as attempts. Without a
// retry_after (nothing frees up without a change to keyd's config or a
// key), or with one beyond ctx's deadline, the call fails with a
// *NoCapacityError that wraps keyd's *api.Error, so client.IsNoCapacity
// works on it. Bound a call with a deadline: without one, a call waits as
// long as keyd says it must, which after a per-day 429 can be hours.
//
// A stream is retried only while nothing has been yielded: a stream that
// fails after its first chunk is reported with the error's status and
// ends with that error.
//
// # Token estimate
//
// keyd reserves a lease's estimated input tokens against the bucket's TPM
// until the report replaces the estimate with usageMetadata's real count,
// so the estimate matters only for the time the call is in flight; it
// should err high. The default, EstimateHeuristic, is HeuristicTokens:
// ceil(bytes/4) of each text part of the contents and of the system
// instruction, ceil(bytes/4) of the compact JSON of any other part
// (function calls and responses, code) and of the tools, 258 per inline
// or file data part (one image; media-heavy prompts should use
// EstimateCountTokens or EstimateFunc), then 10% more, rounded up.
//
// EstimateCountTokens asks Gemini's countTokens first. That needs a key,
// and every use of a key goes through a lease: the Generator leases one
// (for 1 token), calls countTokens, and reports the lease "unused" —
// countTokens has its own quota and does not count against the model's
// RPM, TPM or RPD, so keyd refunds the reservation. An invalid or denied
// key is reported as such and another lease is tried; any other failure
// (no capacity included) falls back to the heuristic. The Gemini API's
// countTokens takes no system instruction or tools from this SDK, so the
// system instruction is counted as one more content and the tools by the
// heuristic. The generation then takes its own lease with that count.
//
// # Errors and secrets
//
// A failed call returns an *Error (or a *NoCapacityError) that unwraps to
// the last Gemini error (a genai.APIError value: use errors.As) and, when
// the call stopped because ctx ended, to ctx's error (errors.Is works).
// No error text, error body or log line of this package holds a secret:
// messages and details of Gemini errors are cleaned of the lease's secret
// and of anything that looks like an API key before they are returned or
// reported, and the SDK's own client-creation errors, which quote their
// configuration, are cleaned the same way.
package gemini
