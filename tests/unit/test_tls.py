"""TLS and mutual TLS on the ingress replica's own gRPC server (ServeConfig's TLS
files), without Ray: the harness of test_replica_grpc.py (a real InferenceIngress over
fake models, served by ReplicaGrpcServer on loopback) with certificates made in the
test, called by the real Client. A certificate replaced on disk reaches new
connections without a restart."""

from __future__ import annotations

import os
import socket
import ssl

import grpc
import pytest

from services.cli import main
from services.client import Client
from services.core.auth import Tokens
from services.core.config import ServeConfig
from services.core.errors import ConfigError, InvalidInput
from services.core.net import free_port
from services.serving.colocated import LocalModel
from services.serving.replica_grpc import CertificateFiles
from tests.tls_certs import Pki, serial_of
from tests.unit.test_replica_grpc import Board, LoopThread, Model


@pytest.fixture
def pki(tmp_path):
    return Pki(tmp_path)


@pytest.fixture
def tls_server(tmp_path, pki):
    """make(client_ca=False) starts a TLS server on a fresh port; returns its port."""
    from services.serving.ingress import InferenceIngress

    (tmp_path / "registry").mkdir()
    loop, made = LoopThread(), []
    cert, key = pki.issue("server", serial=1001)

    def make(client_ca: bool = False, health_port: int = None) -> int:
        port = free_port()
        tls = {"cert_file": cert, "key_file": key,
               "client_ca_file": pki.ca_file if client_ca else None}

        async def build():
            ingress = InferenceIngress(
                str(tmp_path / "registry"), {"m": LocalModel(Model())},
                {"m": "classification"}, {"max_request_bytes": 4096}, board=Board(),
                auth=Tokens.from_values(None, None).as_dict(),
                grpc_server={"host": "127.0.0.1", "port": port,
                             "max_receive_bytes": 8192, "tls": tls},
                health_server=None if health_port is None else
                {"host": "127.0.0.1", "port": health_port, "max_receive_bytes": 4096})
            made.append(ingress)
        loop.call(build)
        return port

    yield {"make": make, "cert": cert, "key": key}
    for ingress in made:
        loop.call(lambda: ingress.__del__() or _sleep0())
    loop.close()


async def _sleep0():
    pass


def _classify(port: int, **tls) -> str:
    with Client(f"127.0.0.1:{port}", token="", timeout_s=5, **tls) as client:
        return client.classify("m", ["good"]).results[0].label


def _refused(port: int, **tls) -> str:
    with pytest.raises(grpc.RpcError) as err:
        _classify(port, **tls)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    return err.value.details() or ""


def _served_serial(port: int, pki: Pki, client: tuple[str, str] = None) -> int:
    """The serial of the certificate a new TLS connection is served."""
    ctx = ssl.create_default_context(cafile=pki.ca_file)
    ctx.set_alpn_protocols(["h2"])
    if client:
        ctx.load_cert_chain(*client)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        return serial_of(tls.getpeercert(binary_form=True))


def test_tls_needs_the_ca_and_plaintext_is_refused(tls_server, pki):
    port = tls_server["make"]()
    assert _classify(port, tls_ca=pki.ca_file) == "pos"
    assert "handshake" in _refused(port, tls=True).lower()  # the system's CAs: unknown
    _refused(port)  # plaintext
    (pki.folder / "other").mkdir()
    other = Pki(pki.folder / "other")
    assert "handshake" in _refused(port, tls_ca=other.ca_file).lower()


def test_mutual_tls_needs_a_client_certificate_the_ca_signed(tls_server, pki, tmp_path):
    port = tls_server["make"](client_ca=True)
    client_cert, client_key = pki.issue("client", server=False)
    assert _classify(port, tls_ca=pki.ca_file, tls_cert=client_cert,
                     tls_key=client_key) == "pos"
    _refused(port, tls_ca=pki.ca_file)  # no client certificate
    (tmp_path / "rogue").mkdir()
    rogue_cert, rogue_key = Pki(tmp_path / "rogue").issue("client", server=False)
    _refused(port, tls_ca=pki.ca_file, tls_cert=rogue_cert, tls_key=rogue_key)


