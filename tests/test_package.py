"""The package as a user gets it: the sdist and the wheel built with ``python -m build``,
checked by twine, and the wheel installed by pip into fresh venvs outside the checkout.

- the full install, through ``examples/requirements.txt`` (``--find-links ../dist``):
  the example app (``examples/app.py``, an existing Flask app that mounts stageserver
  under ``/llm`` with its own login) runs under gunicorn's gevent worker from a copy of
  ``examples/``, against the fake upstream; ``stageserver`` the command works;
- the client-only install: the wheel without its dependencies, plus the ``[client]``
  extra's, streams from that app with ``stageserver.client``.

Nothing of the checkout is on those processes' path: they run in a temporary folder with
no PYTHONPATH, and each test that matters asserts where ``stageserver`` came from.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from email.parser import Parser
from pathlib import Path
from typing import Any, TypedDict

import pytest
import requests
from packaging.requirements import Requirement

from testing.fake_upstream import FakeUpstream
from testing.servers import ROOT
from testing.sse import chunk_text, parse_events
from testing.venvs import RunningServer, Venv, serve_in

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION: str = PROJECT["version"]
DIST_INFO = f"stageserver-{VERSION}.dist-info"
# The server's packages: the client must import none of them.
SERVER_PACKAGES = (
    "flask",
    "werkzeug",
    "gevent",
    "gunicorn",
    "redis",
    "openai",
    "pydantic",
    "prometheus_client",
)
# How the example app is run: examples/README.md and examples/app.py say the same.
GUNICORN = ("gunicorn", "-c", "python:stageserver.gunicorn_conf", "app:app")
ALICE = {"user": "alice", "password": "wonderland"}
MODEL = "fake?chunks=3"
# The fake upstream's stream for MODEL: three pieces of content, the chunk that stops
# and the one with the usage; then stageserver's done.
EVENTS = ["chat_completion_chunk"] * 5 + ["done"]
TEXT = "tok0 tok1 tok2 "


@dataclass(frozen=True)
class Built:
    sdist: Path
    wheel: Path
    examples: Path  # a copy of examples/, beside dist/ as in the checkout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """``python -m build``: the sdist, and the wheel built from it, into ``<tmp>/dist``."""
    work = tmp_path_factory.mktemp("package")
    dist = work / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, f"python -m build failed:\n{build.stdout}\n{build.stderr}"
    examples = work / "examples"
    shutil.copytree(
        ROOT / "examples", examples, ignore=shutil.ignore_patterns(".venv", "__pycache__")
    )
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    return Built(sdist, wheel, examples)


@pytest.fixture(scope="module")
def server_venv(built: Built) -> Venv:
    """The full install, as examples/README.md says: ``pip install -r requirements.txt``."""
    venv = Venv.create(built.examples.parent / "venv-server")
    venv.pip_install("-r", "requirements.txt", cwd=built.examples)
    return venv


@pytest.fixture(scope="module")
def client_venv(built: Built) -> Venv:
    """The wheel without its dependencies, and the ``[client]`` extra's from its metadata."""
    venv = Venv.create(built.examples.parent / "venv-client")
    venv.pip_install("--no-deps", built.wheel, cwd=venv.path)
    client = [
        req
        for line in _metadata(built.wheel).get_all("Requires-Dist") or []
        if (req := Requirement(line)).marker is not None
        and req.marker.evaluate({"extra": "client"})
    ]
    assert sorted(req.name for req in client) == ["httpx", "httpx-sse"]
    venv.pip_install(*(f"{req.name}{req.specifier}" for req in client), cwd=venv.path)
    return venv


@pytest.fixture(scope="module")
def example_app(built: Built, server_venv: Venv, fake: FakeUpstream) -> Iterator[RunningServer]:
    """examples/app.py under gunicorn's gevent worker, run from the copy of examples/."""
    env = {"STAGESERVER_UPSTREAM_URL": fake.url}
    with serve_in(server_venv, GUNICORN, cwd=built.examples, env=env, ready_path="/me") as app:
        yield app


def chat_body(stage_id: str) -> dict[str, Any]:
    return {"stage_id": stage_id, "model_name": MODEL, "user_prompt": "hi", "stream": True}


def _metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        return Parser().parsestr(archive.read(f"{DIST_INFO}/METADATA").decode())


class ImportReport(TypedDict):
    file: str
    loaded: list[str]
    installed: list[str]
    checkout: list[str]


