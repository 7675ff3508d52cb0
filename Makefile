# Every target brings up PostgreSQL and Redis itself (scripts/with-services.sh):
# the servers at DIMMER_POSTGRES_URL / DIMMER_REDIS_URL when they answer,
# throwaway ones otherwise.
SHELL := /bin/bash
WITH_SERVICES := scripts/need-kcat.sh scripts/with-services.sh scripts/need-logical-pg.sh
MODULES = $(shell find . -name go.mod -not -path './.git/*' -exec dirname {} \; | sort)
TEST_TIMEOUT ?= 12m
export TEST_TIMEOUT

.PHONY: test demo bench vet
test:
	$(WITH_SERVICES) scripts/need-chromium.sh scripts/test.sh $(MODULES)

demo:
	$(WITH_SERVICES) go run ./examples/demo

bench:
	$(WITH_SERVICES) scripts/bench.sh $(MODULES)

vet:
	for m in $(MODULES); do (cd $$m && go vet ./...) || exit 1; done
