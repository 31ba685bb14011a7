"""Structural checks of a safetensors file before anything loads it.

A hostile or truncated file must be refused with a clear reason rather than handed to a
loader: header length bounded by the file, a JSON header, every tensor's byte range
inside the data section, no overlaps, and sizes consistent with dtype x shape.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors(path: str | Path) -> int:
    """Return the number of tensors; raise ValueError naming the problem."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise ValueError("file too short for a safetensors header")
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > MAX_HEADER_BYTES or header_len > size - 8:
            raise ValueError(f"header length {header_len} exceeds the file")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    data_len = size - 8 - header_len
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise ValueError(f"tensor {name[:40]!r}: bad entry")
        offsets, dtype, shape = meta.get("data_offsets"), meta.get("dtype"), meta.get("shape")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets)
                or offsets[0] > offsets[1] or offsets[1] > data_len):
            raise ValueError(f"tensor {name[:40]!r}: data offsets outside the file")
        if dtype not in DTYPE_BYTES or not isinstance(shape, list) \
                or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"tensor {name[:40]!r}: bad dtype or shape")
        count = 1
        for d in shape:
            count *= d
        if count * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
            raise ValueError(f"tensor {name[:40]!r}: size does not match dtype x shape")
        spans.append((offsets[0], offsets[1]))
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError("tensor byte ranges overlap")
    return len(spans)
