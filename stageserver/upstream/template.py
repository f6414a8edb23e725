"""A model's chat template, rendered as the model's server would: the ``raw`` continuation.

An upstream that cannot continue a partial assistant message on its chat endpoint (the
embedded llama-cpp-python model closes the turn and starts a new answer) can still
continue it on ``/v1/completions``: render the conversation with the model's chat
template and the generation prompt, append the text delivered so far, and complete that
(``../shared/notes/continuation.md``, finding 3 and D1). This module is the rendering:

* :func:`gguf_metadata` reads a GGUF file's key-value section, where a llama.cpp model
  keeps its template (``tokenizer.chat_template``) and its vocabulary;
* :class:`ChatTemplate` renders a Jinja chat template the way Hugging Face transformers
  does, which is what llama-cpp-python, vLLM and llama-server's ``--jinja`` imitate.

Errors are ValueErrors: a file that is not GGUF, or truncated, raises ValueError itself;
a template that does not compile, refuses the messages (``raise_exception``) or fails
while rendering raises :class:`TemplateError`, a ValueError naming the template.

The BOS token. The server puts its own BOS before a prompt when the model's tokenizer
says so (``tokenizer.ggml.add_bos_token``). A template that writes ``{{ bos_token }}``
would then give two, so :meth:`ChatTemplate.render` strips a leading BOS the template
wrote, but only when the template uses ``bos_token`` at all: SmolLM2's BOS is
``<|im_start|>``, which its template writes as plain text at the start of every turn.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplate", "TemplateError", "gguf_metadata"]


# -- GGUF ---------------------------------------------------------------------------------

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # version 1 had 32-bit lengths; 2 and 3 share the key-value layout
#: The value types with a fixed size, as ``struct`` format characters (little-endian).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
_READ_BUFFER = 1 << 20  # the key-value section of a model is a few MB: large reads


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The key-value metadata of the GGUF file at ``path``, in file order.

    Scalars become ints, floats and bools; strings, strs; arrays, lists (of lists, for
    arrays of arrays). Arrays of numbers are unpacked in one read each, so a vocabulary's
    token types cost little; ``tokenizer.ggml.tokens`` (strings) maps a token id to its
    text. The tensors after the metadata are not read. A file that is not GGUF (or not
    version 2 or 3, little-endian), or that ends early, raises ValueError naming it.
    """
    with open(path, "rb", buffering=_READ_BUFFER) as file:
        reader = _Reader(file, path)
        magic = reader.take(4)
        if magic != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
        version = reader.scalar("I")
        if version not in _VERSIONS:
            raise ValueError(
                f"{path}: GGUF version {version} is not supported (only 2 and 3, little-endian)"
            )
        reader.scalar("Q")  # the tensor count: the tensors are not read
        count = reader.scalar("Q")
        metadata: dict[str, Any] = {}
        for index in range(count):
            reader.context = f"metadata entry {index}"
            key = reader.string("its key")
            reader.context = key
            metadata[key] = reader.value(reader.scalar("I"))
        return metadata


