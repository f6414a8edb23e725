"""A stage's answer so far, as a value: no greenlet, no upstream."""

from __future__ import annotations

from stageserver.stages.answer import Answer
from stageserver.stages.chunk_read import ChunkRead

REPORTED = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


def test_an_answer_is_its_chunks_text_finish_and_report() -> None:
    answer = Answer()
    for read in (
        ChunkRead("Hel", delta={"content": "Hel"}),
        ChunkRead("lo", delta={"content": "lo"}),
        ChunkRead(finish_reason="stop", delta={}),
        ChunkRead(usage=REPORTED),
    ):
        answer.take(read)
    assert (answer.text, answer.content_chunks, answer.chunk_count) == ("Hello", 2, 4)
    assert (answer.finish_reason, answer.usage, answer.continuable) == ("stop", REPORTED, True)
    assert answer.total_usage(prompt_tokens=100) == REPORTED  # the report, not an estimate


def test_without_a_report_the_usage_is_estimated_from_the_prompt_and_the_chunks() -> None:
    answer = Answer()
    answer.take(ChunkRead("a"))
    answer.take(ChunkRead("b"))
    assert answer.total_usage(prompt_tokens=7) == {
        "prompt_tokens": 7,
        "completion_tokens": 2,
        "total_tokens": 9,
        "estimated": True,
    }


def test_a_continued_answer_sums_its_segments_each_prompt_holding_what_came_before() -> None:
    answer = Answer()
    for text in ("a", "b", "c"):
        answer.take(ChunkRead(text))
    answer.next_segment(prompt_tokens=10)  # cut after three chunks, no report
    answer.take(ChunkRead("d"))
    answer.take(ChunkRead(usage={"prompt_tokens": 14, "completion_tokens": 1}))
    assert answer.text == "abcd"
    # 10 + 3 estimated, then the continuation's own report (its total derived).
    assert answer.total_usage(prompt_tokens=10) == {
        "prompt_tokens": 24,
        "completion_tokens": 4,
        "total_tokens": 28,
        "estimated": True,
    }


def test_an_answer_taken_over_starts_from_what_its_log_holds() -> None:
    answer = Answer("Hello, wor", content_chunks=4)
    answer.take(ChunkRead("ld"))
    assert (answer.text, answer.content_chunks, answer.chunk_count) == ("Hello, world", 5, 5)
    # The segment counts what the earlier worker delivered.
    assert answer.total_usage(prompt_tokens=3)["completion_tokens"] == 5


def test_tool_calls_or_reasoning_make_an_answer_one_that_is_not_continued() -> None:
    answer = Answer()
    answer.take(ChunkRead(reasoning="hm", continuable=False))
    answer.take(ChunkRead("text"))
    assert answer.continuable is False


def test_a_settled_answer_keeps_its_text_in_one_piece() -> None:
    answer = Answer()
    for text in ("a", "b"):
        answer.take(ChunkRead(text))
    answer.settle()
    assert answer.text_parts == ["ab"]
