"""`prepare_model_ref`: a bad `--model` fails at once with a message naming it.

The Hub cases run in a subprocess against a local HTTP server standing in for the
Hugging Face Hub (HF_ENDPOINT is read when huggingface_hub is imported), answering the
way the Hub does: 404 with `X-Error-Code: RepoNotFound`, 401 `GatedRepo`, 404
`EntryNotFound`, 200 with the commit headers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.core.errors import ConfigError
from services.core.modeling import prepare_model_ref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_local_folder_needs_a_config(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(ConfigError, match=r"model '.*model': the folder has no config.json"):
        prepare_model_ref(str(tmp_path / "model"))
    (tmp_path / "model" / "config.json").write_text("{}")
    assert prepare_model_ref(str(tmp_path / "model")) == str((tmp_path / "model").resolve())


def test_a_relative_folder_becomes_absolute(tmp_path, monkeypatch):
    """Ray's workers run elsewhere: they get the folder's absolute path."""
    (tmp_path / "models" / "bert").mkdir(parents=True)
    (tmp_path / "models" / "bert" / "config.json").write_text("{}")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert prepare_model_ref("../models/bert") == str((tmp_path / "models/bert").resolve())


def test_a_file_or_a_missing_path_is_named(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="is a file; pass the folder"):
        prepare_model_ref(str(tmp_path / "weights.bin"))
    for ref in (str(tmp_path / "missing"), "./my-bert", "../models/bert", "a/b/c"):
        with pytest.raises(ConfigError, match=r"no such folder") as err:
            prepare_model_ref(ref, field="--model")
        assert str(err.value).startswith(f"--model {ref!r}")


def test_an_invalid_id_is_refused_without_the_network():
    with pytest.raises(ConfigError, match="nor a valid Hugging Face model id"):
        prepare_model_ref("bad id!!")


def test_offline_and_not_cached(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="not in the Hugging Face cache .* HF_HUB_OFFLINE is set"):
        prepare_model_ref("org/model")


def test_a_cached_model_needs_no_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "models--org--model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:1")
    assert prepare_model_ref("org/model") == "org/model"


class _Hub(BaseHTTPRequestHandler):
    answers = {
        "/org/missing/resolve/main/config.json": (404, "RepoNotFound"),
        "/org/gated/resolve/main/config.json": (401, "GatedRepo"),
        "/org/dataset-like/resolve/main/config.json": (404, "EntryNotFound"),
        "/org/broken/resolve/main/config.json": (403, None),
        "/org/good/resolve/main/config.json": (200, None),
    }
    seen: list[str] = []

    def do_HEAD(self):
        self.seen.append(self.path)
        code, error = self.answers.get(self.path, (404, "RepoNotFound"))
        self.send_response(code)
        if error:
            self.send_header("X-Error-Code", error)
        if code == 200:
            self.send_header("X-Repo-Commit", "0" * 40)
            self.send_header("ETag", '"e"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


SCRIPT = """
import json, sys
import huggingface_hub
from services.core.errors import ConfigError
from services.core.modeling import prepare_model_ref
fetched = []
huggingface_hub.snapshot_download = lambda ref, **kw: fetched.append([ref, kw["allow_patterns"]])
out = {}
for ref in sys.argv[1:]:
    try:
        out[ref] = ["ok", prepare_model_ref(ref)]
    except ConfigError as exc:
        out[ref] = ["error", str(exc)]
out["fetched"] = fetched
print(json.dumps(out))
"""


def _check(endpoint, refs, tmp_path):
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(tmp_path / "cache"),
               HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_TOKEN", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *refs], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hub_answers_become_clear_errors(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = _check(f"http://127.0.0.1:{server.server_port}",
                     ["org/missing", "org/gated", "org/dataset-like", "org/broken", "org/good"],
                     tmp_path)
    finally:
        server.shutdown()
    assert out["org/missing"][0] == "error"
    assert "no such model on the Hugging Face Hub" in out["org/missing"][1]
    assert "private model needs HF_TOKEN" in out["org/missing"][1]
    assert "gated model" in out["org/gated"][1] and "HF_TOKEN" in out["org/gated"][1]
    assert "holds no config.json" in out["org/dataset-like"][1]
    assert out["org/broken"][1].startswith("model 'org/broken': the Hugging Face Hub answered HTTP 403")
    # found: fetched once, safetensors and no pickle weights
    assert out["org/good"] == ["ok", "org/good"]
    assert [ref for ref, _ in out["fetched"]] == ["org/good"]
    patterns = out["fetched"][0][1]
    assert "*.safetensors" in patterns and not any(p.endswith((".bin", ".pt")) for p in patterns)
    # one request each: no retries
    assert sorted(_Hub.seen) == sorted(_Hub.answers)


def test_an_unreachable_hub_fails_at_once(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _check(f"http://127.0.0.1:{port}", ["org/model"], tmp_path)
    status, message = out["org/model"]
    assert status == "error"
    assert "is not in the Hugging Face cache" in message
    assert f"the Hub (http://127.0.0.1:{port}) cannot be reached" in message
    assert "Pass a local folder" in message
    assert out["fetched"] == []


def test_generation_needs_a_causal_lm(tmp_path):
    """An encoder loads as a 'causal LM' too, and would see what it predicts."""
    from transformers import BertConfig, GPT2Config, T5Config

    from services.core.modeling import check_causal_lm

    def folder(name, config):
        config.save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    tiny = dict(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=8)
    with pytest.raises(ConfigError, match=r"model '.*bert' is an encoder \(bert, a masked "
                                          r"LM\).*is_decoder: true"):
        check_causal_lm(folder("bert", BertConfig(**tiny)))
    check_causal_lm(folder("bert-decoder", BertConfig(is_decoder=True, **tiny)))
    check_causal_lm(folder("gpt2", GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=50)))
    with pytest.raises(ConfigError, match=r"is an encoder-decoder model \(t5\)"):
        check_causal_lm(folder("t5", T5Config(d_model=8, num_layers=1, num_heads=2)))
    check_causal_lm(str(tmp_path / "no-config-here"))  # left to the loader's own error
