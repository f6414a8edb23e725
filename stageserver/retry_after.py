"""The ``Retry-After`` header, read the one way: for the upstreams the server calls, and
for the Python client calling the server. Standard library only, as the client needs."""

from __future__ import annotations

import email.utils
import time


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header's seconds from now (it is seconds, or an HTTP date); None
    when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²" is a digit to str.isdigit, not to float
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
