"""The slot invariant: under Redis Cluster, every Lua script and every MULTI transaction
the store sends touches the keys of one hash slot, and the running index
(``ss:running``), a key of its own, never appears inside either.

Three ways, each able to fail on its own:

1. the key names (``redis.crc.key_slot``), for any principal name and stage id the
   server accepts, 64 and 128 characters included;
2. the scripts' sources: keys only through ``KEYS[1]``..``KEYS[4]``, never a literal key;
3. what a real redis-server sees (``MONITOR``) while two real apps on it, with a
   principal of 64 characters, run a stage of a 128-character id to its end, cancel
   another while it runs, give the first's status and resume it, and create a response
   twice with one ``Idempotency-Key``.
"""

from __future__ import annotations

import ast
import json
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from flask.testing import FlaskClient
from hypothesis import example, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from stageserver import create_app
from stageserver.manager import manager_of
from stageserver.principals import _NAME
from stageserver.schemas import STAGE_ID_PATTERN
from stageserver.store import scripts
from stageserver.store.keys import RUNNING_INDEX, idempotency_key, limit_keys, stage_keys
from testing.fake_upstream import FakeUpstream
from testing.servers import ROOT, RedisServer
from testing.sse import parse_events, terminal

# The server's own patterns: a wider alphabet there is a wider alphabet here.
NAMES = st.from_regex(_NAME, fullmatch=True)
STAGE_IDS = st.from_regex(STAGE_ID_PATTERN, fullmatch=True)
# An Idempotency-Key is any header value: visible ASCII, braces and slashes included.
IDEMPOTENCY_KEYS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)

LONGEST_NAME = ("Ab9._-" * 11)[:64]
LONGEST_ID = ("Zz0._:-" * 19)[:128]


def test_the_longest_examples_are_the_longest_allowed() -> None:
    assert _NAME.fullmatch(LONGEST_NAME) and len(LONGEST_NAME) == 64
    assert not _NAME.fullmatch(LONGEST_NAME + "a")
    assert re.fullmatch(STAGE_ID_PATTERN, LONGEST_ID) and len(LONGEST_ID) == 128
    assert not re.fullmatch(STAGE_ID_PATTERN, LONGEST_ID + "a")


# -- 1. the key names -----------------------------------------------------------------------


@settings(database=None, deadline=None)
@example(principal=LONGEST_NAME, stage_id=LONGEST_ID)
@example(principal="a", stage_id="b")
@given(principal=NAMES, stage_id=STAGE_IDS)
def test_a_stages_four_keys_share_one_slot(principal: str, stage_id: str) -> None:
    for key in (f"{principal}/{stage_id}", stage_id):  # a principal's stage, an anonymous one
        keys = stage_keys(key)
        assert len(set(keys)) == 4
        assert {key_slot(k.encode()) for k in keys} == {key_slot(keys[0].encode())}, keys
    assert RUNNING_INDEX not in stage_keys(f"{principal}/{stage_id}")


@settings(database=None, deadline=None)
@example(principal=LONGEST_NAME, key="k" * 300)
@example(principal=LONGEST_NAME, key="{x}/y}{")
@given(principal=NAMES, key=IDEMPOTENCY_KEYS)
def test_a_principals_limits_and_idempotency_keys_share_one_slot(principal: str, key: str) -> None:
    limits = limit_keys(principal)
    assert len(set(limits)) == 3
    slot = key_slot(limits[0].encode())
    assert {key_slot(k.encode()) for k in limits} == {slot}, limits
    idempotency = idempotency_key(f"{principal}/{key}")
    assert key_slot(idempotency.encode()) == slot, (idempotency, limits)


# -- 2. the scripts' sources ----------------------------------------------------------------


def test_every_script_names_its_keys_through_keys_1_to_4() -> None:
    assert scripts.ALL
    for script in scripts.ALL:
        uses = re.findall(r"\bKEYS\b(.{0,4})", script.source)
        assert uses, script.source
        assert all(re.match(r"\[[1-4]\]", use) for use in uses), (uses, script.source)
        assert "KEYS[5]" not in script.source