def _import_report(venv: Venv, cwd: Path, module: str) -> ImportReport:
    """Where ``module`` comes from in ``venv``, run from ``cwd``, and which of the server's
    packages it loaded and which are installed there; whether the checkout's own packages
    (``testing``, ``tests``) can be imported."""
    script = f"""
import importlib.util, json, sys
import {module}
server = {SERVER_PACKAGES!r}
print(json.dumps({{
    "file": sys.modules[{module!r}].__file__,
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in server),
    "installed": [m for m in server if importlib.util.find_spec(m) is not None],
    "checkout": [m for m in ("testing", "tests") if importlib.util.find_spec(m) is not None],
}}))
"""
    report: ImportReport = json.loads(venv.run("python", "-c", script, cwd=cwd).stdout)
    return report


# --- the artifacts ---------------------------------------------------------------------


# The optional parts of the package, and the extra that installs what each imports.
OPTIONAL = {
    "stageserver/store/": "redis",
    "stageserver/policy/shared_limits.py": "redis",
    "stageserver/telemetry/tracing.py": "tracing",
    "stageserver/client/": "client",
    "stageserver/launcher/": "llm",
}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_module_the_package_imports_is_a_declared_dependency() -> None:
    """Each third-party import in stageserver/ comes from a distribution the project
    declares: a dependency, or, in an optional part, that part's extra."""
    base = {_canonical(Requirement(r).name) for r in PROJECT["dependencies"]}
    extras = {
        extra: {_canonical(Requirement(r).name) for r in requirements}
        for extra, requirements in PROJECT["optional-dependencies"].items()
    }
    providers = importlib.metadata.packages_distributions()
    undeclared = []
    for path in sorted((ROOT / "stageserver").rglob("*.py")):
        where = path.relative_to(ROOT).as_posix()
        extra = next((e for part, e in OPTIONAL.items() if where.startswith(part)), None)
        allowed = base | (extras[extra] if extra else set())
        for module in _third_party_imports(path):
            dists = {_canonical(d) for d in providers.get(module, [module])}
            if not dists & allowed:
                undeclared.append(f"{where}: {module}")
    assert undeclared == []


def _third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.partition(".")[0])
    return {
        n
        for n in names
        if n not in sys.stdlib_module_names and n not in ("stageserver", "__future__")
    }


def test_twine_checks_the_sdist_and_the_wheel(built: Built) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(built.sdist), str(built.wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_the_wheel_holds_the_package_and_its_files_only(built: Built) -> None:
    assert built.wheel.name == f"stageserver-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(built.wheel) as archive:
        names = set(archive.namelist())
    assert {name.split("/")[0] for name in names} == {"stageserver", DIST_INFO}
    for name in (
        "stageserver/py.typed",  # the package is typed ("Typing :: Typed")
        "stageserver/web/static/stageserver.js",
        "stageserver/web/playground/index.html",
        "stageserver/web/playground/playground.js",
        "stageserver/web/playground/playground.css",
        "stageserver/gunicorn_conf.py",
        "stageserver/wsgi.py",
        "stageserver/cli.py",
        "stageserver/launcher/run.py",
        "stageserver/client/__init__.py",
        f"{DIST_INFO}/entry_points.txt",
    ):
        assert name in names, f"{name} is not in the wheel"
    # Every file of the package is there, and nothing else of the checkout.
    in_checkout = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "stageserver").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    assert {name for name in names if name.startswith("stageserver/")} == in_checkout
    with zipfile.ZipFile(built.wheel) as archive:
        entry_points = archive.read(f"{DIST_INFO}/entry_points.txt").decode()
    assert "stageserver = stageserver.cli:main" in entry_points


def test_the_wheel_metadata_is_the_projects(built: Built) -> None:
    metadata = _metadata(built.wheel)
    assert metadata["Name"] == "stageserver"
    assert metadata["Version"] == VERSION
    assert metadata["Requires-Python"] == PROJECT["requires-python"]
    assert metadata["Description-Content-Type"] == "text/markdown"
    extras = set(metadata.get_all("Provides-Extra") or [])
    assert {"client", "redis", "tracing", "llm", "dev"} <= extras
    required = {
        Requirement(line).name
        for line in metadata.get_all("Requires-Dist") or []
        if Requirement(line).marker is None
    }
    assert {"flask", "gevent", "gunicorn", "openai", "pydantic"} <= required
    assert not {"httpx", "httpx-sse", "redis"} & required  # extras, not requirements


