"""The names of everything stageserver keeps in Redis: the one place that names them.

A stage's keys carry its key (its id in its principal's namespace) as a hash tag, so that
in a Redis Cluster they live in one slot, as the scripts on them need:

- ``ss:{key}`` (hash): status, owner, summary JSON, record, epoch, remote watchers, and
  while in doubt ``suspect_since``; ``gap`` when the store lost events it could not get
  back; ``answer`` once it has ended;
- ``ss:{key}:log`` (stream): the events, each the exact bytes a client receives, several
  to an entry (``entries.py``: ids, fencing by epoch, and the text in each entry);
- ``ss:{key}:text`` (string): a checkpoint of the text, while the stage runs;
- ``ss:{key}:live`` (string): the owner's lease, held by the one stage instance that runs
  it. ``SET NX`` on it makes a stage id unique everywhere; the worker renews it with all
  its leases (``leases.py``).

Beside them:

- ``ss:running`` (sorted set, a key of its own, in a slot of its own: never among a
  script's keys): the key of every running stage, scored by when its lease runs out (0:
  handed off by a draining worker);
- channel ``ss:cancel``: a cancel for a stage that runs elsewhere (``cancels.py``);
- a principal's idempotency keys, ``ss:{alice}:idem:alice/<key>``, and its limits,
  ``ss:limits:{alice}:streams`` (sorted set), ``:requests`` and ``:tokens`` (hashes):
  they share the principal's tag, and so its slot, the admission's script's keys.

tests/test_store_slots.py holds the slots to this for any name the server accepts.
"""

from __future__ import annotations

from typing import NamedTuple

RUNNING_INDEX = "ss:running"
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
