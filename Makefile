# The two entry points the README starts with, plus the benchmarks.
PYTHON ?= python3

.PHONY: demo test bench setup setup-debug clean

demo: setup
	$(PYTHON) -m smsblock demo

test: setup-debug
	$(PYTHON) -m pytest -n 2 --dist loadgroup tests

bench: setup
	$(PYTHON) -m pytest benchmarks --benchmark-only --benchmark-columns=min,mean,max,rounds -p no:xdist

setup:
	scripts/setup.sh

setup-debug:
	scripts/setup.sh --debug

clean:
	rm -rf build smsblock/*.so smsblock/*.c *.egg-info
