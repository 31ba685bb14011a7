"""Request validation: proto messages in, checked plain values out (or InvalidInput).

Every message names the field, so a client author can fix the call without reading
server logs. A message never echoes an invalid value back (it may hold anything: a
path, control characters); it says what a valid one looks like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from services.core.config import ServeLimits
from services.core.errors import InvalidInput, RequestTooLarge
from services.core.registry import (RESERVED_CHANNELS, reserved_channel, validate_name,
                                    validate_version)

MIN_TEMPERATURE = 1e-5
"""Temperatures in (0, MIN_TEMPERATURE) decode greedily: dividing logits by a smaller
number overflows float32 and sampling would have no valid distribution."""

NAME_RULE = "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"


@dataclass(frozen=True)
class UndecodableRequest:
    """Stands in for a request message the gRPC proxy could not parse (bytes that are
    not the message, a string field that is not UTF-8). Built by the request
    deserializer (services/serving/app.py) and refused by the ingress as
    INVALID_ARGUMENT instead of letting the parse error reach the client."""

    message_type: str
    size_bytes: int

    def ByteSize(self) -> int:  # noqa: N802 (the protobuf method name)
        return self.size_bytes


def check_decoded(request) -> None:
    if isinstance(request, UndecodableRequest):
        raise InvalidInput(f"request: not a valid {request.message_type} message "
                           "(malformed bytes, or a string field that is not UTF-8)")


def check_request_size(request, limits: ServeLimits) -> None:
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise RequestTooLarge(f"request: {size} bytes; the limit is "
                              f"{limits.max_request_bytes} bytes per message")


@dataclass(frozen=True)
class ClassifyCall:
    model: str
    texts: list[str]
    version: Optional[str]
    routing_key: Optional[str] = None


def check_name(name: str, field: str, what: str = "model") -> str:
    """A model or channel name, or InvalidInput naming `field` (never echoing it)."""
    try:
        return validate_name(name, what)
    except InvalidInput:
        if what == "channel" and name in RESERVED_CHANNELS:
            raise InvalidInput(f"{field}: {reserved_channel(name)}") from None
        raise InvalidInput(f"{field}: invalid {what} name: {NAME_RULE}") from None


def check_model_field(model: str, limits: ServeLimits) -> str:
    if not model:
        raise InvalidInput("model: required (a model name; ListModels shows them)")
    if len(model) > limits.max_model_name_chars:
        raise InvalidInput(f"model: longer than {limits.max_model_name_chars} characters")
    return check_name(model, "model")


def check_version_field(version: str, optional: bool = True) -> Optional[str]:
    """A request's version field: None when empty. `optional`: whether an empty one
    means the model's channel (inference) or not (Admin's Promote, Pin)."""
    if not version:
        return None
    try:
        return validate_version(version)
    except InvalidInput:
        hint = " (or leave it empty for the model's channel)" if optional else ""
        raise InvalidInput(f"version: invalid version: expected v1, v2, ...{hint}") from None


MAX_ROUTING_KEY_CHARS = 256


def check_routing_key(request) -> Optional[str]:
    """A request's routing_key (keeps a caller on one version during a canary): None
    when empty; at most MAX_ROUTING_KEY_CHARS characters."""
    key = request.routing_key
    if not key:
        return None
    if len(key) > MAX_ROUTING_KEY_CHARS:
        raise InvalidInput(f"routing_key: {len(key)} characters; the limit is "
                           f"{MAX_ROUTING_KEY_CHARS}")
    return key


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
    return ClassifyCall(model, texts, version, check_routing_key(request))


@dataclass(frozen=True)
class GenerateCall:
    model: str
    prompt: str
    version: Optional[str]
    params: dict
    """max_new_tokens, temperature, top_p, top_k, stop, seed, ignore_eos: plain values."""
    routing_key: Optional[str] = None


def _finite(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise InvalidInput(f"{field}: must be a finite number, got {value}")
    return value


def _f32(value: float) -> str:
    """A float field as the client wrote it: the shortest text of its float32 value
    (1.01, not 1.00999999; 1.0000001, not 1)."""
    import numpy

    return str(numpy.float32(value))


def validate_generate(request, limits: ServeLimits) -> GenerateCall:
    """Every generation parameter; the prompt's length in tokens is checked by the
    model deployment, which has the tokenizer."""
    model = check_model_field(request.model, limits)
    version = check_version_field(request.version)
    prompt = request.prompt
    if not prompt:
        raise InvalidInput("prompt: required (the text the model continues)")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidInput(f"prompt: {len(prompt)} characters; the limit is "
                           f"{limits.max_prompt_chars}")
    if "\x00" in prompt:
        raise InvalidInput("prompt: contains a NUL character")
    if request.HasField("max_new_tokens"):
        max_new = request.max_new_tokens
        if max_new < 1:
            raise InvalidInput(f"max_new_tokens: must be at least 1, got {max_new} (leave "
                               f"it unset for the default, {limits.default_max_new_tokens})")
        if max_new > limits.max_new_tokens:
            raise InvalidInput(f"max_new_tokens: {max_new}; the limit is "
                               f"{limits.max_new_tokens}")
    else:
        max_new = min(limits.default_max_new_tokens, limits.max_new_tokens)
    temperature = _finite(request.temperature, "temperature")
    if temperature < 0:
        raise InvalidInput(f"temperature: must be >= 0 (0 means greedy), got {_f32(temperature)}")
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0
    top_p = 1.0
    if request.HasField("top_p"):
        top_p = _finite(request.top_p, "top_p")
        if not 0.0 < top_p <= 1.0:
            raise InvalidInput(f"top_p: must be in (0, 1], got {_f32(top_p)}")
    if request.top_k < 0:
        raise InvalidInput(f"top_k: must be >= 0 (0 means off), got {request.top_k}")
    stop = list(request.stop)
    if len(stop) > limits.max_stop_sequences:
        raise InvalidInput(f"stop: {len(stop)} strings; the limit is "
                           f"{limits.max_stop_sequences}")
    for i, s in enumerate(stop):
        if not s:
            raise InvalidInput(f"stop[{i}]: empty string")
        if len(s) > limits.max_stop_chars:
            raise InvalidInput(f"stop[{i}]: {len(s)} characters; the limit is "
                               f"{limits.max_stop_chars}")
        if "\x00" in s:
            raise InvalidInput(f"stop[{i}]: contains a NUL character")
    params = {"max_new_tokens": max_new, "temperature": temperature, "top_p": top_p,
              "top_k": request.top_k, "stop": stop, "seed": request.seed,
              "ignore_eos": request.ignore_eos}
    return GenerateCall(model, prompt, version, params, check_routing_key(request))
