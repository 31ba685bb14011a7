"""Bearer-token authentication of the gRPC API (`authorization: Bearer <token>`).

The API token (TUNESERVE_API_TOKEN, `--api-token-file`) opens tuneserve.v1.Inference;
the admin token (TUNESERVE_ADMIN_TOKEN, `--admin-token-file`) opens tuneserve.v1.Admin
and Inference. Missing or unknown token: UNAUTHENTICATED; the API token on Admin:
PERMISSION_DENIED; no token configured: everything open. Health and reflection are
always open. Only SHA-256 digests of the tokens leave this module. No grpc import here.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

from services.core.errors import ConfigError, PermissionDenied, Unauthenticated

API_TOKEN_ENV = "TUNESERVE_API_TOKEN"
ADMIN_TOKEN_ENV = "TUNESERVE_ADMIN_TOKEN"
METADATA_KEY = "authorization"
SCHEME = "bearer"
MAX_TOKEN_CHARS = 4096

INFERENCE = "inference"
ADMIN = "admin"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# The values k8s/base/api-tokens.yaml ships so that the manifests apply as they are:
# public, so a server holding one is open in all but name.
PLACEHOLDER_TOKENS = ("placeholder-inference-token-change-me",
                      "placeholder-admin-token-change-me")
_PLACEHOLDER_DIGESTS = frozenset(_digest(t) for t in PLACEHOLDER_TOKENS)


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


def read_token(env_name: str, token_file: Optional[str] = None,
               environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The token from `token_file` (surrounding whitespace, e.g. the trailing newline
    of a mounted Secret, stripped), else from the environment variable `env_name`
    (unset or empty: no token)."""
    if token_file:
        path = Path(token_file)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise ConfigError(f"token file not found: {token_file}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"token file {token_file} is unreadable "
                              f"({type(exc).__name__})") from None
        return _check_token(text.strip(), f"token file {token_file}")
    environ = os.environ if environ is None else environ
    value = (environ.get(env_name) or "").strip()
    return _check_token(value, env_name) if value else None


@dataclass(frozen=True)
class Tokens:
    """SHA-256 hex digests of the configured tokens (None: not configured). This is
    what the ingress gets; `as_dict` / `from_dict` for its init args."""

    api: Optional[str] = None
    admin: Optional[str] = None

    @classmethod
    def from_values(cls, api: Optional[str], admin: Optional[str]) -> "Tokens":
        return cls(_digest(api) if api else None, _digest(admin) if admin else None)

    @classmethod
    def load(cls, api_token_file: Optional[str] = None, admin_token_file: Optional[str] = None,
             environ: Optional[Mapping[str, str]] = None) -> "Tokens":
        """Files first, then TUNESERVE_API_TOKEN / TUNESERVE_ADMIN_TOKEN."""
        api = read_token(API_TOKEN_ENV, api_token_file, environ)
        admin = read_token(ADMIN_TOKEN_ENV, admin_token_file, environ)
        if api is not None and api == admin:
            raise ConfigError("the API token and the admin token must differ")
        return cls.from_values(api, admin)

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Optional[str]]]) -> "Tokens":
        data = data or {}
        return cls(data.get("api"), data.get("admin"))

    def as_dict(self) -> dict[str, Optional[str]]:
        return {"api": self.api, "admin": self.admin}

    @property
    def enabled(self) -> bool:
        return bool(self.api or self.admin)

    def open_warning(self) -> Optional[str]:
        """The one warning to log at start, or None when both tokens are set (and are
        not the manifests' public placeholders)."""
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
        placeholders = [name for name, digest in (("TUNESERVE_API_TOKEN", self.api),
                                                  ("TUNESERVE_ADMIN_TOKEN", self.admin))
                        if digest in _PLACEHOLDER_DIGESTS]
        if placeholders:
            verb = "hold the public placeholders" if len(placeholders) > 1 else \
                "holds the public placeholder"
            found.append(f"{' and '.join(placeholders)} still {verb} of "
                         "k8s/base/api-tokens.yaml: anyone who has read the manifests can "
                         "call; replace the Secret tuneserve-api-tokens (docs/kubernetes.md, "
                         "step 2) and restart the pods")
        return "; ".join(found) or None

    def __repr__(self) -> str:  # digests are not secrets, but keep logs quiet anyway
        return f"Tokens(api={'set' if self.api else 'unset'}, " \
               f"admin={'set' if self.admin else 'unset'})"


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


def _matches(token: str, digest: Optional[str]) -> bool:
    if not digest:
        return False
    return hmac.compare_digest(_digest(token).encode(), digest.encode())


class Authenticator:
    """Decides whether a call's metadata may call a method of the given scope."""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens

    def check(self, metadata: Iterable[tuple[str, object]], scope: str) -> None:
        """Return if allowed, else raise Unauthenticated or PermissionDenied."""
        tokens = self.tokens
        if not tokens.enabled:
            return
        if scope == INFERENCE and not tokens.api:
            return  # only an admin token is configured: Inference is open
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated("missing credentials: send the metadata "
                                  "'authorization: Bearer <token>'")
        # Both comparisons always run: the time taken does not say which token matched.
        is_api, is_admin = _matches(token, tokens.api), _matches(token, tokens.admin)
        if is_admin:
            return
        if not is_api:
            raise Unauthenticated("invalid token")
        if scope == ADMIN:
            raise PermissionDenied(
                "the API token may not call Admin methods; use the admin token"
                if tokens.admin else
                "the Admin API is disabled on this server (no admin token is configured)")
