"""A hook module that changes nothing: `hooks = bench/noop_hook.py` makes a route call into
Python for every chunk in both directions, so the benchmark shows what the hook path costs
by itself."""


def on_data(conn, data):
    return data


def on_response(conn, backend, data):
    return data
