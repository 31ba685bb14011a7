"""Authentication without Ray: reading tokens, the decision table, the ingress in
memory (a fake gRPC context), the app builder and the CLI's token flags.
tests/integration/test_auth.py does it again through Serve's real gRPC proxy."""

from __future__ import annotations

import asyncio
import functools
import logging

import grpc
import pytest

from services.core.config import ServeConfig
from services.core.errors import ConfigError, PermissionDenied, Unauthenticated
from services.protocol import admin_pb, pb
from services.core import auth
from services.core.auth import ADMIN, INFERENCE, Authenticator, Tokens, read_token

API, ADMIN_T = "api-token-1", "admin-token-2"


# ---- reading tokens ---------------------------------------------------------------------
def test_token_file_is_stripped_and_beats_the_environment(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"{API}\n")  # a mounted Secret usually ends with a newline
    env = {"TUNESERVE_API_TOKEN": "from-env"}
    assert read_token("TUNESERVE_API_TOKEN", str(path), env) == API
    path.write_text(f"  {API}\r\n\n")
    assert read_token("TUNESERVE_API_TOKEN", str(path), env) == API
    path.write_bytes(b"\xef\xbb\xbf" + API.encode() + b"\r\n")  # saved by a Windows editor
    assert read_token("TUNESERVE_API_TOKEN", str(path), env) == API
    assert read_token("TUNESERVE_API_TOKEN", None, env) == "from-env"
    assert read_token("TUNESERVE_API_TOKEN", None, {}) is None
    assert read_token("TUNESERVE_API_TOKEN", None, {"TUNESERVE_API_TOKEN": " \n"}) is None


@pytest.mark.parametrize("content,needle", [
    ("", "empty"), ("\n", "empty"), ("two words", "printable ASCII"),
    ("tab\there", "printable ASCII"), ("naïve", "printable ASCII"),
    ("x" * 5000, "longer than"),
])
def test_bad_token_files_are_refused_without_echoing_them(tmp_path, content, needle):
    path = tmp_path / "token"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        read_token("TUNESERVE_API_TOKEN", str(path), {})
    assert needle in str(err.value) and str(path) in str(err.value)
    if content.strip():
        assert content.strip() not in str(err.value)


def test_the_base_manifests_hold_no_token_value():
    """k8s/base ships no Secret: the user creates it (docs/kubernetes.md, step 2)."""
    from tests.unit.test_k8s_manifests import K8S

    assert not (K8S / "base" / "api-tokens.yaml").exists()
    for path in (K8S / "base").rglob("*.yaml"):
        text = path.read_text()
        assert "kind: Secret" not in text, path
        assert not any(t in text for t in auth.PLACEHOLDER_TOKENS[:2]), path


def test_missing_token_file_and_bad_env_value(tmp_path):
    with pytest.raises(ConfigError, match="token file not found"):
        read_token("TUNESERVE_API_TOKEN", str(tmp_path / "nope"), {})
    with pytest.raises(ConfigError) as err:
        read_token("TUNESERVE_API_TOKEN", None, {"TUNESERVE_API_TOKEN": "has space"})
    assert "TUNESERVE_API_TOKEN" in str(err.value) and "has space" not in str(err.value)


def test_tokens_hold_digests_only():
    tokens = Tokens.load(environ={"TUNESERVE_API_TOKEN": API,
                                  "TUNESERVE_ADMIN_TOKEN": ADMIN_T})
    dumped = str(tokens.as_dict()) + repr(tokens)
    assert API not in dumped and ADMIN_T not in dumped
    assert repr(tokens) == "Tokens(api=1, admin=1)"
    assert Tokens.from_dict(tokens.as_dict()) == tokens
    with pytest.raises(ConfigError, match="must differ"):
        Tokens.load(environ={"TUNESERVE_API_TOKEN": API, "TUNESERVE_ADMIN_TOKEN": API})


# ---- refusing placeholders and empty tokens at start ------------------------------------------
@pytest.mark.parametrize("content", [
    "", "\n", "# only a comment\n\n", "placeholder-inference-token-change-me\n",
    "CHANGEME\n", "real-token-abc\nmy-token-change-me\n", "<your-token>\n",
])
def test_start_refuses_a_placeholder_or_empty_token_file(tmp_path, content):
    path = tmp_path / "api-token"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        Tokens.load(str(path), environ={})
    message = str(err.value)
    assert str(path) in message and "refusing to start" in message
    assert "kubectl -n tuneserve create secret generic tuneserve-api-tokens" in message
    assert "--from-file=api-token=" in message
    for line in content.splitlines():
        if line.strip() and not line.startswith("#"):
            assert line.strip() not in message


