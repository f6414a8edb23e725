"""The relay benchmark: stageserver, the upstream read directly, and nginx, side by side.

``python -m bench.run`` runs it (see ``docs/benchmarks.md``); ``bench.load`` is the load
generator of kept-alive streams over a window, ``bench.burst`` the one of a burst of
streams on new connections, ``bench.procs`` reads CPU, memory and sockets from /proc and
runs the servers.
"""