def test_no_script_holds_a_literal_key() -> None:
    for source in (script.source for script in scripts.ALL):
        for literal in ("'ss:", '"ss:', "[[ss:"):
            assert literal not in source, source
        assert RUNNING_INDEX not in source


# -- 3. what Redis sees ---------------------------------------------------------------------

RUNNING = RUNNING_INDEX.encode()
_LINE = re.compile(rb"\+(\d+\.\d+) \[(\d+) ([^\]]+)\] (.*)")
_ARGS = re.compile(rb'"(?:[^"\\]|\\.)*"(?: "(?:[^"\\]|\\.)*")*')
_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|.)")
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}


@dataclass(frozen=True)
class Seen:
    """One command as MONITOR showed it: its client (``lua`` for a script's) and args."""

    client: str
    args: tuple[bytes, ...]
    line: bytes

    @property
    def name(self) -> bytes:
        return self.args[0].upper()

    def __str__(self) -> str:
        text = self.line.decode(errors="replace")
        return text if len(text) <= 2000 else text[:2000] + "…"


def _unescape(raw: bytes) -> bytes:
    def one(match: re.Match[bytes]) -> bytes:
        escaped = match[1]
        if len(escaped) == 3 and escaped[:1] == b"x":
            return bytes([int(escaped[1:], 16)])
        return _ESCAPES.get(escaped, escaped)

    return _ESCAPE.sub(one, raw)


def parse_monitor(lines: Sequence[bytes]) -> list[Seen]:
    """Every command of MONITOR's lines; a line that does not parse fails the test."""
    seen = []
    for line in lines:
        if line == b"+OK":
            continue
        match = _LINE.fullmatch(line)
        assert match and _ARGS.fullmatch(match[4]), f"not a MONITOR line: {line!r}"
        args = tuple(_unescape(arg) for arg in _ARG.findall(match[4]))
        seen.append(Seen(match[3].decode(), args, line))
    return seen


def _script_slot(command: Seen, problems: list[str]) -> int | None:
    numkeys = int(command.args[2])
    keys = command.args[3 : 3 + numkeys]
    if numkeys < 1:
        problems.append(f"a script with no key: {command}")
    if RUNNING in keys:
        problems.append(f"the running index among a script's keys: {command}")
    if len({key_slot(key) for key in keys}) > 1:
        problems.append(f"a script's keys in more than one slot: {command}")
    return key_slot(keys[0]) if keys else None


def _check_transaction(block: list[Seen], problems: list[str]) -> None:
    keys = [arg for command in block for arg in command.args[1:] if arg.startswith(b"ss:")]
    shown = "\n  ".join(str(command) for command in block)
    if RUNNING in keys:
        problems.append(f"the running index in a transaction:\n  {shown}")
    if len({key_slot(key) for key in keys}) > 1:
        problems.append(f"a transaction's keys in more than one slot:\n  {shown}")


def slot_problems(seen: Sequence[Seen]) -> tuple[list[str], Counter[str]]:
    """What breaks the slot invariant in the commands MONITOR showed, and counts of what
    was checked: ``scripts``, ``lua`` (commands scripts ran), ``transactions``,
    ``renewals`` (``RENEW`` scripts)."""
    problems: list[str] = []
    counts: Counter[str] = Counter()
    script: tuple[int | None, Seen] | None = None  # the script whose commands follow
    transactions: dict[str, list[Seen]] = {}  # per client, its open MULTI
    for command in seen:
        if command.client == "lua":
            counts["lua"] += 1
            if script is None:
                problems.append(f"a command of Lua after no script: {command}")
                continue
            slot, origin = script
            for arg in command.args[1:]:
                if arg == RUNNING:
                    problems.append(f"the running index in a script: {command} (of {origin})")
                elif arg.startswith(b"ss:") and key_slot(arg) != slot:
                    problems.append(f"a script left its slot: {command} (of {origin})")
            continue
        script = None
        if command.name in (b"EVAL", b"EVALSHA"):
            counts["scripts"] += 1
            counts["renewals"] += command.args[1] == scripts.RENEW.sha.encode()
            script = (_script_slot(command, problems), command)
        block = transactions.get(command.client)
        if block is not None:
            block.append(command)
            if command.name in (b"EXEC", b"DISCARD"):
                del transactions[command.client]
                counts["transactions"] += 1
                _check_transaction(block, problems)
        elif command.name == b"MULTI":
            transactions[command.client] = [command]
    for block in transactions.values():
        problems.append(f"a MULTI never executed: {block[0]}")
    return problems, counts


