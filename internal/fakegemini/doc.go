// Package fakegemini is a fake of the Gemini API (generativelanguage
// .googleapis.com, v1beta) for keyd's tests, faithful to
// shared/gemini-api.md. Nothing in it reaches the network.
//
// # What it serves
//
//   - POST /v1beta/models/{model}:generateContent
//   - POST /v1beta/models/{model}:streamGenerateContent?alt=sse: Content-Type
//     text/event-stream, each event "data: <json>\r\n\r\n" (CRLF framing, no
//     [DONE]); several chunks, every one with usageMetadata (promptTokenCount,
//     cumulative candidatesTokenCount, totalTokenCount), finishReason only in
//     the last, the same responseId and modelVersion in all. Without alt=sse
//     the chunks are streamed as one JSON array, as the real API does.
//   - POST /v1beta/models/{model}:countTokens, both body forms.
//   - GET /v1beta/models[?pageSize=&pageToken=] and GET /v1beta/models/{model}.
//   - The same under /v1/. The fake's own endpoints under /_fake/ (see
//     Server.AdminHandler).
//
// Auth is the header x-goog-api-key or the query parameter ?key= (the
// header wins when both are sent). Keys map many-to-one to projects
// (Config.Keys). Answers to bad keys are the real literal bodies: no key →
// 403 "Method doesn't allow unregistered callers ..."; an unknown key or
// KeyInvalid → 400 INVALID_ARGUMENT with ErrorInfo API_KEY_INVALID and
// LocalizedMessage; KeyNotFound → the "API Key not found" variant;
// KeyLeaked → 403 "Your API key was reported as leaked. ..."; KeySuspended
// → 403 with ErrorInfo CONSUMER_SUSPENDED. An unknown model → 404
// NOT_FOUND "models/X is not found for API version v1beta, or is not
// supported for generateContent. ...".
//
// # Limits
//
// Limits are per (project, model), as the real API's: every key of a
// project shares one bucket per model. A generation request (generate or
// stream) that passes auth, names a known model and has a valid body is
// admitted — counted at once against the bucket's RPM, input TPM and RPD —
// unless that would put more than RPM requests or more than TPM prompt
// tokens in the sliding window (t-60s, t], or more than RPD requests in the
// Pacific calendar day (America/Los_Angeles, DST-aware: RPD resets at local
// midnight). A refused request gets the real 429 RESOURCE_EXHAUSTED: a
// QuotaFailure with one violation per exceeded limit (order: day, minute
// requests, input tokens), each with quotaMetric, quotaId
// (GenerateRequestsPerMinutePerProjectPerModel,
// GenerateContentInputTokensPerModelPerMinute,
// GenerateRequestsPerDayPerProjectPerModel, with "-FreeTier" on the free
// tier), quotaDimensions {location: global, model} and quotaValue (the
// limit; "0" for an unavailable model); a Help link; a RetryInfo. The
// message is the classic one or, with QuotaNewer, lists every violation
// and ends in "Please retry in N.NNNs.". countTokens and models.* are not
// limited and count against nothing.
//
// RetryInfo: for RPM, the time until enough requests leave the window; for
// TPM, until enough tokens leave (60 s for a prompt larger than TPM, which
// can never succeed); for RPD and unavailable models, like the real API,
// NOT the time to the reset but 20–60 s. RetryInfo carries whole seconds
// (the real "38s"), the newer message the exact delay.
//
// # Determinism
//
// Token counts follow a documented rule (see TextTokens and the comment in
// tokens.go): ceil(runes/4) per text part, system instruction and tools
// included; countTokens of a generateContentRequest equals the
// promptTokenCount of generating it. The answer is Model.OutputTokens
// tokens (4 runes each), capped by maxOutputTokens (then finishReason
// MAX_TOKENS); thoughtsTokenCount is Model.ThoughtsTokens capped by
// thinkingBudget; totalTokenCount = prompt + candidates + thoughts. The
// answer's text depends only on the prompt; responseId on the request's
// sequence number. The clock is injectable (Config.Clock, Server.Advance).
//
// # Faults and the record
//
// Server.InjectNext, Server.AddRule, Config.Faults and Server.Fail inject
// 500 INTERNAL, 503 UNAVAILABLE (both literal messages), 429 without
// details (capacity, or prepayment credits), custom answers and latency.
// Every API request is recorded (Server.Requests); CountsByKey,
// Violations and Stats answer "how many requests did each key make" and
// "did anything exceed a limit" — Violations recomputes the windows from
// the record alone.
//
// # Where it deliberately differs from the real API
//
//   - Token counts come from the rule above, not a tokenizer; answers are
//     filler text; one candidate whatever candidateCount asks.
//   - Windows are exact sliding 60 s windows; the real window type is not
//     documented. The fake has no penalties, no spend limits, no IPM/TPD, no
//     capacity 429s unless injected, and no quota for countTokens.
//   - A refused (429) or failed (4xx/5xx) request is not counted against
//     the limits, unless a fault sets ConsumeQuota.
//   - The paid tier's per-day and input-token quota metrics are not
//     documented; QuotaMetric says which names are guesses. The newer 429
//     format carries quotaValue in its violations like the classic one.
//   - Request bodies are read leniently: unknown fields are ignored, not
//     refused; only the checks named in tokens.go are made.
//   - The 404 message for models.get and the 400 messages other than
//     "contents is not specified" are plausible, not captured, texts.
//   - No Files, caching, embeddings, batch, tuned models or Live API; no
//     OAuth; no mid-stream errors.
package fakegemini
