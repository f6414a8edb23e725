"""The stage log's entries in Redis (stageserver/store/entries.py): what one write puts in
an entry, and the text rebuilt from a checkpoint and the entries after it."""

from __future__ import annotations

from typing import Any

import redis

from stageserver.store import entries
from testing.servers import RedisServer


def _entry(epoch: int, events: list[tuple[int, bytes]], text: str, chunks: int) -> Any:
    flat = entries.fields(events, terminal=False, text=text, chunks=chunks)
    values = {str(k).encode(): str(v).encode() if not isinstance(v, bytes) else v
              for k, v in zip(flat[::2], flat[1::2], strict=True)}  # fmt: skip
    return entries.entry_id(epoch, events[-1][0] + 1).encode(), values


def test_an_entry_holds_its_events_by_seq_and_says_which_is_terminal() -> None:
    flat = entries.fields([(7, b"a"), (8, b"b")], terminal=True, text="hi", chunks=3)
    assert flat == ["7", b"a", "8", b"b", "t", "1", "x", "hi", "c", "3"]
    values = {b"7": b"a", b"8": b"b", b"t": b"1", b"x": b"hi", b"c": b"3"}
    assert entries.events_of(values) == ([(7, b"a"), (8, b"b")], True)
    assert entries.events_of({b"m": b"1"}) == ([], False)  # a marker
    assert entries.held_by(b"3-9") == 9


def test_the_text_is_the_checkpoint_and_what_later_entries_added() -> None:
    newest_first = [
        _entry(2, [(5, b"e5")], " world", 4),
        _entry(2, [(4, b"e4")], ",", 3),
        _entry(1, [(2, b"e2"), (3, b"e3")], "hello", 2),  # in the checkpoint
    ]
    assert entries.durable_text(b"4:2:hello", newest_first) == ("hello, world", 4, True)
    # Without a checkpoint, every entry counts; the first has been read: not "reached".
    assert entries.durable_text(None, newest_first[:2]) == (", world", 4, False)
    # Entries with no text leave the checkpoint's chunks.
    assert entries.durable_text(b"6:4:hello, world", []) == ("hello, world", 4, False)


def test_a_long_log_is_read_back_to_its_checkpoint_in_pages(redis_server: RedisServer) -> None:
    client: Any = redis.Redis.from_url(redis_server.url)
    try:
        client.xadd("log", {"m": 1}, id="1-0")
        words = [f"w{n} " for n in range(1000)]
        for n, word in enumerate(words):
            flat = entries.fields([(n, b"e")], terminal=False, text=word, chunks=n + 1)
            values = dict(zip(flat[::2], flat[1::2], strict=True))
            client.xadd("log", values, id=entries.entry_id(1, n + 1))
        assert entries.read_durable_text(client, "text", "log") == ("".join(words), 1000)
        client.set("text", entries.checkpoint(300, 300, "".join(words[:300])))
        assert entries.read_durable_text(client, "text", "log") == ("".join(words), 1000)
    finally:
        client.close()
