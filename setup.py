"""gproxyd packaging: `pip install .` installs the gproxyd command, man pages and examples."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"',
                    (HERE / "gproxyd" / "__init__.py").read_text()).group(1)

setup(
    name="gproxyd",
    version=VERSION,
    description="Transparent TCP proxy daemon with shadow traffic and live benchmarking",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["gproxyd", "gproxyd.*"]),
    # The dashboard's page, script and style, served by the admin endpoint at GET /.
    package_data={"gproxyd.dashboard": ["index.html", "app.js", "style.css"]},
    install_requires=[
        "gevent>=23.9",
        "configargparse>=1.7",
        "python-daemon>=3.0",
        "prometheus_client>=0.17",
        # The beanstalkd archive on MySQL/MariaDB: pure Python, so gevent's monkey-patching
        # makes it cooperative (a C driver would block the event loop on every query).
        "PyMySQL>=1.0",
        # Workers and the arbiter name themselves in ps/top (`gproxyd: worker 1 [web]`):
        # rewriting argv's memory portably is what this small, long-kept C extension does.
        "setproctitle>=1.3",
    ],
    extras_require={
        # gproxyctl replay --plot draws with matplotlib; the Locust user class replays a
        # recording from Locust's distributed workers. Both are large, so optional.
        "plot": ["matplotlib>=3.6"],
        "locust": ["locust>=2.20"],
        # protocol = http and redis: whole messages framed by llhttp and hiredis's reader
        # (C, 3-10x less CPU than the Python framers, which stay the fallback: native.py).
        "native": ["httptools>=0.6", "hiredis>=3.0"],
        "test": ["pytest>=7", "hypothesis>=6", "requests>=2.28", "redis>=5",
                 "mysql-connector-python>=8", "greenstalk>=2", "matplotlib>=3.6",
                 "locust>=2.20", "httptools>=0.6", "hiredis>=3.0"],
    },
    entry_points={"console_scripts": ["gproxyd = gproxyd.cli:run",
                                    "gproxyctl = gproxyd.ctl:run"]},
    # Relative paths land under the installation prefix; copying the unit and config
    # into /etc and /lib/systemd is the documented `make install-service` step.
    data_files=[
        ("share/man/man1", ["man/gproxyctl.1"]),
        ("share/man/man8", ["man/gproxyd.8"]),
        ("share/man/man5", ["man/gproxyd.conf.5"]),
        ("share/doc/gproxyd", ["etc/gproxyd.conf", "systemd/gproxyd.service",
                               "etc/logrotate.d/gproxyd", "README.md"]),
        ("share/doc/gproxyd/grafana", ["etc/grafana/gproxyd.json"]),
        ("share/doc/gproxyd/prometheus", ["etc/prometheus/gproxyd-alerts.yml"]),
    ],
    classifiers=[
        "Environment :: No Input/Output (Daemon)",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
    ],
)
