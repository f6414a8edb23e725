"""The contract, from outside: schemathesis against a live gunicorn, from /openapi.json.

Every operation of the document, a few hundred generated cases each (its examples, then
its coverage cases, then random ones; stateful testing off), against a server with API
keys (the key passed) and against an open one. Each response must pass the checks below:
no 5xx, and every status, content type, header and body as the document says, every
event of a stream included. What schemathesis finds is fixed in the server, or in the
document where the document was wrong; nothing is left out of the run.

``SCHEMATHESIS_SEED`` replays a run (its seed is printed at the end of its output);
unset, each run draws its own.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import requests

from testing.fake_upstream import FakeUpstream
from testing.servers import VENV_BIN, Gunicorn, gunicorn_server

#: Every test here starts a process (testing/processes.py).
pytestmark = pytest.mark.processes

KEY = "schemathesis-key-1"
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",  # schema-breaking input gets a 4xx
    "missing_required_header",
    "unsupported_method",  # 405, with Allow
    "allow_header_conformance",
]
# A body over the size limit is refused with 413 before its fields are read.
CONFIG = """\
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "414", "415",
                     "422", "428", "429", "5xx"]
"""
DEEP = b"[" * 100_000 + b"]" * 100_000  # 200 KB, under the body limit


def schemathesis(server: Gunicorn, tmp_path: Path, checks: list[str], key: str | None) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    # From a file: read from its URL, schemathesis would leave /openapi.json itself out.
    document = tmp_path / "openapi.json"
    document.write_bytes(requests.get(f"{server.url}/openapi.json", timeout=5).content)
    command = [
        str(VENV_BIN / "schemathesis"), "--config-file", str(config), "run", str(document),
        "--url", server.url, "--checks", ",".join(checks),
        "--phases", "examples,coverage,fuzzing", "--max-examples", "250",
        "--generation-database", "none", "--request-timeout", "20", "--no-color",
    ]  # fmt: skip
    if key is not None:
        command += ["--header", f"Authorization: Bearer {key}"]
    if os.environ.get("SCHEMATHESIS_SEED"):
        command += ["--seed", os.environ["SCHEMATHESIS_SEED"]]
    # A guard against a hang, not a measure: a run takes 1-3 min on a quiet machine, and
    # several times that beside a second run of the suite.
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout + run.stderr
    operations = sum(len(item) for item in json.loads(document.read_bytes())["paths"].values())
    assert operations == 22  # the playground's too, /v1's six, and the Messages API's two
    assert f"Tested: {operations}\n" in run.stdout  # every operation, none skipped


def a_stage_to_find(server: Gunicorn, key: str | None) -> None:
    """The stage of the document's examples (``summary-1``), done, so that they find one."""
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    body = {"stage_id": "summary-1", "model_name": "fake", "user_prompt": "Name three colours."}
    answer = requests.post(f"{server.url}/chat", json=body, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("keys", [True, False], ids=["with-keys", "open"])
def test_schemathesis_finds_nothing(fake: FakeUpstream, tmp_path: Path, keys: bool) -> None:
    env = {"STAGESERVER_UPSTREAM_URL": fake.url}
    key = KEY if keys else None
    checks = CHECKS
    if keys:
        env["STAGESERVER_API_KEYS"] = json.dumps({"schemathesis": {"key": KEY}})
        checks = [*CHECKS, "ignored_auth"]  # without the key: 401
    # gunicorn_server fails the test if its log has a traceback.
    with gunicorn_server(env) as server:
        a_stage_to_find(server, key)
        schemathesis(server, tmp_path, checks, key)
        # What no generator sends: a body nested 100,000 deep.
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        deep = requests.post(f"{server.url}/chat", data=DEEP, headers=headers, timeout=10)
        assert deep.status_code == 400
        assert deep.json() == {"error": "request body nests deeper than 64 levels",
                               "field": "body"}  # fmt: skip
