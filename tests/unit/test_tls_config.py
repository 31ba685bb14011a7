"""TLS settings of `tuneserve serve` (ServeConfig's TLS files): the files are checked
before anything starts, naming the flag, and TLS selects the layout that can terminate
it (replica_grpc), saying so. Client-side flags are refused where no server is called."""

from __future__ import annotations

import pytest

from services.cli import build_parser, main
from services.cli.serve import serve_config
from services.core.config import ServeConfig
from services.core.errors import ConfigError
from tests.tls_certs import Pki


@pytest.fixture
def pki(tmp_path):
    return Pki(tmp_path)


def _serve_args(tmp_path, *flags: str):
    return build_parser().parse_args(["serve", "--registry", str(tmp_path / "reg"), *flags])


def test_tls_with_the_default_layout(pki, tmp_path, capsys):
    cert, key = pki.issue("server")
    cfg = serve_config(_serve_args(tmp_path, "--tls-cert", cert, "--tls-key", key,
                                   "--tls-client-ca", pki.ca_file, "--num-replicas", "2"))
    assert cfg.replica_grpc and cfg.colocate and cfg.tls_client_ca_file == pki.ca_file
    assert cfg.replica_grpc_server()["tls"]["cert_file"] == cert
    assert capsys.readouterr().err == ""
    cfg = serve_config(_serve_args(tmp_path, "--tls-cert", cert, "--tls-key", key,
                                   "--layout", "models"))
    assert cfg.replica_grpc and not cfg.colocate


@pytest.mark.parametrize("layout", ["proxy", "direct"])
def test_tls_refuses_the_layouts_that_cannot_serve_it(pki, tmp_path, capsys, layout):
    cert, key = pki.issue("server")
    assert main(["serve", "--registry", str(tmp_path / "reg"), "--tls-cert", cert,
                 "--tls-key", key, "--layout", layout]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "'layout'" in err and "34103" in err
    assert "--layout colocated or models" in err
    with pytest.raises(ConfigError, match="'(direct_ingress|replica_grpc)'.*"):
        ServeConfig(tls_cert_file=cert, tls_key_file=key,
                    direct_ingress=layout == "direct").validate()


@pytest.mark.parametrize("colocate", [False, True])
def test_tls_with_autoscaling(pki, colocate):
    """The model deployments, or the colocated ingress, autoscale behind the TLS
    servers."""
    cert, key = pki.issue("server")
    cfg = ServeConfig(replica_grpc=True, tls_cert_file=cert, tls_key_file=key,
                      colocate=colocate, min_replicas=1, max_replicas=3).validate()
    assert cfg.autoscaling_config()["max_replicas"] == 3
    assert cfg.replica_grpc_server()["tls"]["cert_file"] == cert


def test_tls_files_are_checked_naming_the_flag(pki, tmp_path):
    cert, key = pki.issue("server")
    other_cert, other_key = pki.issue("other")
    (tmp_path / "junk.pem").write_text("not a certificate")
    encrypted = tmp_path / "enc.key"
    encrypted.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n"
                         "-----END ENCRYPTED PRIVATE KEY-----\n")
    cases = [
        ({"tls_cert_file": str(tmp_path / "none.pem"), "tls_key_file": key},
         r"'tls_cert_file'.*--tls-cert .*none.pem: cannot read"),
        ({"tls_cert_file": cert, "tls_key_file": other_key},
         r"'tls_key_file'.*--tls-key .*does not match the certificate"),
        ({"tls_cert_file": str(tmp_path / "junk.pem"), "tls_key_file": key},
         r"--tls-cert .*junk.pem: no PEM certificate"),
        ({"tls_cert_file": cert, "tls_key_file": str(encrypted)}, r"--tls-key .*encrypted"),
        ({"tls_cert_file": cert}, r"--tls-key is needed with --tls-cert"),
        ({"tls_client_ca_file": pki.ca_file}, r"--tls-cert is needed with --tls-client-ca"),
        ({"tls_cert_file": cert, "tls_key_file": key,
          "tls_client_ca_file": str(tmp_path / "junk.pem")}, r"--tls-client-ca .*no PEM"),
        ({"tls_cert_file": cert, "tls_key_file": key}, r"'replica_grpc'.*34103"),
    ]
    for settings, needle in cases:
        layout = {"replica_grpc": True} if "'replica_grpc'" not in needle else {}
        with pytest.raises(ConfigError, match=needle):
            ServeConfig(**layout, **settings).validate()
    assert ServeConfig(replica_grpc=True, tls_cert_file=other_cert, tls_key_file=other_key,
                       tls_client_ca_file=pki.ca_file).validate()


def test_cli_reports_a_bad_tls_file_before_anything_starts(pki, tmp_path, capsys):
    cert, _ = pki.issue("server")
    assert main(["serve", "--registry", str(tmp_path / "reg"), "--tls-cert", cert,
                 "--tls-key", str(tmp_path / "missing.key")]) == 2
    err = capsys.readouterr().err
    assert "--tls-key" in err and "missing.key" in err and "Traceback" not in err


def test_client_tls_flags_need_a_server_address(pki, tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("text,label\nhi,pos\n")
    assert main(["eval", "--data", str(data), "--model", "m", "--tls-ca",
                 pki.ca_file]) == 2
    assert "--tls-ca" in capsys.readouterr().err
    assert main(["models", "promote", "m", "v1", "--tls-ca", pki.ca_file]) == 2
    assert "--tls-ca: only with --address" in capsys.readouterr().err
    for command in (["classify", "--model", "m", "x"], ["generate", "--model", "g", "x"],
                    ["models", "pin", "m", "v1"], ["eval", "--data", "d", "--model", "m"]):
        args = build_parser().parse_args([*command, "--tls-ca", "ca.pem", "--tls-cert",
                                          "c.pem", "--tls-key", "c.key", "--tls"])
        assert (args.tls_ca, args.tls_cert, args.tls_key, args.tls) == \
            ("ca.pem", "c.pem", "c.key", True)
