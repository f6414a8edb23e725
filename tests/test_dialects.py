"""The dialects a stage manager is given (``stages/dialect.py`` ``Dialects``,
``stageserver/dialects.py``): it makes again, from a stage's record, a dialect of each
one it holds, and of no other, whatever this process imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from stageserver.anthropic_api.messages import MessagesDialect
from stageserver.dialects import DIALECTS
from stageserver.openai_api.chat import ChatCompletionsDialect
from stageserver.openai_api.responses import ResponsesDialect
from stageserver.stages.dialect import Dialect, Dialects
from stageserver.stages.events import SeedDialect

#: One dialect of each kind stageserver speaks, as a stage would start with it.
STARTED: list[Dialect] = [
    SeedDialect("s1"),
    ChatCompletionsDialect("chatcmpl-1", "m", include_usage=True, created=1700000000),
    ResponsesDialect(
        "resp_1",
        "m",
        {"instructions": "be brief"},
        replayable=True,
        created_at=1700000000,
        message_params=("input[0]",),
    ),
    MessagesDialect(
        "msg_1",
        "m",
        input_tokens=12,
        stop_sequences=("END",),
        params={"messages.0": "x"},
        omit_thinking=True,
    ),
]


def test_every_dialect_stageserver_speaks_is_in_the_set_app_gives_the_manager() -> None:
    assert sorted(DIALECTS.names()) == sorted(d.name for d in STARTED)


@pytest.mark.parametrize("started", STARTED, ids=lambda d: d.name)
def test_a_dialect_made_again_from_its_record_is_the_same_dialect(started: Dialect) -> None:
    record = json.loads(json.dumps(started.record()))  # as the store holds it
    again = DIALECTS.of(record)
    assert type(again) is type(started)
    assert again.record() == started.record()


def test_a_manager_knows_the_dialects_it_was_given_not_those_its_process_imported() -> None:
    # This process has imported every dialect's module; a set without one still lacks it.
    seed_only = Dialects([SeedDialect])
    assert seed_only.of(SeedDialect("s1").record()).name == "seed"
    with pytest.raises(LookupError, match="no dialect 'chat.completions'.*StageManager"):
        seed_only.of(STARTED[1].record())


def test_two_dialects_of_one_name_are_refused() -> None:
    with pytest.raises(ValueError, match="two dialects are named 'seed'"):
        Dialects([SeedDialect, SeedDialect])


# A fresh interpreter that imports the stage manager and the set of dialects, as
# StageServer.init_app does, and neither Flask nor the web layer nor any dialect's module
# by itself: the worker that takes a stage over may never have served its API.
_FRESH = textwrap.dedent(
    """
    import json, sys
    from stageserver.config import StageSettings, apply_defaults, upstream_configs
    from stageserver.dialects import DIALECTS
    from stageserver.manager import StageManager
    from stageserver.upstream.clients import UpstreamRegistry

    config = {"STAGESERVER_UPSTREAM_URL": "http://127.0.0.1:9/v1"}
    apply_defaults(config, {})
    manager = StageManager(
        StageSettings.from_config(config),
        UpstreamRegistry(upstream_configs(config)),
        dialects=DIALECTS,
    )
    try:
        made = [manager.dialects.of(record).record() for record in json.loads(sys.argv[1])]
    finally:
        manager.close()
    web = sorted(m for m in sys.modules if m == "flask" or m.startswith("stageserver.web"))
    print(json.dumps({"made": made, "web": web}))
    """
)


@pytest.mark.processes
def test_a_manager_in_a_fresh_interpreter_makes_every_dialect_again_without_the_web_layer() -> None:
    records = [d.record() for d in STARTED]
    child = subprocess.run(
        [sys.executable, "-c", _FRESH, json.dumps(records)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout)
    assert result == {"made": json.loads(json.dumps(records)), "web": []}
