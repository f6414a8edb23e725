"""Every JSON body stageserver reads or writes, as the pydantic models it validates with.

``ChatRequest`` is what ``POST /chat`` accepts, ``TextStageOutput`` the seed's answer when
not streaming; the rest are the answers and event data the server sends. The OpenAPI
document (``openapi.py``) is generated from these models, so it says what the server
does: the views build their answers from them, and where a body is built elsewhere from a
dict (``Stage.summary``, the ``/readyz`` reports), the tests validate every one the server
sends against its model.

A response body that leaves a field out, rather than sending ``null``, is a ``_Sparse``
model: its optional fields are absent from the JSON (``body()``) and from the schema's
``required``, and never ``null`` in either.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from .settings import SETTINGS

STAGE_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
STAGE_ID_RULE = "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -"
# The limits validation takes from its context when the caller gives none: the settings'.
DEFAULT_MAX_TOKENS_LIMIT: int = SETTINGS["STAGESERVER_MAX_TOKENS_LIMIT"][0]
DEFAULT_MAX_PROMPT_CHARS: int = SETTINGS["STAGESERVER_MAX_PROMPT_CHARS"][0]


def number_or_list(item: dict[str, Any]) -> dict[str, Any]:
    """The schema of a field the seed took as a list, of which the first element is used."""
    first = {"type": "array", "prefixItems": [item], "minItems": 1}
    return {"anyOf": [item, first, {"type": "null"}]}


def max_tokens_schema(limit: int) -> dict[str, Any]:
    return number_or_list({"type": "integer", "minimum": 1, "maximum": limit})


TEMPERATURE_SCHEMA = number_or_list({"type": "number", "minimum": 0, "maximum": 2})


class ChatRequest(BaseModel):
    """The stage to run. Unknown fields are ignored. `max_tokens` and the prompts' length
    are bounded by the server's settings; validation gets them in its context
    (``max_tokens_limit``, ``max_prompt_chars``), the document from ``openapi.py``."""

    # The seed's clients may send fields of their own; they are ignored, as FastAPI did.
    model_config = ConfigDict(extra="ignore")

    stage_id: Annotated[StrictStr, Field(pattern=STAGE_ID_PATTERN)]
    model_name: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    user_prompt: StrictStr
    system_prompt: StrictStr = ""
    stream: StrictBool = False
    # The seed takes lists and uses their first element (``_first``); a number works too.
    # Their schemas say so (the before-validator is invisible to pydantic's schema); the
    # document puts the app's own limit in ``max_tokens`` (``openapi.py``).
    max_tokens: Annotated[
        StrictInt | None, WithJsonSchema(max_tokens_schema(DEFAULT_MAX_TOKENS_LIMIT))
    ] = None
    temperature: Annotated[StrictFloat | StrictInt | None, WithJsonSchema(TEMPERATURE_SCHEMA)] = (
        None
    )
    upstream: Annotated[StrictStr, Field(min_length=1, max_length=128)] | None = None
    base_url: StrictStr | None = None
    resumable: StrictBool | None = None

    @field_validator("stage_id", mode="before")
    @classmethod
    def _stage_id_hint(cls, value: Any) -> Any:
        if isinstance(value, str) and ("\n" in value or "\r" in value):
            raise ValueError("must not contain line breaks")
        return value

    @field_validator("user_prompt", "system_prompt")
    @classmethod
    def _prompt_size(cls, value: str, info: ValidationInfo) -> str:
        limit = int((info.context or {}).get("max_prompt_chars", DEFAULT_MAX_PROMPT_CHARS))
        if len(value) > limit:
            raise ValueError(f"must be at most {limit} characters (got {len(value)})")
        return value

    @field_validator("max_tokens", "temperature", mode="before")
    @classmethod
    def _first(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("must not be an empty list")
            if value[0] is None:  # the seed's List[float] refused it too
                raise ValueError("must not be a list that starts with null")
            value = value[0]
        if isinstance(value, float) and value.is_integer() and info.field_name == "max_tokens":
            return int(value)  # JSON Schema's integer: 64.0 is one
        return value

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_range(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return None
        limit = int((info.context or {}).get("max_tokens_limit", DEFAULT_MAX_TOKENS_LIMIT))
        if not 1 <= value <= limit:
            raise ValueError(f"must be from 1 to {limit} (got {value})")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature_range(cls, value: float | None) -> float | None:
        if value is None:
            return None
        if not 0 <= value <= 2:
            raise ValueError(f"must be from 0 to 2 (got {value})")
        return float(value)


class TextStageOutput(BaseModel):
    """The seed's answer when not streaming: every field always there, ``null`` or not."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    stage_id: str
    type: Literal["text", "error"]
    text: str | None = None
    error: str | None = None


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """One entry per bad field, named the way the caller spelled it."""
    errors = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = [str(part) for part in err["loc"]]
        field = loc[0] if loc else "body"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "string_pattern_mismatch" and field == "stage_id":
            message = STAGE_ID_RULE
        errors.append({"field": field, "message": message})
    # A union field reports once per alternative; keep the first message per field.
    unique: dict[str, dict[str, str]] = {}
    for error in errors:
        unique.setdefault(error["field"], error)
    return list(unique.values())


