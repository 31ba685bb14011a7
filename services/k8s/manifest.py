"""Pinning a version in a RayService manifest file, for GitOps (`promote --file`).

The file stays as it was but for the pin: comments, anchors, order and layout are kept,
so the change reads as a one-line diff. It may be

- a RayService (k8s/base/rayservice.yaml, or a strategic-merge patch of one), or
- a JSON 6902 patch whose op sets /spec/serveConfigV2 (the gpu and colocated overlays:
  they replace the base's serveConfigV2 as a whole, so their pins live there).

serveConfigV2 is a YAML text inside YAML. Its pin line is found by indentation (the
application entry, its deployment entry, user_config, the pin) and rewritten alone; the
result must parse to exactly what `objects.pin_version` computes, or the edit is not
used. Where the text has no such line to rewrite (flow style, a quoted string instead of
a block), serveConfigV2 alone is written out anew, and the caller is told that its
comments were not kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from services.core.errors import ConfigError
from services.k8s.objects import COLOCATED_INGRESS, deployment_name, pin_version

SERVE_CONFIG_PATH = "/spec/serveConfigV2"
_DOC_START = re.compile(r"^(---|\.\.\.)(\s|$)")
_BLOCK_HEADER = re.compile(r"^[|>][-+0-9]*\s*(#.*)?$")


@dataclass
class Edited:
    text: str
    kept_comments: bool  # False: serveConfigV2 was written out anew
    where: str  # "RayService tuneserve" or "the patch of /spec/serveConfigV2"


def pin_in_manifest(text: str, *, service: str, model: str, version: Optional[str],
                    app: str, source: str) -> Edited:
    """`text` (a manifest file) with `model` pinned to `version` (None: unpinned)."""
    lines = text.splitlines(keepends=True)
    for start, end in _documents(lines):
        try:
            doc = yaml.safe_load("".join(lines[start:end]))
        except yaml.YAMLError:
            continue  # the caller parsed the whole file already; a fragment may not
        found = _serve_config_key(lines, start, end, doc, service)
        if found is None:
            continue
        key_line, current, where = found
        wanted = pin_version(current, model, version, app=app)
        edited = _edit_block(lines, key_line, end, current, wanted, model=model,
                             version=version, app=app, where=where)
        if edited.kept_comments and yaml.safe_load(wanted) not in _serve_configs(edited.text):
            # the line edit, put back in the file, does not read as intended: rewrite
            edited = _edit_block(lines, key_line, end, current, wanted, model=model,
                                 version=version, app=app, where=where, rewrite=True)
        return edited
    raise ConfigError(f"{source}: no RayService named {service!r} with a serveConfigV2, "
                      f"and no patch that sets {SERVE_CONFIG_PATH}")


def _serve_configs(text: str) -> list[Any]:
    """Every serveConfigV2 a file holds (RayServices and patches), parsed."""
    found = []
    for doc in yaml.safe_load_all(text):
        if isinstance(doc, dict) and isinstance((doc.get("spec") or {}).get("serveConfigV2"),
                                                str):
            found.append(yaml.safe_load(doc["spec"]["serveConfigV2"]))
        elif isinstance(doc, list):
            found += [yaml.safe_load(op["value"]) for op in doc if isinstance(op, dict)
                      and op.get("path") == SERVE_CONFIG_PATH
                      and isinstance(op.get("value"), str)]
    return found


def _documents(lines: list[str]) -> list[tuple[int, int]]:
    """(start, end) line ranges of the YAML documents in a file."""
    cuts = [i for i, line in enumerate(lines) if _DOC_START.match(line)]
    bounds = [0, *cuts, len(lines)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _serve_config_key(lines: list[str], start: int, end: int, doc: Any,
                      service: str) -> Optional[tuple[int, str, str]]:
    """(line of the key, its text, what it is) of serveConfigV2 in this document."""
    if isinstance(doc, dict) and doc.get("kind") == "RayService" \
            and isinstance(doc.get("metadata"), dict) \
            and doc["metadata"].get("name") == service \
            and isinstance((doc.get("spec") or {}).get("serveConfigV2"), str):
        for i in range(start, end):
            if re.match(r"^\s+['\"]?serveConfigV2['\"]?\s*:", lines[i]):
                return i, doc["spec"]["serveConfigV2"], f"RayService {service}"
    if not isinstance(doc, list):
        return None
    ops = [op for op in doc if isinstance(op, dict) and op.get("path") == SERVE_CONFIG_PATH
           and isinstance(op.get("value"), str)]
    if not ops:
        return None
    path = re.compile(rf"^\s*(-\s+)?path\s*:\s*['\"]?{re.escape(SERVE_CONFIG_PATH)}['\"]?"
                      r"\s*(#.*)?$")
    for i in range(start, end):
        if not path.match(lines[i]):
            continue
        dash = i
        while dash > start and not re.match(r"^\s*-\s", lines[dash]):
            dash -= 1
        for j in range(dash, end):
            if j > dash and not _empty(lines[j]) and _indent(lines[j]) <= _indent(lines[dash]):
                break  # the next op
            if re.match(r"^\s*(-\s+)?value\s*:", lines[j]):
                return j, ops[0]["value"], f"the patch of {SERVE_CONFIG_PATH}"
    return None


def _edit_block(lines: list[str], key_line: int, end: int, current: str, wanted: str, *,
                model: str, version: Optional[str], app: str, where: str,
                rewrite: bool = False) -> Edited:
    """Replace the serveConfigV2 text `current` at key_line with the pinned one: only its
    pin line where that reads as `wanted` (pin_version's result), else `wanted` whole."""
    key = lines[key_line]
    key_indent = _indent(key.replace("-", " ", 1) if key.lstrip().startswith("-") else key)
    prefix, header = key.split(":", 1)
    header = header.strip()
    first = last = key_line + 1
    while last < end and (_empty(lines[last]) or _indent(lines[last]) > key_indent):
        last += 1
    while last > first and _empty(lines[last - 1]):  # trailing blank lines stay outside
        last -= 1
    block = lines[first:last]
    edited = None
    if not rewrite and _BLOCK_HEADER.match(header) and header.startswith("|") and block:
        width = min(_indent(line) for line in block if not _empty(line))
        content = "".join(line[width:] if not _empty(line) else line.lstrip(" ")
                          for line in block)
        if content == current or content.rstrip("\n") == current.rstrip("\n"):
            edited = _pin_lines(content, model, version, app)
    if edited is not None and yaml.safe_load(edited) == yaml.safe_load(wanted):
        kept = True
    else:  # write serveConfigV2 anew, as a literal block
        edited, kept, width = wanted, False, key_indent + 2
        lines = lines[:key_line] + [f"{prefix}: |\n"] + lines[key_line + 1:]
    new_block = [(" " * width + line if line.strip() else line)
                 for line in edited.splitlines(keepends=True)]
    if new_block and not new_block[-1].endswith("\n"):
        new_block[-1] += "\n"
    return Edited("".join(lines[:first] + new_block + lines[last:]), kept, where)


# ---- the pin line inside serveConfigV2 ------------------------------------------------
def _pin_lines(content: str, model: str, version: Optional[str], app: str) -> Optional[str]:
    """`content` with only the pin rewritten, or None where its lines are not found."""
    doc = yaml.safe_load(content) or {}
    apps = [a for a in doc.get("applications") or [] if isinstance(a, dict)]
    application = next((a for a in apps if a.get("name") == app), None)
    if application is None:
        return None
    colocated = bool((application.get("args") or {}).get("colocate"))
    lines = content.splitlines(keepends=True)
    app_span = _item_span(lines, 0, len(lines), "name", app)
    if app_span is None:
        return None
    deployments = _key_span(lines, *app_span, "deployments")
    if deployments is None:
        return None
    name = COLOCATED_INGRESS if colocated else deployment_name(model)
    dep = _item_span(lines, deployments[0] + 1, deployments[1], "name", name)
    if dep is None:
        return None
    user_config = _key_span(lines, *dep, "user_config")
    if user_config is None:
        return None
    if not colocated:
        return _set_scalar(lines, user_config, "pinned_version", version)
    pins = _key_span(lines, *user_config, "pinned_versions")
    if pins is None:
        return None
    at, stop = pins
    inline = lines[at].split(":", 1)[1].split("#", 1)[0].strip()
    if inline or stop == at + 1:  # flow style or null on the key's line: the whole mapping
        current = yaml.safe_load(inline) or {}
        if not isinstance(current, dict):
            return None
        current[model] = version
        flow = yaml.safe_dump(current, default_flow_style=True, width=10 ** 6).strip()
        return "".join(lines[:at] + [_replace_value(lines[at], flow)] + lines[at + 1:])
    return _set_scalar(lines, pins, model, version)


def _set_scalar(lines: list[str], span: tuple[int, int], key: str,
                version: Optional[str]) -> Optional[str]:
    """Set `key: version` among the children of the mapping at span (adding the line)."""
    at, stop = span
    value = "null" if version is None else version
    child = _key_span(lines, at + 1, stop, key)
    if child is not None:
        if child[1] > child[0] + 1:  # a block value below the key: not a pin line
            return None
        return "".join(lines[:child[0]] + [_replace_value(lines[child[0]], value)] +
                       lines[child[0] + 1:])
    children = [i for i in range(at + 1, stop) if not _blank(lines[i])]
    if not children:
        return None
    indent = " " * _indent(lines[children[0]])
    insert = children[-1] + 1
    return "".join(lines[:insert] + [f"{indent}{_plain_key(key)}: {value}\n"] + lines[insert:])


def _replace_value(line: str, value: str) -> str:
    """`key: old  # note` -> `key: value  # note`."""
    key, rest = line.split(":", 1)
    comment = ""
    if "#" in rest:
        comment = "  #" + rest.split("#", 1)[1].rstrip("\n")
    return f"{key}: {value}{comment}\n"


def _plain_key(key: str) -> str:
    dumped = yaml.safe_dump({key: None}).split(":", 1)[0]
    return dumped


def _item_span(lines: list[str], start: int, end: int, key: str,
               value: str) -> Optional[tuple[int, int]]:
    """Lines of the list item `- key: value` (the first such item in start..end)."""
    pattern = re.compile(rf"^(\s*)-\s+{key}\s*:\s*['\"]?{re.escape(value)}['\"]?\s*(#.*)?$")
    for i in range(start, end):
        m = pattern.match(lines[i].rstrip("\n"))
        if m:
            dash = len(m.group(1))
            j = i + 1
            while j < end and (_blank(lines[j]) or _indent(lines[j]) > dash):
                j += 1
            return i, j
    return None


def _key_span(lines: list[str], start: int, end: int,
              key: str) -> Optional[tuple[int, int]]:
    """Lines of `key:` and its value (the first such key in start..end)."""
    pattern = re.compile(rf"^(\s*)(-\s+)?['\"]?{re.escape(key)}['\"]?\s*:(\s|$)")
    for i in range(start, end):
        m = pattern.match(lines[i])
        if m:
            indent = len(m.group(1)) + len(m.group(2) or "")
            j = i + 1
            while j < end and (_blank(lines[j]) or _indent(lines[j]) > indent):
                j += 1
            while j > i + 1 and _blank(lines[j - 1]):
                j -= 1
            return i, j
    return None


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _empty(line: str) -> bool:
    return not line.strip()


def _blank(line: str) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith("#")