def test_the_sdist_holds_what_builds_and_tests_the_package(built: Built) -> None:
    top = f"stageserver-{VERSION}"
    with tarfile.open(built.sdist) as archive:
        names = set(archive.getnames())
    for name in (
        "pyproject.toml",
        "README.md",
        "PKG-INFO",
        "stageserver/web/static/stageserver.js",
        "stageserver/web/playground/index.html",
        "examples/app.py",
        "examples/client.py",
        "examples/requirements.txt",
        "tests/test_package.py",
        "testing/venvs.py",
    ):
        assert f"{top}/{name}" in names, f"{name} is not in the sdist"
    assert not [name for name in names if "__pycache__" in name or "/.venv/" in name]


# --- the full install ------------------------------------------------------------------


def test_the_venv_runs_the_installed_wheel_not_the_checkout(
    built: Built, server_venv: Venv
) -> None:
    site = server_venv.site_packages()
    report = _import_report(server_venv, built.examples, "stageserver")
    assert Path(report["file"]) == site / "stageserver" / "__init__.py"
    assert report["checkout"] == []
    # requirements.txt's --find-links ../dist found the wheel just built: pip installed
    # exactly its files (the RECORD pip writes repeats the wheel's, hashes and all).
    with zipfile.ZipFile(built.wheel) as archive:
        record = archive.read(f"{DIST_INFO}/RECORD").decode().splitlines()
    installed = set((site / DIST_INFO / "RECORD").read_text().splitlines())
    hashed = [line for line in record if line.split(",")[1]]
    assert hashed and not [line for line in hashed if line not in installed]


def test_the_full_install_imports_no_server_package_for_the_client(
    built: Built, server_venv: Venv
) -> None:
    report = _import_report(server_venv, built.examples, "stageserver.client")
    # There to import (all but redis, an extra), and not imported.
    assert set(report["installed"]) == set(SERVER_PACKAGES) - {"redis"}
    assert report["loaded"] == []


