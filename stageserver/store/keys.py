"""The names of everything stageserver keeps in Redis: the one place that names them.

- a stage's four keys (``StageKeys``), each with the stage's key (its id in its
  principal's namespace) as a hash tag, ``ss:{alice/summary}...``, so that in a Redis
  Cluster they live in one slot, as the store's scripts need;
- the running index (``RUNNING_INDEX``), a key of its own, in a slot of its own: never
  among a script's keys;
- the cancel channel (``CANCEL_CHANNEL``);
- a principal's idempotency keys and limits (``idempotency_key``, ``LimitKeys``), which
  share the principal's tag, ``{alice}``, and so its slot.

tests/test_store_slots.py holds the slots to this for any name the server accepts.
"""

from __future__ import annotations

from typing import NamedTuple

#: Every running stage's key, scored by when its lease runs out (0: handed off).
RUNNING_INDEX = "ss:running"
#: A cancel for a stage that runs in another worker (``cancels.py``).
CANCEL_CHANNEL = "ss:cancel"


class StageKeys(NamedTuple):
    """A stage's keys, in the order every script on a stage names them (``KEYS[1..4]``)."""

    #: Its status, owner, summary, record, epoch, watchers (a hash).
    hash: str
    #: Its events (a stream, ``entries.py``).
    log: str
    #: A checkpoint of its text while it runs (a string).
    text: str
    #: Its owner's lease (a string, ``leases.py``).
    live: str


def stage_keys(stage_key: str) -> StageKeys:
    """The keys of the stage with this key."""
    base = f"ss:{{{stage_key}}}"
    return StageKeys(base, f"{base}:log", f"{base}:text", f"{base}:live")


def idempotency_key(key: str) -> str:
    """The Redis key of an idempotency key (``principal/key``): in the principal's slot."""
    return f"ss:{{{key.partition('/')[0]}}}:idem:{key}"


class LimitKeys(NamedTuple):
    """A principal's limits (``policy/shared_limits.py``), in the order ``ADMIT`` names
    them."""

    #: Its stream slots: stage instance -> lease deadline in ms (a sorted set).
    streams: str
    #: Its requests per second (a hash: second -> count).
    requests: str
    #: Its tokens per second (a hash: second -> count).
    tokens: str


def limit_keys(principal: str) -> LimitKeys:
    """The keys of the limits of the principal with this name."""
    base = f"ss:limits:{{{principal}}}"
    return LimitKeys(f"{base}:streams", f"{base}:requests", f"{base}:tokens")
