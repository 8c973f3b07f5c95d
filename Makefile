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

# Install as a system service (see README, "Running as a service"). gproxyd and its
# dependencies go into their own directory, LIBDIR, with pip --target, and PREFIX/bin gets
# two small launchers: this leaves the system Python's packages alone (PEP 668) and
# does not depend on how a distribution patches pip's install scheme (Debian's turns
# --prefix /usr/local into /usr/local/local). DESTDIR stages everything under a root
# (packaging, tests); the service user and systemd are only touched without it.
DESTDIR ?=
LIBDIR ?= $(PREFIX)/lib/gproxyd
SYSTEM_PYTHON = $(shell command -v $(PYTHON))

install-service:
	$(PYTHON) -m pip install --quiet --upgrade --target $(DESTDIR)$(LIBDIR) .
	rm -rf build
	install -d $(DESTDIR)$(PREFIX)/bin
	for command in gproxyd:cli gproxyctl:ctl; do \
		name=$${command%%:*}; module=$${command#*:}; \
		printf '#!%s -s\nimport sys\nsys.path.insert(0, "%s")\nfrom gproxyd.%s import run\nrun()\n' \
			"$(SYSTEM_PYTHON)" "$(LIBDIR)" "$$module" > $(DESTDIR)$(PREFIX)/bin/$$name; \
		chmod 755 $(DESTDIR)$(PREFIX)/bin/$$name; \
	done
	install -D -m 644 man/gproxyctl.1 $(DESTDIR)$(PREFIX)/share/man/man1/gproxyctl.1
	install -D -m 644 man/gproxyd.8 $(DESTDIR)$(PREFIX)/share/man/man8/gproxyd.8
	install -D -m 644 man/gproxyd.conf.5 $(DESTDIR)$(PREFIX)/share/man/man5/gproxyd.conf.5
	install -d $(DESTDIR)/etc/gproxyd $(DESTDIR)/etc/systemd/system $(DESTDIR)/etc/logrotate.d
	test -e $(DESTDIR)/etc/gproxyd/gproxyd.conf || \
		install -m 644 etc/gproxyd.conf $(DESTDIR)/etc/gproxyd/gproxyd.conf
	sed 's|/usr/bin/gproxyd|$(PREFIX)/bin/gproxyd|g' systemd/gproxyd.service \
		> $(DESTDIR)/etc/systemd/system/gproxyd.service
	install -m 644 etc/logrotate.d/gproxyd $(DESTDIR)/etc/logrotate.d/gproxyd
	if [ -z "$(DESTDIR)" ]; then \
		id gproxyd >/dev/null 2>&1 || \
			useradd --system --no-create-home --shell /usr/sbin/nologin gproxyd; \
		systemctl daemon-reload; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info