def test_the_example_app_streams_a_stage_to_a_signed_in_user(
    example_app: RunningServer, upstream: FakeUpstream
) -> None:
    browser = requests.Session()
    signed_in = browser.post(f"{example_app.url}/login", data=ALICE, allow_redirects=False)
    assert signed_in.status_code == 302
    assert browser.get(f"{example_app.url}/me", timeout=5).json() == {"user": "alice"}

    body = chat_body("cookie-1")
    response = browser.post(f"{example_app.url}/llm/chat", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    events = parse_events(response.content)
    assert [event["event"] for event in events] == EVENTS
    assert [event["id"] for event in events] == [
        *(f"cookie-1-chunk-{n}" for n in range(5)),
        "cookie-1-done-5",
    ]
    assert {event["data"]["stage_id"] for event in events} == {"cookie-1"}
    assert chunk_text(events) == TEXT
    assert [request.body["model"] for request in upstream.requests] == [MODEL]


def test_the_example_apps_token_is_a_login_too(
    example_app: RunningServer, upstream: FakeUpstream
) -> None:
    login = requests.post(f"{example_app.url}/login", json=ALICE, timeout=5)
    assert login.status_code == 200
    token = login.json()["token"]
    body = chat_body("token-1")
    headers = {"Authorization": f"Bearer {token}"}
    response = requests.post(f"{example_app.url}/llm/chat", json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert [event["event"] for event in parse_events(response.content)] == EVENTS
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer not-a-token"}, {"Cookie": "session=forged"}],
    ids=["nobody", "forged-token", "forged-session"],
)
def test_the_example_app_refuses_a_stage_without_a_login(
    example_app: RunningServer, upstream: FakeUpstream, headers: dict[str, str]
) -> None:
    body = chat_body("nobody-1")
    response = requests.post(f"{example_app.url}/llm/chat", json=body, headers=headers, timeout=10)
    assert response.status_code == 401
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert isinstance(response.json()["error"], str) and response.json()["error"]
    assert requests.get(f"{example_app.url}/me", headers=headers, timeout=5).status_code == 401
    assert upstream.requests == []


def test_the_example_app_serves_stageservers_files_from_the_wheel(
    example_app: RunningServer,
) -> None:
    script = requests.get(f"{example_app.url}/llm/static/stageserver.js", timeout=5)
    assert script.status_code == 200 and "javascript" in script.headers["Content-Type"]
    playground = requests.get(f"{example_app.url}/llm/playground", timeout=5)
    assert playground.status_code == 200 and "<html" in playground.text.lower()
    assert requests.get(f"{example_app.url}/llm/docs", timeout=5).status_code == 200
    assert "Sign in" in requests.get(example_app.url, timeout=5).text  # the app's own page


# --- the command -----------------------------------------------------------------------


def test_stageserver_version(built: Built, server_venv: Venv) -> None:
    result = server_venv.run("stageserver", "--version", cwd=built.examples)
    assert result.stdout.strip() == f"stageserver {VERSION}"


def test_stageserver_check_prints_the_settings_but_no_secret(
    built: Built, server_venv: Venv
) -> None:
    env = {
        "STAGESERVER_UPSTREAM_URL": "http://127.0.0.1:9/v1",
        "STAGESERVER_UPSTREAM_KIND": "llamacpp",
        "STAGESERVER_UPSTREAM_API_KEY": "sk-secret",
    }
    result = server_venv.run("stageserver", "check", cwd=built.examples, env=env)
    assert "sk-secret" not in result.stdout + result.stderr
    assert "STAGESERVER_UPSTREAM_API_KEY = (set)" in result.stdout
    assert "STAGESERVER_UPSTREAM_URL = http://127.0.0.1:9/v1  [environment]" in result.stdout
    assert "STAGESERVER_WORKERS = 1  [default]" in result.stdout
    assert "default: llamacpp at http://127.0.0.1:9/v1" in result.stdout


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"STAGESERVER_FOO": "1"}, "unknown setting STAGESERVER_FOO"),
        (
            {
                "STAGESERVER_UPSTREAM_URL": "http://127.0.0.1:9/v1",
                "STAGESERVER_UPSTREAM_KIND": "nope",
            },
            "STAGESERVER_UPSTREAM_KIND: 'nope' must be one of",
        ),
        ({"STAGESERVER_UPSTREAM_KIND": "nope"}, "STAGESERVER_UPSTREAM_KIND: 'nope' must be one of"),
        (
            {"STAGESERVER_UPSTREAM_URL": "http://127.0.0.1:9/v1", "STAGESERVER_WORKERS": "2"},
            "STAGESERVER_WORKERS=2 needs a shared stage store",
        ),
    ],
    ids=["unknown-key", "bad-kind", "bad-kind-without-url", "workers-without-store"],
)
def test_stageserver_check_refuses_a_bad_setting(
    built: Built, server_venv: Venv, env: dict[str, str], named: str
) -> None:
    result = server_venv.run("stageserver", "check", cwd=built.examples, env=env, check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("stageserver: ")
    assert named in result.stderr


# --- the client-only install -----------------------------------------------------------


def test_the_client_only_install_has_none_of_the_servers_packages(
    built: Built, client_venv: Venv
) -> None:
    report = _import_report(client_venv, built.examples, "stageserver.client")
    assert Path(report["file"]).is_relative_to(client_venv.site_packages())
    assert report["installed"] == []
    assert report["loaded"] == []
    assert report["checkout"] == []


CLIENT_STREAM = """
import json, sys
import httpx
from stageserver.client import StageClient

url, model, server = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
login = httpx.post(url + "/login", json={"user": "bob", "password": "builder"})
with StageClient(url + "/llm", api_key=login.raise_for_status().json()["token"]) as client:
    events = [
        [type(event).__name__, event.id, event.stage_id, getattr(event, "text", None)]
        for event in client.stream(stage_id="client-1", model_name=model, user_prompt="hi")
    ]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in server)
print(json.dumps({"events": events, "loaded": loaded}))
"""


def test_the_client_only_install_streams_from_the_example_app(
    built: Built, client_venv: Venv, example_app: RunningServer, upstream: FakeUpstream
) -> None:
    argv = ("-c", CLIENT_STREAM, example_app.url, MODEL, ",".join(SERVER_PACKAGES))
    report = json.loads(client_venv.run("python", *argv, cwd=built.examples).stdout)
    assert report["loaded"] == []
    assert report["events"] == [
        *(
            ["ChunkEvent", f"client-1-chunk-{n}", "client-1", text]
            for n, text in enumerate(["tok0 ", "tok1 ", "tok2 ", "", ""])
        ),
        ["DoneEvent", "client-1-done-5", "client-1", None],
    ]
    assert len(upstream.requests) == 1


def test_the_example_client_script_streams_the_answer(
    built: Built, client_venv: Venv, example_app: RunningServer, upstream: FakeUpstream
) -> None:
    env = {"EXAMPLE_URL": example_app.url, "EXAMPLE_MODEL": MODEL}
    result = client_venv.run("python", "client.py", "Say hi", cwd=built.examples, env=env)
    assert result.stdout == TEXT + "\n"
    assert result.stderr == ""
    assert [request.body["messages"][-1]["content"] for request in upstream.requests] == ["Say hi"]
