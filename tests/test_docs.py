"""The docs site stays true: its generated tables list every setting and every metric,
every page of its navigation exists, and the README stays short and points to them."""

from __future__ import annotations

import ast
import importlib.util
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from prometheus_client import Counter, Gauge, Histogram

from stageserver import store
from stageserver.anthropic_api.fields import BETA_FIELDS, COUNT_TOKENS_FIELDS, MESSAGES_FIELDS
from stageserver.openai_api.fields import CHAT_FIELDS, RESPONSES_FIELDS
from stageserver.settings import PROCESS_SETTINGS, SETTINGS
from stageserver.telemetry import metrics
from testing.servers import ROOT

DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
MKDOCS = (ROOT / "mkdocs.yml").read_text()


def _hooks() -> ModuleType:
    """docs/hooks.py, the mkdocs hook, loaded from its file as mkdocs does."""
    spec = importlib.util.spec_from_file_location("stageserver_docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _hooks()
render: Callable[[str], str] = hooks.render


def nav_pages() -> list[str]:
    """The Markdown files mkdocs.yml's ``nav`` names, in order."""
    nav = MKDOCS.split("\nnav:\n", 1)[1]
    nav = re.split(r"\n(?=\S)", nav, maxsplit=1)[0]  # up to the next top-level key
    return re.findall(r"^\s*- (?:[^:\n]+:\s*)?(\S+\.md)\s*$", nav, flags=re.M)


#: What makes a metric family in metrics.py: a metric, or a custom collector's family.
_COUNTERS = ("Counter", "CounterMetricFamily")
_FAMILIES = (*_COUNTERS, "Gauge", "Histogram", "GaugeMetricFamily")


def metric_names_in_source() -> set[str]:
    """The name given to each Counter, Gauge and Histogram made in metrics.py, and to each
    family its custom collectors make, read from its source, as a query spells it (a
    counter's with ``_total``)."""
    tree = ast.parse(Path(metrics.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        if node.func.id not in _FAMILIES:
            continue
        first = node.args[0]
        assert isinstance(first, ast.Constant) and isinstance(first.value, str)
        suffix = "_total" if node.func.id in _COUNTERS else ""
        names.add(first.value.removesuffix("_total") + suffix)
    return names


def metric_names_in_module() -> set[str]:
    """The name of each family the module's prometheus_client collectors give."""
    names = set()
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            names.add(value._name + "_total")
        elif isinstance(value, Gauge | Histogram):
            names.add(value._name)
        elif hooks.custom_collector(value):
            for family in value.describe():
                names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_the_settings_table_lists_every_setting() -> None:
    table = render("<!-- settings-table -->")
    keys = [*SETTINGS, *PROCESS_SETTINGS]
    assert keys
    for key in keys:
        assert f"| `{key}` |" in table, key
    assert table.count("\n| `STAGESERVER_") == len(keys)
    assert "<!-- settings-table -->" in (DOCS / "configuration.md").read_text()


def test_the_metrics_list_names_every_metric_family() -> None:
    in_module = metric_names_in_module()
    # Every collector made in the source is one the module holds (none hidden in a
    # function or a dict, where a scan of the module would miss it), and there are some.
    assert in_module == metric_names_in_source()
    assert "stageserver_stages_total" in in_module
    listed = render("<!-- metrics-list -->")
    for name in sorted(in_module):
        assert f"| `{name}` |" in listed, name
    assert listed.count("\n| `stageserver_") == len(in_module)
    assert "<!-- metrics-list -->" in (DOCS / "operations.md").read_text()


def test_the_openai_page_has_the_table_of_every_field_of_both_requests() -> None:
    page = (DOCS / "openai.md").read_text()
    for marker in ("<!-- openai-chat-fields -->", "<!-- openai-responses-fields -->"):
        assert marker in page
    rendered = render(page)
    for rule in (*CHAT_FIELDS, *RESPONSES_FIELDS):
        assert f"| `{rule.name}` | {rule.treatment.value}" in rendered, rule.name


def test_the_anthropic_page_has_the_table_of_every_field_of_both_requests() -> None:
    page = (DOCS / "anthropic.md").read_text()
    for request in ("messages", "beta", "count-tokens"):
        assert f"<!-- anthropic-{request}-fields -->" in page
    rendered = render(page)
    for rule in (*MESSAGES_FIELDS, *BETA_FIELDS, *COUNT_TOKENS_FIELDS):
        assert f"| `{rule.name}` | {rule.treatment.value}" in rendered, rule.name


def test_every_page_of_the_nav_exists_and_every_page_is_in_it() -> None:
    pages = nav_pages()
    assert "index.md" in pages and "tutorial.md" in pages
    for page in pages:
        assert (DOCS / page).is_file(), page
    assert sorted(p.name for p in DOCS.glob("*.md")) == sorted(pages)
    assert "docs/hooks.py" in MKDOCS


def test_the_readme_is_short_and_links_to_the_docs() -> None:
    assert len(README.splitlines()) <= 250
    linked = set(re.findall(r"\]\(docs/([^)#]+)", README))
    for page in nav_pages():
        if page not in ("index.md", "changes.md"):
            assert page in linked, page
    assert "](CHANGES.md)" in README
    for target in re.findall(r"\]\(((?:docs/)?[\w./-]+?)(?:#[\w-]+)?\)", README):
        assert (ROOT / target).is_file(), target


def test_changes_are_on_the_site_from_their_one_source() -> None:
    page = render((DOCS / "changes.md").read_text())
    assert "<!-- changes -->" not in page
    assert "## The work on the relay" in page
    assert "](docs/" not in page


def test_the_extension_docstring_names_every_setting_it_reads() -> None:
    """StageServer's docstring is the API reference's list of keys: none may be missing."""
    from stageserver.app import StageServer

    doc = StageServer.__doc__ or ""
    assert [key for key in SETTINGS if f"``{key}``" not in doc] == []


def test_the_metrics_docstring_names_every_family() -> None:
    doc = ast.get_docstring(ast.parse(Path(metrics.__file__).read_text())) or ""
    assert sorted(n for n in metric_names_in_source() if f"``{n}``" not in doc) == []


def test_the_store_layers_table_is_the_stores_import_contract() -> None:
    """The table of the store's layers in docs/architecture.md is the contract that
    lint-imports holds, layer by layer."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    [contract] = [c for c in contracts["contracts"] if c.get("containers") == ["stageserver.store"]]
    page = (DOCS / "architecture.md").read_text()
    table = page.split("Inside `store/`, a layers contract", 1)[1].split("\n\n")[1]
    rows = re.findall(r"^\| +(\d+) \| (.+) \|$", table, flags=re.M)
    assert [int(n) for n, _ in rows] == list(range(1, len(rows) + 1))
    assert [layer.replace("`", "").replace("\\|", "|") for _, layer in rows] == contract["layers"]


def test_the_store_package_docstring_names_every_module_of_the_store() -> None:
    assert store.__doc__ is not None and store.__file__ is not None
    modules = sorted(p.name for p in Path(store.__file__).parent.glob("*.py"))
    assert [m for m in modules if m != "__init__.py" and f"``{m}``" not in store.__doc__] == []