# -- what the server sends ------------------------------------------------------------------


def _absent_not_null(schema: dict[str, Any]) -> None:
    """A ``_Sparse`` model's schema: an optional field is absent, never ``null``."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        if name in required:
            continue
        prop.pop("default", None)
        kinds = [kind for kind in prop.pop("anyOf", []) if kind != {"type": "null"}]
        if len(kinds) == 1:
            prop.update(kinds[0])
        elif kinds:
            prop["anyOf"] = kinds


class _Sparse(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_absent_not_null)

    def body(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class FieldError(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str
    message: str


class ErrorBody(_Sparse):
    """Every refusal (``web/errors.py``): what is wrong, and the field it is about."""

    error: str = Field(description="What is wrong, in words a caller can act on.")
    field: str | None = Field(
        None, description="The request field, header or body the error is about."
    )
    fields: list[FieldError] | None = Field(None, description="422: one entry per bad field.")
    reason: Literal["overload", "shutting_down"] | None = Field(
        None, description="503 from /chat: why no stage was started."
    )
    limit: int | str | None = Field(
        None,
        description="429: the principal's limit reached (`max_streams`, "
        "`requests_per_minute`, `tokens_per_minute`); 503 overload: the worker's limit.",
    )
    principal: str | None = Field(None, description="429: whose limit it is.")


class Usage(_Sparse):
    """A finished stage's token usage: the upstream's (any further fields it sent kept),
    else an estimate that says so."""

    model_config = ConfigDict(extra="allow")

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: Literal[True] | None = Field(
        None, description="Present when the upstream sent no usage and this is estimated."
    )


class Attempt(BaseModel):
    """One attempt at one replica of an upstream, before the stage's first chunk."""

    model_config = ConfigDict(extra="forbid")

    upstream: str
    replica: str = Field(description="The replica's URL, without credentials.")
    outcome: str = Field(
        description="`ok` (it served the first chunk), else how it failed: `refused`, "
        "`connect_timeout`, `reset`, `http_500`, `http_429`, `first_token_timeout`, "
        "`protocol_error`, `error_object`, `cancelled`."
    )
    ms: float = Field(description="Milliseconds from its start to its first chunk or end.")


class Continuation(BaseModel):
    """A continuation of the stage's answer after a failure, or one that could not be made
    (``upstream/continuation.py``)."""

    model_config = ConfigDict(extra="forbid")

    after: int = Field(description="The log's last event before it.")
    reason: Literal["upstream_failed", "owner_lost", "drain"]
    mode: str = Field(description="`flag`, `trailing`, `prefix`, `raw`; `none` when refused.")
    outcome: Literal["ok", "failed", "length", "refused"] = Field(
        description="`ok`: its first chunk came; `failed`: it did not, and the stage ended "
        "with an error; `length`: no token was left, the stage ended at its limit; "
        "`refused`: it could not be asked for (`error` says why)."
    )
    model: str = Field(description="The model it was asked of.")
    upstream: str
    from_replica: str = Field(description="The replica whose answer was cut.")
    to_replica: str = Field(description="The replica that continued it.")
    from_worker: str = Field(description="After a takeover: the worker (host:pid) it left.")
    to_worker: str = Field(description="After a takeover: the worker that took it.")
    cause: str = Field(description="What cut the answer short.")
    error: str = Field(description="Why it failed, or was refused.")


