"""The shared stage store in Redis (``STAGESERVER_STORE_URL``): stages of other
workers and hosts, found, followed and cancelled.

``mirror.py`` writes a stage of this process to Redis (a listener); ``reader.py`` reads
stages of other processes; ``leases.py`` renews what a worker holds while it lives;
``connection.py`` connects (Redis or Sentinel) and names the keys.
"""
