# The two entry points the README starts with, plus the benchmarks.
PYTHON ?= python3

.PHONY: demo test bench wheel setup setup-debug setup-full clean

demo: setup
	$(PYTHON) -m smsblock demo

test: setup-debug
	$(PYTHON) -m pytest -n 2 --dist loadgroup tests

bench: setup-full
	$(PYTHON) -m pytest benchmarks --benchmark-only --benchmark-columns=min,mean,max,rounds -p no:xdist

# a wheel (and the sdist it is built from) in dist/: native libraries linked statically
wheel: setup
	scripts/build-wheel.sh dist

setup:
	scripts/setup.sh

setup-debug:
	scripts/setup.sh --debug

setup-full:
	scripts/setup.sh --full

clean:
	rm -rf build dist smsblock/*.so smsblock/*.c *.egg-info
