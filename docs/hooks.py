"""mkdocs hooks: the tables that mirror code are generated from it, at build time.

- ``<!-- settings-table -->``: every ``STAGESERVER_*`` setting, its default and its meaning,
  from ``stageserver.settings`` (``SETTINGS`` and ``PROCESS_SETTINGS``).
- ``<!-- metrics-list -->``: every Prometheus metric family, from the collectors defined
  in ``stageserver/telemetry/metrics.py`` (their names, types, label names and help).
- ``<!-- changes -->``: ``CHANGES.md`` at the repository's root, so the history has one
  source and the site still shows it.
- ``<!-- extra-fields-table -->``: each upstream kind's ``extra_fields`` by default, from
  ``stageserver.config.EXTRA_FIELDS``.
- ``<!-- openai-chat-fields -->``, ``<!-- openai-responses-fields -->``: every field of
  OpenAI's two create requests and what stageserver does with it, from
  ``stageserver.openai_api.fields``.
- ``<!-- anthropic-messages-fields -->``, ``<!-- anthropic-beta-fields -->``,
  ``<!-- anthropic-count-tokens-fields -->``: the same for the Messages API's two
  requests (and the beta API's own fields), from ``stageserver.anthropic_api.fields``.

Named in ``mkdocs.yml`` (``hooks: [docs/hooks.py]``); ``tests/test_docs.py`` checks that
what it writes lists every setting and every metric.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

SETTINGS_MARKER = "<!-- settings-table -->"
METRICS_MARKER = "<!-- metrics-list -->"
CHANGES_MARKER = "<!-- changes -->"
EXTRA_FIELDS_MARKER = "<!-- extra-fields-table -->"
CHAT_FIELDS_MARKER = "<!-- openai-chat-fields -->"
RESPONSES_FIELDS_MARKER = "<!-- openai-responses-fields -->"
MESSAGES_FIELDS_MARKER = "<!-- anthropic-messages-fields -->"
COUNT_TOKENS_FIELDS_MARKER = "<!-- anthropic-count-tokens-fields -->"
BETA_FIELDS_MARKER = "<!-- anthropic-beta-fields -->"


def _importable() -> None:
    """Let ``stageserver`` be imported from this checkout, where it may not be installed.
    (mkdocs restores ``sys.path`` after loading a hook, so this runs at each call.)"""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def settings_table() -> str:
    """The configuration table: one row per key of ``SETTINGS`` and ``PROCESS_SETTINGS``."""
    _importable()
    from stageserver.settings import markdown_table

    return markdown_table()


def custom_collector(value: object) -> bool:
    """Whether ``value`` is a collector of families of its own (not a Counter, Gauge or
    Histogram, nor a registry): an instance whose ``describe()`` names what ``collect()``
    gives. prometheus_client's ``Collector`` is a protocol: it is recognised by shape."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    return (
        not isinstance(value, type | MetricWrapperBase | CollectorRegistry)
        and callable(getattr(value, "describe", None))
        and callable(getattr(value, "collect", None))
    )


def metric_families(module: ModuleType | None = None) -> list[tuple[str, str, list[str], str]]:
    """``(name, type, label names, help)`` of each prometheus_client collector defined at
    the top level of ``module`` (``stageserver.telemetry.metrics``), in definition order:
    its metrics (Counter, Gauge, Histogram), and the families of a custom collector (one
    whose ``describe()`` names them, with its ``labelnames``).

    The name is the one a query uses: a counter's with its ``_total``.
    """
    from prometheus_client.metrics import MetricWrapperBase

    if module is None:
        _importable()
        from stageserver.telemetry import metrics

        module = metrics
    families = []
    for value in vars(module).values():
        if custom_collector(value):
            labels = [str(label) for label in getattr(value, "labelnames", ())]
            for family in value.describe():
                suffix = "_total" if family.type == "counter" else ""
                families.append((family.name + suffix, family.type, labels, family.documentation))
            continue
        if not isinstance(value, MetricWrapperBase):
            continue
        kind = str(value._type)
        name = str(value._name)
        if kind == "counter":
            name += "_total"
        labels = [str(label) for label in value._labelnames]
        families.append((name, kind, labels, str(value._documentation)))
    return families


