"""Where keys live on a Redis Cluster, and names chosen to put them on a given primary.

A stage's keys share one hash tag, ``{<principal>/<stage id>}``, and so one slot; a
principal's limits share ``{<principal>}``. A test that needs a stage on a given primary,
or a principal whose limits live on one, draws ids (``prefix-0``, ``prefix-1``, ...) or
names until one lands there: the slots are fixed by CRC16, so the same cluster layout
gives the same names.
"""

from __future__ import annotations

from redis.crc import key_slot

from stageserver.store.keys import stage_keys

from .servers import RedisClusterGroup

__all__ = ["limits_slot", "owner", "principal_on", "stage_id_on", "stage_slot"]


def stage_slot(principal: str, stage_id: str) -> int:
    """The slot of a stage's keys: ``ss:{<principal>/<stage id>}...``."""
    return key_slot(stage_keys(f"{principal}/{stage_id}").hash.encode())


def limits_slot(principal: str) -> int:
    """The slot of a principal's limit keys: ``ss:limits:{<principal>}:...``."""
    return key_slot(f"ss:limits:{{{principal}}}:streams".encode())


def owner(ranges: list[tuple[int, int, int]], slot: int) -> int:
    """The port of the primary that serves ``slot``, in ``RedisClusterGroup.slots()``."""
    [port] = [port for first, last, port in ranges if first <= slot <= last]
    return port


def stage_id_on(group: RedisClusterGroup, port: int, principal: str, prefix: str) -> str:
    """A stage id that starts with ``prefix`` whose keys live on the primary on ``port``."""
    ranges = group.slots()
    for n in range(10_000):
        stage_id = f"{prefix}-{n}"
        if owner(ranges, stage_slot(principal, stage_id)) == port:
            return stage_id
    raise AssertionError(f"no id {prefix}-<n> on {port}")


def principal_on(group: RedisClusterGroup, port: int, prefix: str) -> str:
    """A principal's name that starts with ``prefix`` whose limits live on ``port``."""
    ranges = group.slots()
    for n in range(10_000):
        name = f"{prefix}{n}"
        if owner(ranges, limits_slot(name)) == port:
            return name
    raise AssertionError(f"no name {prefix}<n> on {port}")
