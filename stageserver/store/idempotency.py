"""Idempotency keys in the shared store: a retried request, on any host, finds the stage
its first attempt started.

A key (``principal/key``, the principal's ``Idempotency-Key``) is claimed with ``SET NX``
for the stage TTL, in the principal's slot (``keys.idempotency_key``). Its value is
``<stage id> <digest>``, the digest of the first request's body (a digest is hex: the
last space is the one between them), so that the same key sent with another body can be
refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .batch import Batcher
from .connection import STORE_ERRORS, store_errors
from .keys import idempotency_key

log = logging.getLogger("stageserver.store")


class IdempotencyKeys:
    def __init__(self, batcher: Callable[[], Batcher]) -> None:
        """``batcher``: gives this process's."""
        self._batcher = batcher

    def claim(
        self, key: str, stage_id: str, digest: str, ttl_seconds: float
    ) -> tuple[str, str] | None:
        """Claim ``key`` for ``stage_id``, whose request's body has ``digest``; the stage
        id that holds it already, and its body's digest, if one does. Raises
        StoreUnavailable."""
        name = idempotency_key(key)
        with store_errors():
            redis_client = self._batcher().client
            if redis_client.set(name, f"{stage_id} {digest}", nx=True, px=int(ttl_seconds * 1000)):
                return None
            held = redis_client.get(name)
        return None if held is None else _holder(held)

    def release(self, key: str, stage_id: str) -> None:
        """Let ``key`` go, if ``stage_id`` holds it (its stage was refused)."""
        name = idempotency_key(key)
        try:
            redis_client = self._batcher().client
            held = redis_client.get(name)
            if held is not None and _holder(held)[0] == stage_id:
                redis_client.delete(name)
        except STORE_ERRORS as exc:
            log.warning("idempotency key of a refused stage kept until it expires: %s", exc)


def _holder(value: bytes) -> tuple[str, str]:
    """The stage id and the body's digest an idempotency key holds."""
    stage_id, _, digest = bytes(value).decode().rpartition(" ")
    return stage_id, digest