def metrics_table() -> str:
    """The metrics table: every family of ``stageserver/telemetry/metrics.py``."""
    rows = ["| metric | type | labels | what |", "| --- | --- | --- | --- |"]
    for name, kind, labels, text in metric_families():
        shown = ", ".join(labels) if labels else "–"
        escaped = text.replace("|", "\\|")
        rows.append(f"| `{name}` | {kind} | {shown} | {escaped} |")
    return "\n".join(rows)


def changes() -> str:
    """``CHANGES.md`` without its first heading (the page has its own title), its links
    into ``docs/`` made relative to the page, which is in ``docs/`` itself."""
    text = (ROOT / "CHANGES.md").read_text()
    first, _, rest = text.partition("\n")
    if first.startswith("# "):
        text = rest
    return text.replace("](docs/", "](")


def openai_fields(api: str) -> str:
    """The table of every field of OpenAI's ``chat`` or ``responses`` create request."""
    _importable()
    from stageserver.fields import markdown_table
    from stageserver.openai_api import fields

    rules = fields.CHAT_FIELDS if api == "chat" else fields.RESPONSES_FIELDS
    return markdown_table(rules)


def anthropic_fields(request: str) -> str:
    """The table of every field of the Messages API's ``messages`` or ``count_tokens``
    request, or of those only its ``beta`` API has."""
    _importable()
    from stageserver.anthropic_api import fields
    from stageserver.fields import markdown_table

    rules = {
        "messages": fields.MESSAGES_FIELDS,
        "beta": fields.BETA_FIELDS,
        "count_tokens": fields.COUNT_TOKENS_FIELDS,
    }[request]
    return markdown_table(rules)


def extra_fields_rows() -> str:
    """A table row per upstream kind: the fields beyond OpenAI's API it takes by default."""
    _importable()
    from stageserver.config import EXTRA_FIELDS

    return "\n".join(
        f"| `{kind}` | {', '.join(f'`{name}`' for name in names) or 'none'} |"
        for kind, names in EXTRA_FIELDS.items()
    )


def render(markdown: str) -> str:
    """``markdown`` with each marker replaced by what it stands for."""
    if EXTRA_FIELDS_MARKER in markdown:
        markdown = markdown.replace(EXTRA_FIELDS_MARKER, extra_fields_rows())
    if CHAT_FIELDS_MARKER in markdown:
        markdown = markdown.replace(CHAT_FIELDS_MARKER, openai_fields("chat"))
    if RESPONSES_FIELDS_MARKER in markdown:
        markdown = markdown.replace(RESPONSES_FIELDS_MARKER, openai_fields("responses"))
    if MESSAGES_FIELDS_MARKER in markdown:
        markdown = markdown.replace(MESSAGES_FIELDS_MARKER, anthropic_fields("messages"))
    if BETA_FIELDS_MARKER in markdown:
        markdown = markdown.replace(BETA_FIELDS_MARKER, anthropic_fields("beta"))
    if COUNT_TOKENS_FIELDS_MARKER in markdown:
        markdown = markdown.replace(COUNT_TOKENS_FIELDS_MARKER, anthropic_fields("count_tokens"))
    if SETTINGS_MARKER in markdown:
        markdown = markdown.replace(SETTINGS_MARKER, settings_table())
    if METRICS_MARKER in markdown:
        markdown = markdown.replace(METRICS_MARKER, metrics_table())
    if CHANGES_MARKER in markdown:
        markdown = markdown.replace(CHANGES_MARKER, changes())
    return markdown


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """mkdocs' hook: called with each page's Markdown before it is rendered."""
    return render(markdown)
