# keyd's build, test and benchmark entry points. CI runs `make test`.
GO ?= go
FUZZTIME ?= 10s

BENCHTIME ?= 3s
BENCHCOUNT ?= 5

.PHONY: build test lint fuzz bench bench-lease demo clean

build:
	$(GO) build -o bin/ ./cmd/...

# The whole test suite: formatting, vet, every Go test with the race
# detector (real keyd and keyctl processes, real bbolt files, kill -9),
# the Python client's tests against a real keyd, then each fuzz target
# for $(FUZZTIME).
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

# Every benchmark: lease+report round trips over the real socket with the
# durable store (bench-lease), then the store's and the limiter's own.
bench: bench-lease
	$(GO) test -run='^$$' -bench=. -benchtime=$(BENCHTIME) ./internal/store/ ./internal/limiter/

# The numbers of docs/benchmarks.md: lease+report pairs at 1, 8 and 64
# clients and the HTTP floor beside them, $(BENCHCOUNT) runs of each.
bench-lease:
	$(GO) test -run='^$$' -bench='^Benchmark(LeaseReport|Health)$$' -benchtime=$(BENCHTIME) -count=$(BENCHCOUNT) ./internal/daemon/

# keyd on the example keys.json with made-up secrets (no real Gemini key).
demo:
	$(GO) run ./cmd/keyd --config keys.json --env-file example.env --socket /tmp/keyd-demo/keyd.sock --state-dir /tmp/keyd-demo/state

clean:
	rm -rf bin