def test_the_check_finds_what_breaks_the_slot_invariant() -> None:
    """The check itself, on lines as Redis 7 writes them: a clean stream passes, and each
    way to break the invariant is caught."""
    a, b = b"ss:{alice/x}", b"ss:{bob/y}"
    assert key_slot(a) != key_slot(b)

    def line(client: str, *args: bytes) -> bytes:
        quoted = b" ".join(b'"' + arg.replace(b'"', b'\\"') + b'"' for arg in args)
        return b"+1733490000.123456 [0 " + client.encode() + b"] " + quoted

    c1, c2 = "127.0.0.1:50001", "127.0.0.1:50002"
    sha = scripts.RENEW.sha.encode()
    clean = [
        b"+OK",
        line(c1, b"EVALSHA", sha, b"4", a, a + b":log", a + b":text", a + b":live", b"t"),
        line("lua", b"GET", a + b":live"),
        line("lua", b"PEXPIRE", a + b":live", b"300"),
        line(c1, b"ZADD", RUNNING, b"1", b"alice/x"),
        line(c2, b"MULTI"),
        line(c1, b"GET", b + b":live"),  # another client, between MULTI and EXEC
        line(c2, b"DEL", a, a + b":log"),
        line(c2, b"HSET", a, b"summary", b'{"a": "ss:\\x00"}'),
        line(c2, b"EXEC"),
    ]
    problems, counts = slot_problems(parse_monitor(clean))
    assert problems == []
    assert counts == Counter(scripts=1, lua=2, renewals=1, transactions=1)

    broken = [
        line(c1, b"EVALSHA", sha, b"2", a, b),
        line(c1, b"EVALSHA", sha, b"1", a),
        line("lua", b"GET", b + b":live"),
        line("lua", b"ZADD", RUNNING, b"1", b"alice/x"),
        line(c1, b"EVAL", b"return 1", b"0"),
        line(c2, b"MULTI"),
        line(c2, b"DEL", a),
        line(c2, b"ZADD", RUNNING, b"1", b"alice/x"),
        line(c2, b"EXEC"),
        line(c1, b"MULTI"),
    ]
    problems, _ = slot_problems(parse_monitor(broken))
    assert [problem.split(":")[0] for problem in problems] == [
        "a script's keys in more than one slot",
        "a script left its slot",
        "the running index in a script",
        "a script with no key",
        "the running index in a transaction",
        "a transaction's keys in more than one slot",
        "a MULTI never executed",
    ]


