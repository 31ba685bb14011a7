"""Checks of weight files before anything loads them.

`check_safetensors` validates a safetensors file's structure, so that a hostile or
truncated file is refused with a clear reason rather than handed to a loader; it reads
at most 8 bytes plus the header, never the tensor data. `unsafe_format` sniffs the first
bytes of any file for serialisations that run code when loaded (pickle, torch.save's
zip archives, numpy arrays).
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any, Optional

HEADER_PREFIX_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024  # what the safetensors library itself accepts
# Bits per element of each safetensors dtype (F4 and F6 pack several values per byte).
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
              "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6,
              "F6_E3M2": 6}
SNIFF_BYTES = 8


class _RepeatedKey(ValueError):
    pass


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _label(name: str) -> str:
    return f"tensor {name[:40]!r}"


def sniff(head: bytes) -> Optional[str]:
    """What code-executing format these first bytes of a file show, else None."""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
        return "a zip archive (the torch.save format, which holds a pickle)"
    if head.startswith(b"\x93NUMPY"):
        return "a numpy array file (which may hold pickles)"
    return None


def unsafe_format(path: str | Path) -> Optional[str]:
    """`sniff` of a file's first bytes: what it really is when that is unsafe, else None."""
    with open(path, "rb") as fh:
        return sniff(fh.read(SNIFF_BYTES))


def _nbytes(shape: list[int], dtype: str, limit: int) -> Optional[int]:
    """Bytes of a tensor; None when it is not a whole number of bytes or exceeds limit.

    Stops multiplying as soon as the count passes the limit, so a shape of a million
    huge dimensions costs nothing."""
    if any(d == 0 for d in shape):
        return 0
    bits = DTYPE_BITS[dtype]
    count = 1
    for d in shape:
        count *= d
        if count * bits > 8 * limit:
            return None
    total = count * bits
    return total // 8 if total % 8 == 0 else None


def check_safetensors(path: str | Path) -> int:
    """Return the number of tensors; raise ValueError naming the problem."""
    raw, data_len = _read_header(path)
    header = _parse_header(raw)
    _check_metadata(header.pop("__metadata__", None))
    spans = sorted(_tensor_span(name, meta, data_len) for name, meta in header.items())
    _check_tiling(spans, data_len)
    return len(spans)


def _read_header(path: str | Path) -> tuple[bytes, int]:
    """The header's bytes and the length of the data section after it, read from one
    open file: the 8-byte length prefix, then a header bounded by the file's size and
    MAX_HEADER_BYTES."""
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())  # the size of the file being read, not of a path
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        size = st.st_size
        prefix = fh.read(HEADER_PREFIX_BYTES)
        if len(prefix) < HEADER_PREFIX_BYTES:
            raise ValueError(f"file too short for a safetensors header ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - HEADER_PREFIX_BYTES:
            what = sniff(prefix)
            if what:
                raise ValueError(f"not a safetensors file: it is {what}")
            raise ValueError(f"header length {header_len} exceeds the file "
                             f"({size} bytes; truncated or not safetensors)")
        if header_len > MAX_HEADER_BYTES:
            raise ValueError(f"header length {header_len} exceeds the "
                             f"{MAX_HEADER_BYTES // (1024 * 1024)} MiB limit")
        raw = fh.read(header_len)
    if len(raw) != header_len:
        raise ValueError("file shrank while it was read")
    return raw, size - HEADER_PREFIX_BYTES - header_len


def _parse_header(raw: bytes) -> dict[str, Any]:
    """The header: one UTF-8 JSON object without repeated keys."""
    if not raw.lstrip(b" \t\r\n").startswith(b"{"):
        raise ValueError("header is not valid JSON: it must be a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_object_without_repeats)
    except _RepeatedKey as exc:
        raise ValueError(f"header repeats the key {str(exc)[:40]!r}") from None
    except UnicodeDecodeError:
        raise ValueError("header is not valid JSON: not UTF-8") from None
    except RecursionError:
        raise ValueError("header is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"header is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not valid JSON: it must be a JSON object")
    return header


def _check_metadata(metadata: Any) -> None:
    """The optional `__metadata__` entry maps strings to strings."""
    if metadata is not None and not (
            isinstance(metadata, dict)
            and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError("__metadata__ must map strings to strings")


def _tensor_span(name: str, meta: Any, data_len: int) -> tuple[int, int, str]:
    """(begin, end, name) of one tensor's bytes in the data section, after checking its
    dtype, shape and offsets, and that its byte size matches dtype x shape."""
    if not isinstance(meta, dict):
        raise ValueError(f"{_label(name)}: entry is not a JSON object")
    offsets, dtype, shape = meta.get("data_offsets"), meta.get("dtype"), meta.get("shape")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise ValueError(f"{_label(name)}: unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise ValueError(f"{_label(name)}: shape must be a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_uint(o) for o in offsets) or offsets[0] > offsets[1]):
        raise ValueError(f"{_label(name)}: data_offsets must be [begin, end] with "
                         "0 <= begin <= end")
    begin, end = offsets
    if end > data_len:
        raise ValueError(f"{_label(name)}: data offsets outside the file (ends at byte "
                         f"{end} of a {data_len}-byte data section; truncated?)")
    nbytes = _nbytes(shape, dtype, data_len)
    if nbytes != end - begin:
        raise ValueError(f"{_label(name)}: size does not match dtype x shape "
                         f"({end - begin} bytes for {dtype} {shape[:8]})")
    return begin, end, name


def _check_tiling(spans: list[tuple[int, int, str]], data_len: int) -> None:
    """The tensors' sorted spans tile the data section exactly: no overlap, no gap,
    nothing after the last tensor."""
    covered, previous = 0, None
    for begin, end, name in spans:
        if begin < covered:
            raise ValueError(f"tensor byte ranges overlap ({_label(previous)} and "
                             f"{_label(name)})")
        if begin > covered:
            raise ValueError(f"gap of {begin - covered} bytes in the data section before "
                             f"{_label(name)}")
        covered, previous = end, name
    if covered != data_len:
        raise ValueError(f"{data_len - covered} bytes after the last tensor belong to no "
                         "tensor")