class StageStatus(BaseModel):
    """``GET /stages/<id>``: ``Stage.summary()``, every field always present but ``gap``."""

    model_config = ConfigDict(extra="forbid")

    stage_id: str
    status: Literal["running", "done", "error", "cancelled"]
    upstream: str = Field(
        description="The upstream that served the stage (a fallback's name when a fallback "
        "did); the one the request resolved to while none has served it."
    )
    attempts: list[Attempt]
    continuations: list[Continuation] = Field(
        description="Each time its answer was continued after a failure (an upstream cut "
        "it, its worker died or drained), or could not be."
    )
    continuable: bool = Field(
        description="False once its answer has streamed tool calls or reasoning: no "
        "continuation extends such an answer, on this worker or one that takes it over."
    )
    gap: str | None = Field(
        default=None,
        description="Only when the shared store lost events of the stage that it could not "
        "get back: which, in words. A resume that needs them gets an `error` event.",
    )
    text: str = Field(description="The text so far, or final.")
    finish_reason: str | None
    usage: Usage | None = Field(description="Once the stage has ended; before, the upstream's.")
    error: str | None
    cancel_reason: str | None
    resumable: bool
    events: int = Field(description="How many events the stage has had.")
    created_at: float = Field(description="Unix time, in seconds.")
    first_token_seconds: float | None
    duration_seconds: float | None


class Cancelling(BaseModel):
    """``POST /stages/<id>/cancel``: accepted; the stage ends with ``cancel``."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    stage_id: str
    status: Literal["cancelling"] = "cancelling"


class UpstreamName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: str
    default: bool


class UpstreamList(BaseModel):
    """``GET /upstreams``: those the caller may use, the default first; never a URL or key."""

    model_config = ConfigDict(extra="forbid")

    upstreams: list[UpstreamName]


class Health(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["ok"]


class ReplicaCheck(_Sparse):
    ok: bool
    latency_ms: float | None = None
    error: str | None = None


class ContinuationCheck(_Sparse):
    """An upstream's continuation mode (``upstream/continuation.py``)."""

    mode: Literal["flag", "trailing", "prefix", "raw", "none"]
    source: Literal["given", "probed", "default"] = Field(
        description="Configured, confirmed by a probe, or by the upstream's kind."
    )
    detail: str = Field("", description="Why, in words (what the probe found).")


class UpstreamCheck(ReplicaCheck):
    """An upstream's check: its replica's; for a pool of several, ``ok`` when one answered."""

    replicas: dict[str, ReplicaCheck] | None = Field(
        None, description="A pool of several replicas: each one's check, by its URL."
    )
    continuation: ContinuationCheck | None = Field(
        None, description="How the upstream continues a partial answer, and who said so."
    )


class Readiness(_Sparse):
    """``GET /readyz``: each upstream's check; none while the worker shuts down."""

    status: Literal["ready", "not_ready", "shutting_down"]
    upstreams: dict[str, UpstreamCheck] | None = None
    error: str | None = Field(None, description="When no upstream is configured.")


# -- the data of each event of a stage (stages/events.py) -------------------------------------


class ChunkData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage_id: str
    chunk: dict[str, Any] = Field(
        description="The upstream's chat.completion.chunk, exactly as it sent it."
    )


class ContinuedData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage_id: str
    after: int = Field(description="The last event before the answer was cut short.")
    reason: Literal["upstream_failed", "owner_lost", "drain"]
    mode: Literal["flag", "trailing", "prefix", "raw"]
    model: str = Field(description="The model asked to go on.")


class DoneData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage_id: str
    usage: Usage


class ErrorData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage_id: str
    error: str = Field(description="What failed, in words a caller can act on.")


class CancelData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage_id: str
    reason: str
    usage: Usage
