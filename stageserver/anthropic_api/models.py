"""``GET /v1/models`` as the Messages API lists models, for a request that carries
``anthropic-version``: ``{"data": [ModelInfo...], "has_more", "first_id", "last_id"}``,
a page at a time (``limit``, 20 by default, 1 to 1000; ``after_id`` or ``before_id``, the
id of a model of the list, as a cursor).

A ``ModelInfo`` is ``{"type": "model", "id", "display_name", "created_at",
"lifecycle"}``: stageserver knows no model's release date, and gives the epoch (as
OpenAI's listing gives ``created: 0``); every model it lists is ``active``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import InvalidRequest

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
EPOCH = "1970-01-01T00:00:00Z"


def model_info(model: str) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model,
        "display_name": model,
        "created_at": EPOCH,
        "lifecycle": "active",
    }


def model_page(
    models: Sequence[str], *, limit: int, after_id: str | None, before_id: str | None
) -> dict[str, Any]:
    """The page of ``models`` the cursors ask for. Raises InvalidRequest naming a cursor
    that is no model of the list, or both cursors at once."""
    if after_id is not None and before_id is not None:
        raise InvalidRequest("before_id: give after_id or before_id, not both", field="before_id")
    start, end = 0, len(models)
    if after_id is not None:
        start = _place(models, after_id, "after_id") + 1
        end = min(start + limit, len(models))
        more = end < len(models)
    elif before_id is not None:
        end = _place(models, before_id, "before_id")
        start = max(end - limit, 0)
        more = start > 0
    else:
        end = min(limit, len(models))
        more = end < len(models)
    page = list(models[start:end])
    return {
        "data": [model_info(model) for model in page],
        "has_more": more,
        "first_id": page[0] if page else None,
        "last_id": page[-1] if page else None,
    }


def _place(models: Sequence[str], model: str, cursor: str) -> int:
    try:
        return list(models).index(model)
    except ValueError:
        raise InvalidRequest(f"{cursor}: no model {model!r} here", field=cursor) from None


def limit_of(raw: str | None) -> int:
    """The ``limit`` query parameter; raises InvalidRequest."""
    if raw is None:
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4 and 1 <= int(raw) <= MAX_LIMIT):
        raise InvalidRequest(f"limit: must be a whole number from 1 to {MAX_LIMIT}", field="limit")
    return int(raw)