def test_a_certificate_replaced_on_disk_is_served_to_new_connections(tls_server, pki):
    port = tls_server["make"](client_ca=True)
    client = pki.issue("client", server=False)
    assert _served_serial(port, pki, client) == 1001
    with Client(f"127.0.0.1:{port}", token="", timeout_s=5, tls_ca=pki.ca_file,
                tls_cert=client[0], tls_key=client[1]) as before:
        assert before.classify("m", ["x"]).results[0].label == "pos"
        # as a renewed Secret: a new pair from the same CA, both files at once
        new_cert, new_key = pki.issue("renewed", serial=2002)
        os.replace(new_cert, tls_server["cert"])
        os.replace(new_key, tls_server["key"])
        assert _served_serial(port, pki, client) == 2002
        assert _classify(port, tls_ca=pki.ca_file, tls_cert=client[0],
                         tls_key=client[1]) == "pos"
        assert before.classify("m", ["x"]).results[0].label == "pos"  # still open


def test_files_that_do_not_load_keep_the_previous_certificate(pki, caplog):
    cert, key = pki.issue("server", serial=7)
    files = CertificateFiles(cert, key)
    assert files.fetch() is None  # unchanged
    with open(key, "w") as half_written:
        half_written.write("-----BEGIN PRIVATE KEY-----\n")
    assert files.fetch() is None and "do not load" in caplog.text
    new_cert, new_key = pki.issue("new", serial=8)
    os.replace(new_key, key)
    os.replace(new_cert, cert)
    assert files.fetch() is not None and files.fetch() is None
    with pytest.raises(ConfigError, match="--tls-key"):
        CertificateFiles(cert, str(pki.folder / "missing.key"))


def test_client_tls_arguments_are_checked(pki):
    with pytest.raises(InvalidInput, match="tls_ca.*--tls-ca.*cannot read"):
        Client("127.0.0.1:1", tls_ca=str(pki.folder / "none.pem"))
    with pytest.raises(InvalidInput, match="give both"):
        Client("127.0.0.1:1", tls_cert=pki.ca_file)
    with pytest.raises(InvalidInput, match="not a PEM"):
        (pki.folder / "x.txt").write_text("hello")
        Client("127.0.0.1:1", tls_ca=str(pki.folder / "x.txt"))


def test_cli_reports_a_failed_handshake_as_such(tls_server, pki, capsys, tmp_path):
    port = tls_server["make"]()
    (tmp_path / "other").mkdir()
    wrong_ca = Pki(tmp_path / "other").ca_file
    assert main(["classify", "--address", f"127.0.0.1:{port}", "--model", "m",
                 "--timeout-s", "5", "--tls-ca", wrong_ca, "good"]) == 1
    err = capsys.readouterr().err
    assert "TLS handshake" in err and "--tls-ca" in err and "Traceback" not in err
    assert main(["classify", "--address", f"127.0.0.1:{port}", "--model", "m",
                 "--timeout-s", "5", "--tls-ca", pki.ca_file, "--json", "good"]) == 0
    assert '"label": "pos"' in capsys.readouterr().out


def test_replica_grpc_server_settings_carry_absolute_tls_paths(pki, monkeypatch):
    cert, key = pki.issue("server")
    monkeypatch.chdir(pki.folder)
    cfg = ServeConfig(replica_grpc=True, tls_cert_file=os.path.basename(cert),
                      tls_key_file=os.path.basename(key)).validate()
    assert cfg.replica_grpc_server()["tls"] == {"cert_file": cert, "key_file": key,
                                                "client_ca_file": None}


def test_the_health_port_answers_health_alone_in_plaintext(tls_server, pki):
    """ServeConfig.health_port: what a Kubernetes gRPC probe (no TLS) can ask of the
    pod's own replica while its API port wants mutual TLS; nothing else is served."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health_port = free_port()
    port = tls_server["make"](client_ca=True, health_port=health_port)
    _refused(port)  # the API port: plaintext refused
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for service in ("", "tuneserve.v1.Inference"):
            answer = check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        for method in ("/tuneserve.v1.Inference/Classify", "/tuneserve.v1.Admin/Promote"):
            call = channel.unary_unary(method, request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as err:
                call(b"", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, method


def test_health_port_settings(pki):
    from services.core.config import ServeConfig
    from services.core.errors import ConfigError

    cert, key = pki.issue("server")
    cfg = ServeConfig(replica_grpc=True, grpc_port=9001, health_port=9002,
                      tls_cert_file=cert, tls_key_file=key).validate()
    server = cfg.health_grpc_server()
    assert server["port"] == 9002 and "tls" not in server  # plaintext, for probes
    assert ServeConfig().health_grpc_server() is None  # off unless given
    for kwargs, needle in (({"health_port": 9000}, "'health_port'.*grpc port"),
                           ({"health_port": 9100, "admin_port": 9100},
                            "'health_port'.*admin port"),
                           ({"health_port": 0}, "'health_port'")):
        with pytest.raises(ConfigError, match=needle):
            ServeConfig(grpc_port=9000, **kwargs).validate()
