"""A hook module whose on_data spends a fixed amount of pure-Python CPU on every client
chunk (about 0.1 ms on a current core): it stands in for a heavy inspecting hook
(parsing, scoring, rewriting), so that the proxy, not wrk or nginx, needs the CPU. The
`workers` section of bench/run.py uses it to show what a second worker process adds
when a core is free for it."""

_LOOPS = 800


def on_data(conn, data):
    digest = len(data)
    for _ in range(_LOOPS):
        digest = (digest * 31 + 7) & 0xFFFFFFFF
    conn.state["digest"] = digest  # kept: the work is part of what the hook does
    return data
