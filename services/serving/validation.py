"""Request validation: proto messages in, checked plain values out (or InvalidInput).

Every message names the field, so a client author can fix the call without reading
server logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from services.config import ServeLimits
from services.errors import InvalidInput
from services.registry import validate_name, validate_version


@dataclass(frozen=True)
class ClassifyCall:
    model: str
    texts: list[str]
    version: Optional[str]


def check_model_field(model: str, limits: ServeLimits) -> str:
    if not model:
        raise InvalidInput("model: required (a model name; ListModels shows them)")
    if len(model) > limits.max_model_name_chars:
        raise InvalidInput(f"model: longer than {limits.max_model_name_chars} characters")
    try:
        return validate_name(model)
    except InvalidInput as exc:
        raise InvalidInput(f"model: {exc}") from None


def check_version_field(version: str) -> Optional[str]:
    if not version:
        return None
    try:
        return validate_version(version)
    except InvalidInput as exc:
        raise InvalidInput(f"version: {exc}") from None


def check_text(text: str, field: str, limits: ServeLimits) -> str:
    if not text or not text.strip():
        raise InvalidInput(f"{field}: empty text")
    if len(text) > limits.max_text_chars:
        raise InvalidInput(
            f"{field}: {len(text)} characters; the limit is {limits.max_text_chars}"
        )
    if "\x00" in text:
        raise InvalidInput(f"{field}: contains a NUL character")
    return text


def validate_classify(request, limits: ServeLimits) -> ClassifyCall:
    model = check_model_field(request.model, limits)
    version = check_version_field(request.version)
    texts = list(request.texts)
    if not texts:
        raise InvalidInput("texts: at least one text is required")
    if len(texts) > limits.max_texts_per_request:
        raise InvalidInput(
            f"texts: {len(texts)} texts; the limit is {limits.max_texts_per_request} per request"
        )
    for i, text in enumerate(texts):
        check_text(text, f"texts[{i}]", limits)
    return ClassifyCall(model, texts, version)