def transactions_in_the_store() -> list[str]:
    """Where the code that talks to Redis (store/, the only package that imports redis,
    and policy/, which reaches it through store/) opens a transaction: a ``pipeline()``
    not told ``transaction=False`` (redis-py's default is MULTI … EXEC), a ``multi()``, a
    ``transaction()``."""
    found = []
    for package in ("store", "policy"):
        for path in sorted((ROOT / "stageserver" / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                if node.func.attr == "pipeline":
                    flags = [k.value for k in node.keywords if k.arg == "transaction"]
                    flag = flags[0] if flags else (node.args[0] if node.args else None)
                    if isinstance(flag, ast.Constant) and flag.value is False:
                        continue
                elif node.func.attr not in ("multi", "transaction"):
                    continue
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


class Monitor:
    """A raw connection to redis-server in MONITOR mode; a thread keeps its lines."""

    def __init__(self, port: int) -> None:
        self._socket = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._socket.sendall(b"MONITOR\r\n")
        self._lines: list[bytes] = []
        self._lock = threading.Lock()
        self._ok = threading.Event()
        self._thread = threading.Thread(target=self._read, name="monitor", daemon=True)
        self._thread.start()
        assert self._ok.wait(5), "MONITOR did not answer"
        self._socket.settimeout(None)

    def _read(self) -> None:
        buffer = b""
        try:
            while data := self._socket.recv(1 << 16):
                *complete, buffer = (buffer + data).split(b"\r\n")
                with self._lock:
                    self._lines.extend(complete)
                if complete:
                    self._ok.set()
        except OSError:
            pass  # closed by close()

    def lines(self) -> list[bytes]:
        with self._lock:
            return list(self._lines)

    def wait_for(self, marker: bytes, timeout: float = 5) -> list[bytes]:
        """Every line up to one that holds ``marker``."""
        deadline = time.monotonic() + timeout
        while not any(marker in line for line in self.lines()):
            assert time.monotonic() < deadline, f"MONITOR never showed {marker!r}"
            time.sleep(0.02)
        return self.lines()

    def close(self) -> None:
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._socket.close()
        self._thread.join(5)


NAME = LONGEST_NAME
SECRET = "slot-key-0123456789"
AUTH = {"Authorization": f"Bearer {SECRET}"}
DONE_ID = LONGEST_ID[:-1] + "d"
CANCELLED_ID = LONGEST_ID[:-1] + "c"


def read_until(pieces: Iterator[bytes], marker: bytes) -> bytes:
    wire = b""
    while marker not in wire:
        wire += next(pieces)
    return wire


def wait_for_status(client: FlaskClient, stage_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        summary: dict[str, Any] = client.get(f"/stages/{stage_id}", headers=AUTH).get_json()
        if summary.get("status") == status:
            return summary
        assert time.monotonic() < deadline, summary
        time.sleep(0.05)


def run_traffic(here: FlaskClient, there: FlaskClient) -> str:
    """Stages on ``here`` (the worker that runs them), asked about on ``there`` (another
    worker of the same store): one to its end, one cancelled, a status, a resume, and a
    response created twice with one Idempotency-Key. Returns that key."""

    def chat(stage_id: str, model: str) -> dict[str, Any]:
        return {
            "stage_id": stage_id,
            "model_name": model,
            "user_prompt": "hi",
            "stream": True,
            "resumable": True,
        }

    # Runs ~8 s unless cancelled: it holds its lease and its stream slot meanwhile.
    running = here.post(
        "/chat", json=chat(CANCELLED_ID, "fake?chunks=400&interval=0.02"), headers=AUTH
    )
    assert running.status_code == 200
    pieces = running.iter_encoded()
    read_until(pieces, b"event: chat_completion_chunk")

    # ~1.2 s: the lease keeper (every 0.1 s) renews both stages' leases and slots.
    done = here.post("/chat", json=chat(DONE_ID, "fake?chunks=40&interval=0.03"), headers=AUTH)
    done_events = parse_events(done.get_data())
    assert [e["event"] for e in terminal(done_events)] == ["done"], done_events[-3:]

    cancel = there.post(f"/stages/{CANCELLED_ID}/cancel", headers=AUTH)
    assert cancel.status_code == 202, cancel.get_json()
    rest = b"".join(pieces)
    running.close()
    assert [e["event"] for e in terminal(parse_events(rest))] == ["cancel"]
    wait_for_status(there, CANCELLED_ID, "cancelled")

    ids = [e["id"] for e in done_events if "id" in e]
    assert len(ids) > 40
    for client in (here, there):
        assert wait_for_status(client, DONE_ID, "done")["text"] == "".join(
            f"tok{n} " for n in range(40)
        )
        resumed = client.get(
            f"/stages/{DONE_ID}/events", headers={**AUTH, "Last-Event-ID": ids[10]}
        )
        assert resumed.status_code == 200
        assert [e["id"] for e in parse_events(resumed.get_data()) if "id" in e] == ids[11:]

    key = f"slots-{uuid.uuid4().hex}"
    create = {"model": "fake?chunks=3", "input": "hi"}
    first = here.post("/v1/responses", json=create, headers={**AUTH, "Idempotency-Key": key})
    assert first.status_code == 200, first.get_json()
    again = there.post("/v1/responses", json=create, headers={**AUTH, "Idempotency-Key": key})
    assert again.status_code == 200, again.get_json()
    assert again.headers["X-Stage-Id"] == first.headers["X-Stage-Id"]
    return key


def test_every_script_and_transaction_redis_sees_keeps_to_one_slot(
    redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    monitor = Monitor(redis_server.port)
    probe = redis.Redis.from_url(redis_server.url)
    try:
        # What the check assumes of this redis-server: a script's commands follow it.
        probe.eval("return redis.call('EXISTS', KEYS[1])", 1, "ss:{probe}")
        config = {
            "STAGESERVER_UPSTREAM_URL": upstream.url,
            "STAGESERVER_STORE_URL": redis_server.url,
            "STAGESERVER_OWNER_LEASE_SECONDS": 0.3,
            "STAGESERVER_API_KEYS": json.dumps({NAME: {"key": SECRET, "max_streams": 5}}),
        }
        here, there = create_app(config), create_app(config)
        try:
            retried_key = run_traffic(here.test_client(), there.test_client())
        finally:
            for app in (here, there):
                manager_of(app.extensions).close()
        marker = f"end-of-traffic-{uuid.uuid4().hex}".encode()
        probe.echo(marker)
        lines = monitor.wait_for(marker)
    finally:
        probe.close()
        monitor.close()

    seen = parse_monitor(lines)
    first_eval = next(n for n, command in enumerate(seen) if command.name == b"EVAL")
    assert seen[first_eval + 1].client == "lua", [str(c) for c in seen[first_eval : first_eval + 2]]
    assert seen[first_eval + 1].args == (b"EXISTS", b"ss:{probe}")

    problems, counts = slot_problems(seen)
    assert problems == [], "\n".join(problems)

    # Not vacuous: the traffic was the one meant, and the check saw it.
    assert counts["scripts"] >= 1 and counts["lua"] >= 1, counts
    opened = transactions_in_the_store()
    if opened:  # the store opens transactions: then this traffic must show one
        assert counts["transactions"] >= 1, (opened, counts)
    assert counts["renewals"] >= 2, counts
    scripts_keys = [
        command.args[3 : 3 + int(command.args[2])] for command in seen if command.name == b"EVALSHA"
    ]
    for stage_id in (DONE_ID, CANCELLED_ID):
        keys = tuple(k.encode() for k in stage_keys(f"{NAME}/{stage_id}"))
        renewals = [
            command
            for command in seen
            if command.name == b"EVALSHA"
            and command.args[1] == scripts.RENEW.sha.encode()
            and command.args[3:7] == keys
        ]
        assert len(renewals) >= 2, stage_id
        assert keys in scripts_keys
    assert tuple(k.encode() for k in limit_keys(NAME)) in scripts_keys  # the admission
    idempotency = idempotency_key(f"{NAME}/{retried_key}").encode()
    assert any(c.name == b"SET" and c.args[1] == idempotency for c in seen)
    slot_renewals = [  # the stream slot's lease: a plain ZADD XX, outside any script
        c
        for c in seen
        if c.name == b"ZADD" and c.args[1:3] == (limit_keys(NAME).streams.encode(), b"XX")
    ]
    assert len(slot_renewals) >= 2
