# sluice: every command a user or CI runs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

STACK  := scripts/stack.sh
# Loads the addresses `make up` found or started (database URL, emulator endpoint, test credentials).
WITH_STACK := set -a && . .stack/env && set +a &&
SLUICE := target/debug/sluice
DEMO_CONFIG := config/demo.toml
DEMO_KINESIS_CONFIG := config/demo-kinesis.toml
# `make bench`: side results of the benchmarks and the message counts of the two memory runs.
BENCH_OUT := target/bench
BENCH_MEMORY_LARGE := 1000000
BENCH_MEMORY_SMALL := 250000

.PHONY: help up start down stop status build demo demo-kinesis test lint unit bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

up: ## start the local stack: moto (SQS) on 4566, kinesis-mock (Kinesis) on 4567, PostgreSQL
	@$(STACK) up

start: up ## same as up

down: ## stop what `make up` started
	@$(STACK) down

stop: down ## same as down

status: ## show what answers where
	@$(STACK) status

build: ## build the sluice binary (debug)
	cargo build --bins

demo: up build ## load the 100 demo messages end to end and show what landed
	@$(WITH_STACK) $(SLUICE) migrate --config $(DEMO_CONFIG)
	@$(WITH_STACK) $(SLUICE) seed --config $(DEMO_CONFIG) --file data/demo-logins.json
	@$(WITH_STACK) $(SLUICE) run --config $(DEMO_CONFIG) --exit-when-idle 3
	@$(WITH_STACK) $(SLUICE) report --config $(DEMO_CONFIG)

demo-kinesis: up build ## the same demo through Kinesis (stream login-stream, 4 shards): one line of config differs
	@$(WITH_STACK) $(SLUICE) migrate --config $(DEMO_KINESIS_CONFIG)
	@$(WITH_STACK) $(SLUICE) seed --config $(DEMO_KINESIS_CONFIG) --file data/demo-logins.json
	@$(WITH_STACK) $(SLUICE) run --config $(DEMO_KINESIS_CONFIG) --exit-when-idle 3
	@$(WITH_STACK) $(SLUICE) report --config $(DEMO_KINESIS_CONFIG)

# Clippy checks every target of the workspace, the benchmarks and xtask included, in the dev
# profile; the release profile (LTO, one codegen unit) is built only by `make bench`.
lint: ## formatting and clippy, warnings are errors
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

unit: ## unit tests only (no services needed)
	cargo nextest run --workspace --lib --bins

test: up lint ## everything the tests need, then the whole suite (lint has checked that the benchmarks compile)
	$(WITH_STACK) cargo nextest run --workspace --no-fail-fast

bench: up ## measure stages, sink, pipeline and memory, then regenerate docs/capacity.md (3-10 min once the release build exists, by machine)
	@mkdir -p $(BENCH_OUT) && date +%s > $(BENCH_OUT)/started-at && cp /proc/loadavg $(BENCH_OUT)/loadavg-at-start
	cargo build --release --bins
	$(WITH_STACK) cargo bench --bench stages --bench postgres
	$(WITH_STACK) cargo xtask memory-runs $(BENCH_MEMORY_LARGE) $(BENCH_MEMORY_SMALL)
	date +%s > $(BENCH_OUT)/finished-at
	cargo xtask capacity-report --since "$$(cat $(BENCH_OUT)/started-at)" --command "make bench" \
		--memory-large $(BENCH_MEMORY_LARGE) --memory-small $(BENCH_MEMORY_SMALL)

clean: ## remove build output (not the stack)
	cargo clean
