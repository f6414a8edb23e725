"""The relay benchmark: stageserver, the upstream read directly, and nginx, side by side.

``python -m bench.run`` runs it (see ``docs/bench.md``); ``bench.load`` is the load
generator, ``bench.procs`` reads CPU and memory from /proc and runs the servers.
"""
