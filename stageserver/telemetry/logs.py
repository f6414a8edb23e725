"""Log lines: one per stage, as text or as JSON lines.

``OutcomeLog``, a stage listener, logs each stage's outcome once, on logger
``stageserver.stage``, with the fields also in ``extra``, so a formatter can print them
without parsing the message:

- ``text`` (the default)::

    [2026-11-25 10:00:00 +0000] [4242] [INFO] stageserver.stage: stage_id=s1 outcome=done \
upstream=default request_id=7f0c... ttft_ms=12.3 chunks=5 duration_ms=40.1

  ``upstream`` is the upstream that served the stage (a fallback's name when one did).
  A stage that failed over also gets ``replica`` (the one that served) and ``attempts``
  (each attempt's upstream, replica and outcome); one served by its first attempt logs
  just as before pools.

- ``json``: one JSON object per line, the same fields as keys, plus ``time``, ``level``,
  ``logger``, ``pid`` and ``message``. In a gunicorn worker, gunicorn's own lines too;
  an access line gets ``method``, ``path``, ``status``, ``bytes``, ``duration_ms``,
  ``request_id``, ``remote_addr`` and ``user_agent`` as fields.

``create_app`` calls ``configure``: the ``stageserver`` loggers write to stderr, which is
where gunicorn's own error log goes (``errorlog = "-"``). An app that mounts stageserver
into its own configures logging itself; ``init_app`` leaves logging alone.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..principals import ANONYMOUS
from ..stages.records import ContinuationRecord
from ..stages.stage import Stage, StageListener
from ..stages.status import StageStatus

LOG_FORMATS = ("text", "json")

_TEXT_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"
_TEXT_DATEFMT = "%Y-%m-%d %H:%M:%S %z"  # gunicorn's, so the two interleave legibly
_HANDLER_NAME = "stageserver"

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class OutcomeLog(StageListener):
    """One line per stage, when it ends."""

    def __init__(self) -> None:
        self._log = logging.getLogger("stageserver.stage")

    def on_continue(self, stage: Stage, record: ContinuationRecord) -> None:
        """One line for each continuation, made or not: a warning, since what cut the
        answer deserves a look even when the client never saw it."""
        fields: dict[str, Any] = {
            "stage_id": stage.stage_id,
            "continuation": record.outcome,
            "reason": record.reason,
            "mode": record.mode,
            "after": record.after,
            "request_id": stage.spec.request_id,
        }
        for name in ("upstream", "from_replica", "to_replica", "cause", "error"):
            if getattr(record, name):
                fields[name] = getattr(record, name)
        self._log.warning(" ".join(f"{k}={_logfmt(v)}" for k, v in fields.items()), extra=fields)

    def on_finish(self, stage: Stage) -> None:
        if not self._log.isEnabledFor(logging.INFO):
            return
        ttft = stage.first_token_seconds
        fields: dict[str, Any] = {
            "stage_id": stage.stage_id,
            "outcome": stage.outcome,
            "upstream": stage.upstream,  # the one that served, a fallback maybe
            "request_id": stage.spec.request_id,
            "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
            "chunks": stage.chunk_count,
            "duration_ms": round((stage.duration_seconds or 0) * 1000, 1),
        }
        if stage.dialect.name != "seed":  # the seed's lines stay as they were
            fields["dialect"] = stage.dialect.name
        if stage.continuations:
            fields["continuations"] = sum(c.outcome == "ok" for c in stage.continuations)
        if len(stage.attempts) > 1:  # it failed over: which replica served, after what
            fields["replica"] = None if stage.served_by is None else stage.served_by.replica
            fields["attempts"] = ", ".join(
                f"{a.upstream} {a.replica} {a.outcome}" for a in stage.attempts
            )
        principal = stage.spec.principal
        if principal is not ANONYMOUS:
            fields["principal"] = principal.name
        if stage.status == StageStatus.ERROR:
            fields["error_kind"] = type(stage.failure).__name__
            fields["error"] = stage.error
        elif stage.status == StageStatus.CANCELLED:
            fields["reason"] = stage.cancel_reason
        self._log.info(" ".join(f"{k}={_logfmt(v)}" for k, v in fields.items()), extra=fields)


def _logfmt(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.name == "gunicorn.access" and isinstance(record.args, Mapping):
            entry.update(_access_fields(record.args))
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str, separators=(",", ":"))


def _access_fields(atoms: Mapping[str, Any]) -> dict[str, Any]:
    """gunicorn passes an access line's values (its "atoms") as the record's args."""
    status = str(atoms.get("s") or "")
    micros = atoms.get("D")
    return {
        "remote_addr": atoms.get("h"),
        "method": atoms.get("m"),
        "path": atoms.get("U"),
        "status": int(status) if status.isdigit() else status,
        "bytes": atoms.get("B"),
        "duration_ms": round(micros / 1000, 1) if isinstance(micros, int) else None,
        "request_id": atoms.get("{x-request-id}o"),
        "principal": atoms.get("{stageserver.principal}e"),
        "user_agent": atoms.get("a"),
    }


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(_TEXT_FORMAT, _TEXT_DATEFMT)
    raise ConfigError(
        f"STAGESERVER_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}"
    )


def configure(log_format: str) -> None:
    """Send the ``stageserver`` loggers to stderr in ``log_format``, from INFO up.

    Idempotent: calling it again (another app in the same process) swaps the formatter
    of the one handler it installed. A level set on the logger beforehand is kept.
    """
    fmt = formatter(log_format)
    logger = logging.getLogger("stageserver")
    handler = next((h for h in logger.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        logger.addHandler(handler)
    handler.setFormatter(fmt)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def format_gunicorn_logs(log_format: str) -> None:
    """In a gunicorn worker: give gunicorn's error and access lines the same format, so
    that ``json`` output is JSON lines throughout. The arbiter's few lines (boot, exit)
    stay gunicorn's text: formatting them would mean importing stageserver in the arbiter,
    before gevent patches the workers."""
    if log_format != "json":
        return
    for name in ("gunicorn.error", "gunicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(JsonFormatter())


def _iso_time(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