class _Reader:
    """Reads GGUF values off a buffered file, refusing any length beyond the file's end
    (so a corrupt length is an error, never a huge allocation)."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        self.file = file
        self.path = path
        self.left = os.fstat(file.fileno()).st_size
        self.context = "the header"  # what is being read, for errors

    def take(self, size: int) -> bytes:
        if size > self.left:
            self.fail(f"it ends within {self.context}")
        data = self.file.read(size)
        if len(data) != size:
            self.fail(f"it ends within {self.context}")
        self.left -= size
        return data

    def scalar(self, code: str) -> Any:
        return struct.unpack("<" + code, self.take(struct.calcsize(code)))[0]

    def string(self, what: str = "a string") -> str:
        data = self.take(self.scalar("Q"))
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.fail(f"{what} in {self.context} is not UTF-8 ({exc.reason})")

    def value(self, kind: int) -> Any:
        code = _SCALARS.get(kind)
        if code is not None:
            return self.scalar(code)
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            return self.array()
        self.fail(f"{self.context} has an unknown value type {kind}")

    def array(self) -> list[Any]:
        kind, count = self.scalar("I"), self.scalar("Q")
        code = _SCALARS.get(kind)
        if code is not None:  # one read and one unpack for the whole array
            data = self.take(count * struct.calcsize(code))
            return list(struct.unpack(f"<{count}{code}", data))
        if count * 8 > self.left:  # each string or array takes 8 bytes at least
            self.fail(f"it ends within {self.context}")
        if kind == _STRING:
            return [self.string() for _ in range(count)]
        return [self.value(kind) for _ in range(count)]

    def fail(self, reason: str) -> NoReturn:
        raise ValueError(f"{self.path} is not a valid GGUF file: {reason}")


# -- chat templates -----------------------------------------------------------------------


class TemplateError(ValueError):
    """A chat template that does not compile, refuses the messages, or fails to render."""


class ChatTemplate:
    """A Jinja chat template, rendered with the generation prompt as transformers does:
    ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with
    ``loopcontrols``, a ``tojson`` that keeps non-ASCII, ``raise_exception`` and
    ``strftime_now``; the variables ``messages``, ``add_generation_prompt``,
    ``bos_token`` and ``eos_token``.

    ``strip_bos`` says that the server adds its own BOS to a prompt, so a leading BOS the
    template wrote is dropped (module docstring). ``name`` names the template in errors.
    """

    def __init__(
        self,
        source: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        name: str = "the chat template",
        strip_bos: bool = True,
    ) -> None:
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = _environment()
        try:
            parsed = env.parse(source)
            self._template = env.from_string(parsed)
        except jinja2.TemplateSyntaxError as exc:
            message = f"{name} does not compile: {exc.message} (line {exc.lineno})"
            raise TemplateError(message) from None
        writes_bos = "bos_token" in jinja2.meta.find_undeclared_variables(parsed)
        self._strip_bos = strip_bos and writes_bos and bool(bos_token)

    @classmethod
    def from_gguf(cls, path: Path) -> ChatTemplate:
        """The template of a GGUF model (``tokenizer.chat_template``), with its BOS and EOS
        tokens' text, and ``strip_bos`` from ``tokenizer.ggml.add_bos_token`` (assumed
        true when absent, as for most models that write a BOS)."""
        metadata = gguf_metadata(path)
        source = metadata.get("tokenizer.chat_template")
        if not isinstance(source, str) or not source:
            raise TemplateError(
                f"{path} has no chat template (tokenizer.chat_template): give the model's "
                "template as a Jinja file instead"
            )
        tokens = metadata.get("tokenizer.ggml.tokens")
        vocabulary: list[Any] = tokens if isinstance(tokens, list) else []
        return cls(
            source,
            bos_token=_token(vocabulary, metadata.get("tokenizer.ggml.bos_token_id")),
            eos_token=_token(vocabulary, metadata.get("tokenizer.ggml.eos_token_id")),
            name=f"the chat template of {path}",
            strip_bos=metadata.get("tokenizer.ggml.add_bos_token") is not False,
        )

    @classmethod
    def from_file(cls, path: Path) -> ChatTemplate:
        """A template in a plain Jinja file (UTF-8), without BOS or EOS tokens."""
        return cls(Path(path).read_text(encoding="utf-8"), name=str(path))

    @property
    def stop(self) -> list[str]:
        """What ends the assistant's turn, for a completion's ``stop``: the EOS token."""
        return [self.eos_token] if self.eos_token else []

    def render(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt for ``messages`` with the generation prompt, without a leading BOS
        that the server would add again. TemplateError when the template fails."""
        try:
            prompt = self._template.render(
                messages=list(messages),
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as exc:  # the template's own raise_exception
            raise TemplateError(f"{self.name} refused the messages: {exc}") from None
        except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as exc:
            raise TemplateError(f"{self.name} failed to render: {exc}") from exc
        if self._strip_bos and prompt.startswith(self.bos_token):
            return prompt[len(self.bos_token) :]
        return prompt


class _GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` (it marks the assistant's
    tokens for training), rendered as its contents."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationTag],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Jinja's own ``tojson`` escapes ``<``, ``>``, ``&`` and ``'`` for HTML: not in a
    prompt."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _token(vocabulary: list[Any], token_id: Any) -> str:
    """The text of token ``token_id``, or "" when the model names none."""
    if isinstance(token_id, int) and 0 <= token_id < len(vocabulary):
        text = vocabulary[token_id]
        return text if isinstance(text, str) else ""
    return ""
