"""`gproxyctl replay`: open-loop load ramps from a recording, a URL list or an access log,
with per-rate tables, a knee, CSV/JSON and plots.

Importing the package is cheap (gproxyctl builds its parser from `cli`); the sender, gevent
and the optional matplotlib/locust are imported only when a replay runs.
"""
