from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class StartCanaryRequest(_message.Message):
    __slots__ = ("model", "version", "percent", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    percent: float
    reason: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., percent: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class SetCanaryShareRequest(_message.Message):
    __slots__ = ("model", "percent", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    percent: float
    reason: str
    def __init__(self, model: _Optional[str] = ..., percent: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class EndCanaryRequest(_message.Message):
    __slots__ = ("model", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CanaryResponse(_message.Message):
    __slots__ = ("model", "candidate_version", "production_version", "percent", "previous_percent")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRODUCTION_VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_PERCENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    candidate_version: str
    production_version: str
    percent: float
    previous_percent: float
    def __init__(self, model: _Optional[str] = ..., candidate_version: _Optional[str] = ..., production_version: _Optional[str] = ..., percent: _Optional[float] = ..., previous_percent: _Optional[float] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("model", "version", "channel")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    channel: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., channel: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("model", "channel")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    channel: str
    def __init__(self, model: _Optional[str] = ..., channel: _Optional[str] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class AdminResponse(_message.Message):
    __slots__ = ("model", "channel", "version", "previous_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    channel: str
    version: str
    previous_version: str
    def __init__(self, model: _Optional[str] = ..., channel: _Optional[str] = ..., version: _Optional[str] = ..., previous_version: _Optional[str] = ...) -> None: ...