@pytest.mark.parametrize("env", [{"TUNESERVE_API_TOKEN": ""}, {"TUNESERVE_API_TOKEN": " \n"},
                                 {"TUNESERVE_ADMIN_TOKEN": "placeholder-admin-token-change-me"}])
def test_start_refuses_a_placeholder_or_empty_token_variable(env):
    with pytest.raises(ConfigError, match="refusing to start") as err:
        Tokens.load(environ=env)
    assert "create secret generic" in str(err.value)


def test_a_missing_token_file_says_how_to_create_the_secret(tmp_path):
    with pytest.raises(ConfigError, match="token file not found") as err:
        Tokens.load(admin_token_file=str(tmp_path / "admin-token"), environ={})
    assert "--from-file=admin-token=" in str(err.value)


def test_serve_exits_non_zero_on_a_placeholder_token(tmp_path, capsys):
    """`tuneserve serve` refuses before Ray starts (build_app runs Tokens.load first)."""
    from services.cli import main

    (tmp_path / "registry").mkdir()
    (tmp_path / "api").write_text("placeholder-inference-token-change-me\n")
    code = main(["serve", "--registry", str(tmp_path / "registry"),
                 "--api-token-file", str(tmp_path / "api")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "placeholder" in err and "kubectl -n tuneserve create secret generic" in err


def test_app_builder_refuses_an_empty_token_file(tmp_path, monkeypatch):
    """The RayService path: app_builder raises, Serve reports the app DEPLOY_FAILED
    with the message."""
    from services.serving import app as app_module

    monkeypatch.setattr(app_module, "discover_models",
                        lambda *_: {"m": "classification"})
    (tmp_path / "admin").write_text("\n")
    with pytest.raises(ConfigError, match="holds no token") as err:
        app_module.app_builder({"registry": str(tmp_path),
                                "admin_token_file": str(tmp_path / "admin")})
    assert "create secret generic tuneserve-api-tokens" in str(err.value)


# ---- several tokens and rotation without a restart ---------------------------------------------
class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def allowed(authenticator: Authenticator, token: str, scope: str = INFERENCE) -> bool:
    return outcome(authenticator, bearer(token), scope) == OK


def rotating(tmp_path, content: str):
    path = tmp_path / "api-token"
    path.write_text(content)
    clock = Clock()
    authenticator = Authenticator(Tokens.load(str(path), environ={}), clock=clock)
    return path, clock, authenticator


def test_a_token_file_holds_several_tokens_all_valid(tmp_path):
    path, _, authenticator = rotating(
        tmp_path, "# rotation of May\nold-token-1\n\n  new-token-2  \r\n")
    assert allowed(authenticator, "old-token-1") and allowed(authenticator, "new-token-2")
    assert not allowed(authenticator, "# rotation of May")
    assert repr(authenticator.tokens) == "Tokens(api=2, admin=unset)"
    assert "old-token-1" not in str(authenticator.tokens.as_dict())
    # A client reading the same file sends the first token.
    assert read_token("TUNESERVE_API_TOKEN", str(path), {}) == "old-token-1"


def test_rewriting_the_file_rotates_without_a_restart(tmp_path):
    path, clock, authenticator = rotating(tmp_path, "old-token-1\n")
    assert allowed(authenticator, "old-token-1") and not allowed(authenticator, "new-token-2")
    path.write_text("old-token-1\nnew-token-2\n")  # rotation starts: both valid
    clock.now += 1.0
    assert allowed(authenticator, "old-token-1") and allowed(authenticator, "new-token-2")
    path.write_text("new-token-2\n")  # rotation ends: the old one is refused
    assert allowed(authenticator, "old-token-1")  # not re-read within the interval
    clock.now += 1.0
    assert not allowed(authenticator, "old-token-1") and allowed(authenticator, "new-token-2")


def kubelet_update(folder, content: str, generation: int) -> None:
    """What the kubelet does to a Secret volume: a new timestamped folder, then an
    atomic rename of the `..data` symlink; the key's file links into `..data`."""
    new = folder / f"..2024_{generation}"
    new.mkdir()
    (new / "api-token").write_text(content)
    link = folder / "..data_tmp"
    link.symlink_to(new.name)
    link.rename(folder / "..data")
    if not (folder / "api-token").is_symlink():
        (folder / "api-token").symlink_to("..data/api-token")


def test_a_secret_volume_symlink_swap_rotates(tmp_path):
    folder = tmp_path / "secret"
    folder.mkdir()
    kubelet_update(folder, "old-token-1\n", 1)
    clock = Clock()
    authenticator = Authenticator(Tokens.load(str(folder / "api-token"), environ={}),
                                  clock=clock)
    assert allowed(authenticator, "old-token-1")
    kubelet_update(folder, "old-token-1\nnew-token-2\n", 2)
    clock.now += 1.0
    assert allowed(authenticator, "old-token-1") and allowed(authenticator, "new-token-2")
    kubelet_update(folder, "new-token-2\n", 3)
    clock.now += 1.0
    assert not allowed(authenticator, "old-token-1") and allowed(authenticator, "new-token-2")


@pytest.mark.parametrize("breakage", ["empty", "missing", "placeholder", "malformed",
                                      "unreadable"])
def test_a_broken_rotation_keeps_the_last_good_tokens(tmp_path, caplog, breakage):
    path, clock, authenticator = rotating(tmp_path, "good-token-1\n")
    assert allowed(authenticator, "good-token-1")
    if breakage == "missing":
        path.unlink()
    elif breakage == "unreadable":
        path.unlink()
        path.mkdir()  # reading a folder fails, as an unreadable file does
    else:
        path.write_text({"empty": "", "placeholder": "placeholder-inference-token-change-me",
                         "malformed": "two words"}[breakage])
    with caplog.at_level(logging.WARNING, logger="services.core.auth"):
        for _ in range(3):
            clock.now += 1.0
            assert allowed(authenticator, "good-token-1")
            assert not allowed(authenticator, "placeholder-inference-token-change-me")
            assert not allowed(authenticator, "")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once per state of the file, not per call
    assert "keeping the 1 inference token(s)" in warnings[0] and str(path) in warnings[0]
    assert "good-token-1" not in warnings[0]
    if breakage == "unreadable":
        path.rmdir()
    path.write_text("good-token-2\n")  # repaired: read again
    clock.now += 1.0
    assert allowed(authenticator, "good-token-2") and not allowed(authenticator, "good-token-1")


def test_admin_tokens_rotate_too_and_env_tokens_stay(tmp_path, monkeypatch):
    path = tmp_path / "admin-token"
    path.write_text("admin-old\n")
    clock = Clock()
    authenticator = Authenticator(
        Tokens.load(admin_token_file=str(path), environ={"TUNESERVE_API_TOKEN": API}),
        clock=clock)
    assert allowed(authenticator, "admin-old", ADMIN)
    path.write_text("admin-new\n")
    clock.now += 1.0
    assert allowed(authenticator, "admin-new", ADMIN)
    assert not allowed(authenticator, "admin-old", ADMIN)
    assert allowed(authenticator, API) and not allowed(authenticator, API, ADMIN)


# ---- the decision table ---------------------------------------------------------------------
OK, UNAUTH, DENIED = "OK", "UNAUTHENTICATED", "PERMISSION_DENIED"
# configured (api, admin) -> {(presented, scope): outcome}; presented None: no metadata.
TABLE = {
    (None, None): {(p, s): OK for p in (None, API, ADMIN_T, "wrong") for s in (INFERENCE, ADMIN)},
    (API, None): {(None, INFERENCE): UNAUTH, (API, INFERENCE): OK, (ADMIN_T, INFERENCE): UNAUTH,
                  ("wrong", INFERENCE): UNAUTH, (None, ADMIN): UNAUTH, (API, ADMIN): DENIED,
                  (ADMIN_T, ADMIN): UNAUTH, ("wrong", ADMIN): UNAUTH},
    (None, ADMIN_T): {(None, INFERENCE): OK, (API, INFERENCE): OK, (ADMIN_T, INFERENCE): OK,
                      ("wrong", INFERENCE): OK, (None, ADMIN): UNAUTH, (API, ADMIN): UNAUTH,
                      (ADMIN_T, ADMIN): OK, ("wrong", ADMIN): UNAUTH},
    (API, ADMIN_T): {(None, INFERENCE): UNAUTH, (API, INFERENCE): OK,
                     (ADMIN_T, INFERENCE): OK, ("wrong", INFERENCE): UNAUTH,
                     (None, ADMIN): UNAUTH, (API, ADMIN): DENIED, (ADMIN_T, ADMIN): OK,
                     ("wrong", ADMIN): UNAUTH},
}
CASES = [(configured, presented, scope, outcome) for configured, rows in TABLE.items()
         for (presented, scope), outcome in rows.items()]


def outcome(authenticator: Authenticator, metadata, scope: str) -> str:
    try:
        authenticator.check(metadata, scope)
        return OK
    except Unauthenticated:
        return UNAUTH
    except PermissionDenied:
        return DENIED


@pytest.mark.parametrize("configured,presented,scope,expected", CASES)
def test_decision_table(configured, presented, scope, expected):
    authenticator = Authenticator(Tokens.from_values(*configured))
    metadata = [("user-agent", "x")] + ([("authorization", f"Bearer {presented}")]
                                        if presented else [])
    assert outcome(authenticator, metadata, scope) == expected


@pytest.mark.parametrize("value", ["Basic abc", "Bearer", "Bearer ", API, "Token " + API])
def test_malformed_authorization_is_unauthenticated(value):
    authenticator = Authenticator(Tokens.from_values(API, ADMIN_T))
    with pytest.raises(Unauthenticated, match="malformed"):
        authenticator.check([("authorization", value)], INFERENCE)


def test_scheme_is_case_insensitive_and_spaces_are_trimmed():
    authenticator = Authenticator(Tokens.from_values(API, ADMIN_T))
    for value in (f"bearer {API}", f"BEARER {API}", f"  Bearer   {API}  "):
        authenticator.check([("authorization", value)], INFERENCE)


def test_tokens_are_compared_in_constant_time(monkeypatch):
    calls = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    Authenticator(Tokens.from_values(API, ADMIN_T)).check(
        [("authorization", f"Bearer {API}")], INFERENCE)
    # Both tokens are always compared, as equal-length digests.
    assert calls == [(64, 64), (64, 64)]


# ---- the ingress in memory ------------------------------------------------------------------
class FakeContext:
    """What Serve passes as `grpc_context` (RayServegRPCContext), in memory."""

    def __init__(self, metadata=()):
        self.metadata = list(metadata)
        self._code, self._details, self.trailers = None, "", []

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self._code = code

    def set_details(self, details):
        self._details = details

    def set_trailing_metadata(self, trailing_metadata):
        self.trailers = list(trailing_metadata)

    def code(self):
        return self._code

    def details(self):
        return self._details


class Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class FakeClassifier:
    def __init__(self):
        async def classify(texts, version=None, routing_key=None):
            return {"version": "v1", "results": [
                {"label": "pos", "score": 0.9, "scores": [("pos", 0.9), ("neg", 0.1)]}
                for _ in texts]}

        self.classify = Remote(classify)


class FakeBoard:
    def __init__(self):
        async def get():
            return {"m": [{"replica": "r1", "version": "v1"}]}

        self.get = Remote(get)


@pytest.fixture
def ingress(tmp_path):
    from services.serving.ingress import InferenceIngress

    def make(tokens: Tokens, **limits):
        (tmp_path / "registry").mkdir(exist_ok=True)
        return InferenceIngress(str(tmp_path / "registry"), {"m": FakeClassifier()},
                                {"m": "classification"}, limits, board=FakeBoard(),
                                auth=tokens.as_dict())

    return make


def run(ingress, method: str, request, metadata=(), admin_plane=False):
    context = FakeContext(metadata)
    context.admin_plane = admin_plane  # as the replica's admin server marks its calls
    response = asyncio.run(getattr(ingress, method)(request, context))
    return (context.code() or grpc.StatusCode.OK), context.details(), response


def bearer(token):
    return [("authorization", f"Bearer {token}")]


def test_ingress_checks_the_token_before_anything_else(ingress):
    from services.serving.validation import UndecodableRequest

    server = ingress(Tokens.from_values(API, ADMIN_T), max_request_bytes=1024)
    classify = pb.ClassifyRequest(model="m", texts=["hello"])
    code, details, response = run(server, "Classify", classify, bearer(API))
    assert code == grpc.StatusCode.OK and response.results[0].label == "pos"
    # Invalid, undecodable or oversized requests: still UNAUTHENTICATED without a token.
    for request in (pb.ClassifyRequest(model="", texts=[]),
                    UndecodableRequest("tuneserve.v1.ClassifyRequest", 10),
                    pb.ClassifyRequest(model="m", texts=["x" * 2000])):
        assert run(server, "Classify", request)[0] == grpc.StatusCode.UNAUTHENTICATED
    code, details, _ = run(server, "Classify",
                           UndecodableRequest("tuneserve.v1.ClassifyRequest", 10), bearer(API))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in details
    code, details, _ = run(server, "Classify", pb.ClassifyRequest(model="m", texts=["x" * 2000]),
                           bearer(API))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit is 1024 bytes" in details


def test_ingress_admin_needs_the_admin_token(ingress):
    server = ingress(Tokens.from_values(API, ADMIN_T))
    unpin = admin_pb.UnpinRequest(model="m")
    on_admin = functools.partial(run, server, "Unpin", unpin, admin_plane=True)
    assert on_admin()[0] == grpc.StatusCode.UNAUTHENTICATED
    assert on_admin(bearer(API))[0] == grpc.StatusCode.PERMISSION_DENIED
    # Past authorization: this registry has no model "m".
    assert on_admin(bearer(ADMIN_T))[0] == grpc.StatusCode.NOT_FOUND
    # Not on the admin port: no Admin, whatever the token.
    assert run(server, "Unpin", unpin, bearer(ADMIN_T))[0] == grpc.StatusCode.UNIMPLEMENTED
    assert run(server, "ListModels", pb.ListModelsRequest(), bearer(ADMIN_T))[0] == \
        grpc.StatusCode.OK


def test_ingress_health_needs_no_token(ingress):
    from grpc_health.v1 import health_pb2

    server = ingress(Tokens.from_values(API, ADMIN_T))
    code, _, response = run(server, "Check", health_pb2.HealthCheckRequest())
    assert code == grpc.StatusCode.OK
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_generate_stream_checks_the_token(ingress):
    server = ingress(Tokens.from_values(API, None))
    context = FakeContext()

    async def consume():
        async for _ in server.GenerateStream(pb.GenerateRequest(model="m", prompt="x"),
                                             context):
            pass

    from services.serving.serve_logs import StreamEnded

    with pytest.raises(StreamEnded) as ended:  # Serve logs it as one line (serve_logs.py)
        asyncio.run(consume())
    assert context.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ended.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_ingress_rereads_the_token_file(ingress, tmp_path):
    path = tmp_path / "api-token"
    path.write_text("old-token-1\n")
    server = ingress(Tokens.load(str(path), environ={}))
    server.auth._interval_s = 0.0  # re-read on every call
    classify = pb.ClassifyRequest(model="m", texts=["hello"])
    assert run(server, "Classify", classify, bearer("old-token-1"))[0] == grpc.StatusCode.OK
    path.write_text("new-token-2\n")
    assert run(server, "Classify", classify, bearer("new-token-2"))[0] == grpc.StatusCode.OK
    assert run(server, "Classify", classify, bearer("old-token-1"))[0] == \
        grpc.StatusCode.UNAUTHENTICATED


# ---- the app builder and the CLI --------------------------------------------------------------
@pytest.fixture
def built(monkeypatch, tmp_path):
    """build_app without a registry or Ray: one fake classification model."""
    from services.serving import app as app_module

    monkeypatch.setattr(app_module, "discover_models",
                        lambda *_: {"m": "classification"})
    monkeypatch.delenv("TUNESERVE_API_TOKEN", raising=False)
    monkeypatch.delenv("TUNESERVE_ADMIN_TOKEN", raising=False)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    for name in ("services.serving.app", "ray.serve"):
        logging.getLogger(name).addHandler(handler)
    yield app_module, records, tmp_path
    for name in ("services.serving.app", "ray.serve"):
        logging.getLogger(name).removeHandler(handler)


def test_no_token_logs_one_warning(built):
    app_module, records, tmp_path = built
    app = app_module.build_app(ServeConfig(registry=str(tmp_path)))
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "authentication is OFF" in warnings[0]
    assert app._bound_deployment.init_kwargs["auth"] == {
        "api": [], "admin": [], "api_file": None, "admin_file": None}


def test_tokens_reach_the_ingress_as_digests(built, monkeypatch):
    app_module, records, tmp_path = built
    (tmp_path / "api").write_text(API + "\n")
    monkeypatch.setenv("TUNESERVE_ADMIN_TOKEN", ADMIN_T)
    app = app_module.build_app(ServeConfig(registry=str(tmp_path),
                                           api_token_file=str(tmp_path / "api")))
    assert not [r for r in records if r.levelno >= logging.WARNING]
    sent = app._bound_deployment.init_kwargs["auth"]
    assert sent == Tokens.from_values(API, ADMIN_T, str(tmp_path / "api")).as_dict()
    assert API not in str(sent) and ADMIN_T not in str(sent)
    assert all(API not in r.getMessage() and ADMIN_T not in r.getMessage() for r in records)


def test_app_builder_takes_token_files(monkeypatch):
    """A RayService passes ServeConfig fields as application args."""
    from services.serving import app as app_module

    monkeypatch.setattr(app_module, "build_app", lambda cfg: cfg)
    cfg = app_module.app_builder({"registry": "/data/registry",
                                  "api_token_file": "/secrets/api",
                                  "admin_token_file": "/secrets/admin"})
    assert cfg.api_token_file == "/secrets/api" and cfg.admin_token_file == "/secrets/admin"


def test_serve_flags():
    from services.cli import build_parser

    args = build_parser().parse_args(["serve", "--api-token-file", "/s/api",
                                      "--admin-token-file", "/s/admin"])
    assert args.api_token_file == "/s/api" and args.admin_token_file == "/s/admin"


class FakeClient:
    made: list[dict] = []

    def __init__(self, address, **kwargs):
        FakeClient.made.append(kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def classify(self, model, texts, version="", routing_key=""):
        return pb.ClassifyResponse(
            results=[pb.Classification(label="pos", score=1.0) for _ in texts],
            model=model, version="v1")

    def unpin(self, model):
        return admin_pb.AdminResponse(model=model, channel="pin")


@pytest.fixture
def fake_client(monkeypatch):
    import services.client

    FakeClient.made = []
    monkeypatch.setattr(services.client, "Client", FakeClient)
    return FakeClient


def test_cli_token_files(fake_client, tmp_path, capsys):
    from services.cli import main

    (tmp_path / "api").write_text(API + "\n")
    (tmp_path / "admin").write_text(ADMIN_T + "\n")
    assert main(["classify", "--address", "h:1", "--model", "m", "--token-file",
                 str(tmp_path / "api"), "hello"]) == 0
    assert main(["models", "unpin", "--address", "h:1", "--token-file",
                 str(tmp_path / "admin"), "m"]) == 0
    assert fake_client.made[0]["token"] == API
    assert fake_client.made[1]["admin_token"] == ADMIN_T
    # Without --token-file the Client reads the environment itself.
    assert main(["classify", "--address", "h:1", "--model", "m", "hello"]) == 0
    assert fake_client.made[2]["token"] is None
    out = capsys.readouterr()
    assert API not in out.out + out.err and ADMIN_T not in out.out + out.err


def test_cli_token_file_errors(fake_client, tmp_path, capsys):
    from services.cli import main

    assert main(["classify", "--address", "h:1", "--model", "m", "--token-file",
                 str(tmp_path / "missing"), "hello"]) == 2
    assert "token file not found" in capsys.readouterr().err
    assert main(["models", "unpin", "--token-file", str(tmp_path / "x"), "m"]) == 2
    assert "only with --address" in capsys.readouterr().err


def test_client_reads_tokens_from_the_environment(monkeypatch):
    from services.client import Client

    monkeypatch.setenv("TUNESERVE_API_TOKEN", API)
    monkeypatch.setenv("TUNESERVE_ADMIN_TOKEN", ADMIN_T)
    with Client("127.0.0.1:1", application="app") as client:
        assert ("authorization", f"Bearer {API}") in client._metadata
        assert ("authorization", f"Bearer {ADMIN_T}") in client._admin_metadata
        assert client._health_metadata == [("application", "app")]
    monkeypatch.delenv("TUNESERVE_API_TOKEN")
    with Client("127.0.0.1:1") as client:  # the admin token may call Inference too
        assert client._metadata == [("authorization", f"Bearer {ADMIN_T}")]
    with Client("127.0.0.1:1", token="", admin_token="") as client:
        assert client._metadata == [] and client._admin_metadata == []
