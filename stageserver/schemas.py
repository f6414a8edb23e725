"""What a request may contain, and the non-streaming answer's shape (the seed's contract)."""

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
    field_validator,
)

STAGE_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


class ChatRequest(BaseModel):
    """``POST /chat``. Limits that depend on configuration come in the validation context:
    ``max_tokens_limit`` and ``max_prompt_chars``."""

    # The seed's clients may send fields of their own; they are ignored, as FastAPI did.
    model_config = ConfigDict(extra="ignore")

    stage_id: Annotated[StrictStr, Field(pattern=STAGE_ID_PATTERN)]
    model_name: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    user_prompt: StrictStr
    system_prompt: StrictStr = ""
    stream: StrictBool = False
    # The seed takes lists and uses their first element (``_first``); a number works too.
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | StrictInt | None = None
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
        limit = int((info.context or {}).get("max_prompt_chars", 100_000))
        if len(value) > limit:
            raise ValueError(f"must be at most {limit} characters (got {len(value)})")
        return value

    @field_validator("max_tokens", "temperature", mode="before")
    @classmethod
    def _first(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("must not be an empty list")
            return value[0]
        return value

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens_range(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return None
        limit = int((info.context or {}).get("max_tokens_limit", 4096))
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
            message = "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -"
        errors.append({"field": field, "message": message})
    # A union field reports once per alternative; keep the first message per field.
    unique: dict[str, dict[str, str]] = {}
    for error in errors:
        unique.setdefault(error["field"], error)
    return list(unique.values())
