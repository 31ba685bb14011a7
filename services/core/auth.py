"""Bearer-token authentication of the gRPC API (`authorization: Bearer <token>`).

The API tokens (TUNESERVE_API_TOKEN, `--api-token-file`) open tuneserve.v1.Inference;
the admin tokens (TUNESERVE_ADMIN_TOKEN, `--admin-token-file`) open tuneserve.v1.Admin
and Inference. Missing or unknown token: UNAUTHENTICATED; an API token on Admin:
PERMISSION_DENIED; no token configured: everything open. Health and reflection are
always open. Only SHA-256 digests of the tokens leave this module. No grpc import here.

A server's token file holds one or more tokens, one a line (blank lines and `#` comments
ignored), all valid at once: old and new during a rotation. The ingress re-reads it when
it changes (`Authenticator`, at most every RELOAD_INTERVAL_S), also when a Kubernetes
Secret volume swaps its `..data` symlink; a file that turns unreadable, empty or a
placeholder keeps the last good set (warning). A server refuses to start with a known
placeholder or an empty token (ConfigError naming how to create the Secret).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Union

from services.core.errors import ConfigError, PermissionDenied, Unauthenticated

API_TOKEN_ENV = "TUNESERVE_API_TOKEN"
ADMIN_TOKEN_ENV = "TUNESERVE_ADMIN_TOKEN"
METADATA_KEY = "authorization"
SCHEME = "bearer"
MAX_TOKEN_CHARS = 4096
RELOAD_INTERVAL_S = 1.0
"""How often, at most, an Authenticator stats its token files (on a call, never idle)."""

INFERENCE = "inference"
ADMIN = "admin"

SECRET_NAME = "tuneserve-api-tokens"
CREATE_SECRET = (
    "create fresh tokens (e.g. `openssl rand -hex 32 > api-token`, the same for "
    "admin-token) and, on Kubernetes, the Secret: `kubectl -n tuneserve create secret "
    f"generic {SECRET_NAME} --from-file=api-token=./api-token "
    "--from-file=admin-token=./admin-token` (docs/kubernetes.md, step 2); elsewhere write "
    "the token into the file given by --api-token-file / --admin-token-file")
"""What every refusal to start says: how to make the tokens and the Secret."""

logger = logging.getLogger(__name__)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# Values that example manifests and docs print (the first two shipped in
# k8s/base/api-tokens.yaml until it was removed): public, so a server holding one would
# be open in all but name. Compared case-insensitively; a token containing one of
# PLACEHOLDER_MARKS counts too.
PLACEHOLDER_TOKENS = ("placeholder-inference-token-change-me",
                      "placeholder-admin-token-change-me",
                      "changeme", "token", "secret", "password", "example", "test", "xxx")
PLACEHOLDER_MARKS = ("change-me", "change_me", "changeme", "replace-me", "replace_me",
                     "replaceme", "placeholder", "your-token", "your_token", "<", ">")


def is_placeholder(token: str) -> bool:
    lowered = token.lower()
    return lowered in PLACEHOLDER_TOKENS or any(m in lowered for m in PLACEHOLDER_MARKS)


def _check_token(token: str, source: str) -> str:
    """A token must fit in gRPC metadata as `Bearer <token>`: printable ASCII, no
    spaces. The message names the source, never the value."""
    if not token:
        raise ConfigError(f"{source}: the token is empty")
    if len(token) > MAX_TOKEN_CHARS:
        raise ConfigError(f"{source}: the token is longer than {MAX_TOKEN_CHARS} characters")
    if not all("!" <= c <= "~" for c in token):
        raise ConfigError(f"{source}: the token must be printable ASCII without spaces")
    return token


def parse_tokens(text: str, source: str) -> list[str]:
    """The tokens of a token file's text: one a line, surrounding whitespace stripped,
    blank lines and `#` comments skipped; each checked (_check_token)."""
    tokens = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            tokens.append(_check_token(line, source))
    return tokens


def _read_text(token_file: str, hint: str = "") -> str:
    try:
        return Path(token_file).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"token file not found: {token_file}{hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"token file {token_file} is unreadable "
                          f"({type(exc).__name__}){hint}") from None


def read_token(env_name: str, token_file: Optional[str] = None,
               environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """A client's token: the first of `token_file` (parse_tokens: a server's file of
    several works too), else the environment variable `env_name` (unset or empty: no
    token)."""
    if token_file:
        tokens = parse_tokens(_read_text(token_file), f"token file {token_file}")
        if not tokens:
            raise ConfigError(f"token file {token_file}: the token is empty")
        return tokens[0]
    environ = os.environ if environ is None else environ
    value = (environ.get(env_name) or "").strip()
    return _check_token(value, env_name) if value else None


def _refuse_placeholders(tokens: list[str], source: str) -> list[str]:
    if any(is_placeholder(t) for t in tokens):
        raise ConfigError(f"{source} holds a known placeholder token, which anyone who "
                          f"has read the manifests or docs can send; refusing to start: "
                          f"{CREATE_SECRET}")
    return tokens


def read_token_file(token_file: str) -> list[str]:
    """Every token of a server's token file. ConfigError (naming the fix) when it is
    missing, unreadable, holds no token, a malformed one or a placeholder."""
    source = f"token file {token_file}"
    tokens = parse_tokens(_read_text(token_file, f"; {CREATE_SECRET}"), source)
    if not tokens:
        raise ConfigError(f"{source} holds no token (it is empty or only comments); "
                          f"refusing to start: {CREATE_SECRET}")
    return _refuse_placeholders(tokens, source)


def server_tokens(env_name: str, token_file: Optional[str] = None,
                  environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """A server's tokens of one scope: every token of `token_file`, else of the
    environment variable (unset: none; set but blank: refused, as a placeholder is)."""
    if token_file:
        return read_token_file(token_file)
    environ = os.environ if environ is None else environ
    if env_name not in environ:
        return []
    tokens = parse_tokens(environ[env_name], env_name)
    if not tokens:
        raise ConfigError(f"{env_name} is set but empty; refusing to start: unset it to "
                          f"serve without that token, or {CREATE_SECRET}")
    return _refuse_placeholders(tokens, env_name)


def _digests(values: Union[None, str, Iterable[str]]) -> frozenset[str]:
    if not values:
        return frozenset()
    return frozenset([values] if isinstance(values, str) else values)


@dataclass(frozen=True)
class Tokens:
    """SHA-256 hex digests of the configured tokens of each scope (empty: not
    configured), and the files they came from (None: the environment, never re-read).
    This is what the ingress gets; `as_dict` / `from_dict` for its init args."""

    api: frozenset[str] = frozenset()
    admin: frozenset[str] = frozenset()
    api_file: Optional[str] = None
    admin_file: Optional[str] = None

    @classmethod
    def from_values(cls, api: Union[None, str, Iterable[str]],
                    admin: Union[None, str, Iterable[str]],
                    api_file: Optional[str] = None,
                    admin_file: Optional[str] = None) -> "Tokens":
        """From the tokens themselves: a token, several, or None."""
        api_set = {api} if isinstance(api, str) else set(api or ())
        admin_set = {admin} if isinstance(admin, str) else set(admin or ())
        return cls(frozenset(_digest(t) for t in api_set if t),
                   frozenset(_digest(t) for t in admin_set if t), api_file, admin_file)

    @classmethod
    def load(cls, api_token_file: Optional[str] = None, admin_token_file: Optional[str] = None,
             environ: Optional[Mapping[str, str]] = None) -> "Tokens":
        """Files first, then TUNESERVE_API_TOKEN / TUNESERVE_ADMIN_TOKEN; ConfigError
        (naming how to create the Secret) for a placeholder or an empty token."""
        api = server_tokens(API_TOKEN_ENV, api_token_file, environ)
        admin = server_tokens(ADMIN_TOKEN_ENV, admin_token_file, environ)
        if set(api) & set(admin):
            raise ConfigError("the API token and the admin token must differ")
        # Absolute: the ingress replicas re-read them from another working directory.
        return cls.from_values(api, admin,
                               os.path.abspath(api_token_file) if api_token_file else None,
                               os.path.abspath(admin_token_file) if admin_token_file else None)

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, object]]) -> "Tokens":
        data = data or {}
        return cls(_digests(data.get("api")), _digests(data.get("admin")),
                   data.get("api_file"), data.get("admin_file"))

    def as_dict(self) -> dict[str, object]:
        return {"api": sorted(self.api), "admin": sorted(self.admin),
                "api_file": self.api_file, "admin_file": self.admin_file}

    @property
    def enabled(self) -> bool:
        return bool(self.api or self.admin)

    def open_warning(self) -> Optional[str]:
        """The one warning to log at start, or None when both scopes have tokens."""
        if not self.enabled:
            return ("authentication is OFF: neither TUNESERVE_API_TOKEN nor "
                    "TUNESERVE_ADMIN_TOKEN is set (nor --api-token-file / --admin-token-file);"
                    " anyone who can reach the gRPC port can call Inference and Admin "
                    "(promote, roll back, pin)")
        found = []
        if not self.api:
            found.append("the Inference API is open (no TUNESERVE_API_TOKEN or "
                         "--api-token-file): anyone who can reach the gRPC port can classify "
                         "and generate")
        if not self.admin:
            found.append("the Admin API is disabled: no TUNESERVE_ADMIN_TOKEN or "
                         "--admin-token-file is set, so no caller can promote, roll back or "
                         "pin")
        return "; ".join(found) or None

    def __repr__(self) -> str:  # digests are not secrets, but keep logs quiet anyway
        return f"Tokens(api={len(self.api) or 'unset'}, admin={len(self.admin) or 'unset'})"


def bearer_token(metadata: Iterable[tuple[str, object]]) -> Optional[str]:
    """The token of the first `authorization` metadata entry; None if there is none.
    Raises Unauthenticated when the entry is not `Bearer <token>`."""
    for key, value in metadata or ():
        if str(key).lower() != METADATA_KEY:
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = str(value).strip().partition(" ")
        token = token.strip()
        if scheme.lower() != SCHEME or not token:
            raise Unauthenticated("malformed authorization metadata: expected "
                                  "'authorization: Bearer <token>'")
        return token
    return None


def _matches(presented: str, digests: frozenset[str]) -> bool:
    """Whether the presented token's digest is one of `digests`: every one is compared,
    so the time taken does not say which (or whether one) matched."""
    found = False
    for digest in digests:
        found |= hmac.compare_digest(presented.encode(), digest.encode())
    return found


class WatchedTokenFile:
    """The digests of one token file, re-read when the file it names changes: its
    device, inode, size, mtime or ctime, seen through symlinks (a Kubernetes Secret
    volume swaps its `..data` link to a new folder). A read that fails (missing,
    unreadable, empty, malformed, placeholder) keeps the last good digests and logs one
    warning per state of the file: never open, never locked out by a transient error."""

    def __init__(self, path: str, digests: frozenset[str], scope: str,
                 log: logging.Logger = logger):
        self.path, self.digests, self.scope, self.log = path, digests, scope, log
        self._seen: Optional[tuple] = None  # the state the digests were read from
        self._failed: Optional[tuple] = None  # the state whose read failed (logged)

    def refresh(self) -> None:
        try:
            st = os.stat(self.path)
            state: tuple = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError as exc:
            self._fail(("stat", type(exc).__name__),
                       f"token file {self.path} is unreadable ({type(exc).__name__})")
            return
        if state == self._seen:
            return
        try:
            tokens = read_token_file(self.path)
        except ConfigError as exc:
            self._fail(state, exc.message.split("; refusing to start")[0])
            return
        digests = frozenset(_digest(t) for t in tokens)
        if digests != self.digests:
            self.log.info("%s tokens re-read from %s: %d valid", self.scope, self.path,
                          len(digests))
        self.digests, self._seen, self._failed = digests, state, None

    def _fail(self, state: tuple, message: str) -> None:
        if state != self._failed:
            self.log.warning("%s; keeping the %d %s token(s) read before until it holds "
                             "tokens again", message, len(self.digests), self.scope)
        self._failed, self._seen = state, None


class Authenticator:
    """Decides whether a call's metadata may call a method of the given scope. Token
    files are re-read when they change, checked at most every `interval_s` on a call."""

    def __init__(self, tokens: Tokens, interval_s: float = RELOAD_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic,
                 log: logging.Logger = logger):
        self.tokens = tokens
        self._files = {scope: WatchedTokenFile(path, digests, scope, log)
                       for scope, path, digests in ((INFERENCE, tokens.api_file, tokens.api),
                                                    (ADMIN, tokens.admin_file, tokens.admin))
                       if path and digests}
        self._interval_s, self._clock = interval_s, clock
        self._next_check = float("-inf")
        self._lock = threading.Lock()

    def current(self) -> Tokens:
        """The tokens now, after re-reading a changed file (at most every interval_s)."""
        if not self._files or self._clock() < self._next_check:
            return self.tokens
        if not self._lock.acquire(blocking=False):  # another thread is re-reading
            return self.tokens
        try:
            self._next_check = self._clock() + self._interval_s
            for watched in self._files.values():
                watched.refresh()
            api, admin = self._files.get(INFERENCE), self._files.get(ADMIN)
            self.tokens = replace(self.tokens,
                                  api=api.digests if api else self.tokens.api,
                                  admin=admin.digests if admin else self.tokens.admin)
        finally:
            self._lock.release()
        return self.tokens

    def check(self, metadata: Iterable[tuple[str, object]], scope: str) -> None:
        """Return if allowed, else raise Unauthenticated or PermissionDenied."""
        tokens = self.current()
        if not tokens.enabled:
            return
        if scope == INFERENCE and not tokens.api:
            return  # only an admin token is configured: Inference is open
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated("missing credentials: send the metadata "
                                  "'authorization: Bearer <token>'")
        # Both comparisons always run: the time taken does not say which token matched.
        presented = _digest(token)
        is_api, is_admin = _matches(presented, tokens.api), _matches(presented, tokens.admin)
        if is_admin:
            return
        if not is_api:
            raise Unauthenticated("invalid token")
        if scope == ADMIN:
            raise PermissionDenied(
                "the API token may not call Admin methods; use the admin token"
                if tokens.admin else
                "the Admin API is disabled on this server (no admin token is configured)")
