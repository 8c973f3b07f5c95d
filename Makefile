# gproxyd: the two commands a newcomer needs are `make demo` and `make test`.
# Both make their own virtual environment in .venv (a fresh Debian refuses a global
# pip install under PEP 668).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PREFIX ?= /usr/local

.PHONY: demo test install test-deps docs bench install-service clean

$(PY):
	$(PYTHON) -m venv $(VENV) || { .ci/install-system-deps venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY)
	$(PY) -m pip install --quiet .

demo: install
	$(VENV)/bin/gproxyd demo

test-deps: $(PY)
	.ci/install-system-deps test
	$(PY) -m pip install --quiet ".[test]"

test: test-deps
	$(PY) -m pytest -q -p no:cacheprovider tests

docs: $(PY)
	$(PY) tools/docs.py

bench: install
	bench/setup.sh
	$(PY) bench/run.py

# Install as a system service (see README, "Running as a service").
install-service:
	$(PYTHON) -m pip install --prefix $(PREFIX) .
	install -d /etc/gproxyd
	test -e /etc/gproxyd/gproxyd.conf || install -m 644 etc/gproxyd.conf /etc/gproxyd/gproxyd.conf
	sed 's|/usr/bin/gproxyd|$(PREFIX)/bin/gproxyd|g' systemd/gproxyd.service \
		> /etc/systemd/system/gproxyd.service
	install -m 644 etc/logrotate.d/gproxyd /etc/logrotate.d/gproxyd
	id gproxyd >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin gproxyd
	systemctl daemon-reload

clean:
	rm -rf $(VENV) build *.egg-info
