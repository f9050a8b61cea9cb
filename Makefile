# keyd's build, test and benchmark entry points. CI runs `make test`.
GO ?= go
# Fuzz budget per target, as a count of executions: about 10 s each here.
# Not a duration: with -fuzztime=10s Go 1.26's coordinator can report its
# own deadline as a failure (golang/go#75804, fixed in Go 1.27), which
# failed CI once with no failing input.
FUZZTIME ?= 100000x

BENCHTIME ?= 3s
BENCHCOUNT ?= 5

.PHONY: build test lint fuzz bench bench-lease demo clean systemd-check

build:
	$(GO) build -o bin/ ./cmd/...

# The whole test suite: formatting, vet, every Go test with the race
# detector (real keyd and keyctl processes, real bbolt files, kill -9),
# the Python client's tests against a real keyd, then each fuzz target
# for $(FUZZTIME) executions.
test: lint
	$(GO) test -race -count=1 ./...
	python3 -m unittest discover -s clients/python
	$(MAKE) fuzz

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

fuzz:
	$(GO) test -run='^$$' -fuzz='^FuzzParse$$' -fuzztime=$(FUZZTIME) -fuzzminimizetime=5x ./internal/config/
	$(GO) test -run='^$$' -fuzz='^FuzzClassifyBytes$$' -fuzztime=$(FUZZTIME) -fuzzminimizetime=5x ./internal/gemini/
	$(GO) test -run='^$$' -fuzz='^FuzzDecodeLeaseRequest$$' -fuzztime=$(FUZZTIME) -fuzzminimizetime=5x ./internal/daemon/
	$(GO) test -run='^$$' -fuzz='^FuzzDecodeReportRequest$$' -fuzztime=$(FUZZTIME) -fuzzminimizetime=5x ./internal/daemon/
	$(GO) test -run='^$$' -fuzz='^FuzzParseLease$$' -fuzztime=$(FUZZTIME) -fuzzminimizetime=5x ./client/
	$(GO) test -run='^$$' -fuzz='^FuzzParseReportResponse$$' -fuzztime=$(FUZZTIME) -fuzzminimizetime=5x ./client/

# The systemd units: systemd-analyze verify (with freshly built binaries at
# their ExecStart paths), systemd-sysusers --dry-run, systemd-analyze
# security --offline=true with an exposure of at most 2.0, and keyd's
# system calls under strace against the unit's sandbox. Installs nothing;
# skips with a message when systemd-analyze is missing. See systemd/check.sh.
systemd-check:
	GO=$(GO) bash systemd/check.sh

# Every benchmark, rewriting the generated results in docs/: lease+report
# round trips over the real socket with the durable store (bench-lease),
# the store's and the limiter's own, the policy simulator, keyd against
# Redis, and scale.
bench: bench-lease bench-sim bench-redis bench-scale
	$(GO) test -run='^$$' -bench=. -benchtime=$(BENCHTIME) ./internal/store/ ./internal/limiter/

# The numbers of docs/benchmarks.md: lease+report pairs at 1, 8 and 64
# clients (closed loop), at fixed rates from 64 clients (open loop), and
# the HTTP floor beside them; then the 64-client tail (with fewer
# collections, without checkpoints, with clients that cost nothing) and
# the cost of waiting requests; $(BENCHCOUNT) runs of each.
bench-lease:
	$(GO) test -run='^$$' -bench='^Benchmark(LeaseReport|LeaseReportAtRate|Health)$$' -benchtime=$(BENCHTIME) -count=$(BENCHCOUNT) ./internal/daemon/
	$(GO) test -run='^$$' -bench='^Benchmark(LeaseReportTail|LeaseReportMinimalClient|Waiters)$$' -benchtime=$(BENCHTIME) -count=$(BENCHCOUNT) ./internal/daemon/

.PHONY: bench-redis bench-scale

# docs/bench/redis.md: keyd's lease+report pairs against a Redis-backed
# limiter doing the same bookkeeping, durable and not, at 1, 8 and 64
# clients, interleaved in one run, and the breakdown of a lone lease.
# Needs Debian's redis-server (installed here when missing and run as
# root); the benchmark starts and stops its own servers on 127.0.0.1.
# About 2 minutes; REDIS_FLAGS passes flags (e.g. REDIS_FLAGS="--rounds 5").
bench-redis:
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } \
		|| { echo "bench-redis needs redis-server: apt-get install redis-server" >&2; exit 1; }
	$(GO) build -o bin/keyd ./cmd/keyd
	KEYD_LOADTEST_CMD='make bench-redis$(if $(REDIS_FLAGS), REDIS_FLAGS="$(REDIS_FLAGS)")' \
		$(GO) run ./cmd/keyd-loadtest redis --keyd bin/keyd --out docs/bench/redis.md $(REDIS_FLAGS)

# docs/bench/scale.md: keyd's lease latency, startup time and RSS with 10,
# 1,000 and 10,000 keys across 1 and 100 projects. About 1.5 minutes;
# SCALE_FLAGS passes flags (e.g. SCALE_FLAGS="--keys 10,100000").
bench-scale:
	$(GO) build -o bin/keyd ./cmd/keyd
	KEYD_LOADTEST_CMD='make bench-scale$(if $(SCALE_FLAGS), SCALE_FLAGS="$(SCALE_FLAGS)")' \
		$(GO) run ./cmd/keyd-loadtest scale --keyd bin/keyd --out docs/bench/scale.md $(SCALE_FLAGS)

# The policy simulator (internal/sim): keyd's real lease code against the
# key-rotation policies in use, hours of traffic in virtual time. Writes
# docs/bench/policies.md and its SVG plots; deterministic.
.PHONY: bench-sim
bench-sim:
	$(GO) run ./cmd/keyd-bench sim -out docs/bench

# keyd on the example keys.json with made-up secrets (no real Gemini key).
# Ctrl-C stops it cleanly.
demo:
	$(GO) build -o bin/ ./cmd/keyd ./cmd/keyctl
	exec bin/keyd --config keys.json --env-file example.env --socket /tmp/keyd-demo/keyd.sock --state-dir /tmp/keyd-demo/state

clean:
	rm -rf bin
