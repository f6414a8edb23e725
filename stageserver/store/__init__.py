"""The shared stage store in Redis (``STAGESERVER_STORE_URL``): stages of other
workers and hosts, found, followed, cancelled and taken over.

``mirror.py`` writes a stage of this process to Redis (a listener); ``reader.py`` reads
stages of other processes; ``leases.py`` renews what a worker holds while it lives;
``entries.py`` is the format of a stage's log, ``scripts.py`` the Lua scripts on a
stage's keys; ``batch.py`` sends a batch of commands in one round trip per node;
``connection.py`` connects (Redis, Sentinel or Redis Cluster) and names the keys.
"""
