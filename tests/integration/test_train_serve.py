"""Train the tiny BERT with 2 Ray Train workers, publish, serve through Serve's real
gRPC proxy, and call it over a real channel."""

import json
import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli import main
from services.protocol import pb
from services.core.registry import Registry

pytestmark = pytest.mark.timeout(900)


def test_training_learns_and_publishes(trained):
    cfg, result = trained
    steps = [e for e in result.history if e["type"] == "step"]
    evals = [e for e in result.history if e["type"] == "eval"]
    assert len(evals) == cfg.epochs
    assert steps[-1]["loss"] < steps[0]["loss"], "training loss did not fall"
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert result.metrics["accuracy"] >= 0.9
    assert result.version == "v1" and result.promoted
    reg = Registry(cfg.registry)
    m = reg.verify("toy", "v1")
    assert m["labels"] == ["negative", "positive"]
    assert m["task"] == "classification"
    assert m["config"]["workers"] == 2 and m["config"]["seed"] == 1
    assert m["data"]["train"]["sha256"] and m["data"]["split"]["eval_rows"] == 20
    assert m["metrics"]["accuracy"] == result.metrics["accuracy"]
    assert "model.safetensors" in m["files"]
    assert not any(f.endswith((".bin", ".pt")) for f in m["files"])
    assert sum(sum(r) for r in m["confusion_matrix"]) == 20
    config = json.loads((reg.local_copy("toy", "v1") / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}


def test_classify_over_grpc(server):
    resp = server.classify("toy", ["a superb film with lovely acting",
                                   "a dull story with awful acting"])
    assert resp.model == "toy" and resp.version == "v1"
    assert [r.label for r in resp.results] == ["positive", "negative"]
    for r in resp.results:
        assert 0.5 < r.score <= 1.0
        assert [s.label for s in r.scores][0] == r.label
        assert sum(s.score for s in r.scores) == pytest.approx(1.0, abs=1e-4)
    assert server.classify("toy", ["a good show"], version="v1").version == "v1"


def test_concurrent_classify_calls_are_coalesced_each_with_its_own_answer(server):
    """The ingress sends concurrent Classify calls to the model together
    (ServeConfig.coalesce, on by default): each caller still gets the answer for its
    own texts and the version it asked for."""
    import concurrent.futures

    long = " and ".join(["a lovely film with superb acting"] * 12)  # keeps calls busy
    texts = [["a superb film with lovely acting", long], ["a dull story with awful acting"],
             ["a good show", "a poor ending"], ["a brilliant script", long, long]] * 6

    def call(batch):
        resp = server.classify("toy", batch, version="v1" if len(batch) > 1 else "")
        return [r.label for r in resp.results], resp.version

    from ray import serve

    from services.serving.app import APP_NAME

    ingress = serve.get_app_handle(APP_NAME)
    alone = {tuple(b): call(b) for b in texts[:4]}
    before = ingress._coalescing.remote().result()["toy"]
    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
        together = list(pool.map(call, texts))
    after = ingress._coalescing.remote().result()["toy"]
    assert together == [alone[tuple(b)] for b in texts]
    # every request went through the coalescer, in fewer calls than requests (at most
    # two calls per replica are out at once, so 24 at once cannot all go alone)
    assert after["requests"] - before["requests"] == len(texts)
    assert after["calls"] - before["calls"] < len(texts)
    assert alone[("a dull story with awful acting",)] == (["negative"], "v1")


def test_direct_ingress_needs_a_cluster_started_with_it(server):
    """Ray reads direct ingress when a cluster starts: asking for it on a running
    cluster fails with a message naming the setting, before anything is deployed."""
    import dataclasses

    from services.core.errors import ConfigError
    from services.serving.app import start_serving

    with pytest.raises(ConfigError, match="'direct_ingress'.*RAY_SERVE_ENABLE_DIRECT_INGRESS=1"):
        start_serving(dataclasses.replace(server.serve_cfg, direct_ingress=True))


def test_health_serving_and_unknown_service(server):
    assert server.health() == "SERVING"
    assert server.health(service="") == "SERVING"
    stub = health_pb2_grpc.HealthStub(server.channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("kw,code,needle", [
    (dict(model="toy", texts=[]), "INVALID_ARGUMENT", "texts"),
    (dict(model="", texts=["x"]), "INVALID_ARGUMENT", "model"),
    (dict(model="toy", texts=["x" * 20_001]), "INVALID_ARGUMENT", "texts[0]"),
    (dict(model="toy", texts=["ok"] * 129), "INVALID_ARGUMENT", "limit is 128"),
    (dict(model="toy", texts=["a\x00b"]), "INVALID_ARGUMENT", "NUL"),
    (dict(model="nope", texts=["x"]), "NOT_FOUND", "nope"),
    (dict(model="../../etc", texts=["x"]), "INVALID_ARGUMENT", "model"),
    (dict(model="toy", texts=["x"], version="v7"), "NOT_FOUND", "v7"),
])
def test_bad_requests_get_clear_status(server, kw, code, needle):
    with pytest.raises(grpc.RpcError) as err:
        server.inference.Classify(pb.ClassifyRequest(**kw), timeout=30)
    assert err.value.code().name == code
    details = err.value.details()
    assert needle in details
    assert "Traceback" not in details and "/" not in details.replace("../../etc", "")


def test_odd_unicode_works(server):
    resp = server.classify("toy", ["😀 a good film ✓", "\u202egood\u200b", "日本語のテキスト"])
    assert len(resp.results) == 3


def test_generate_is_not_offered_for_a_classifier(server):
    for call in (lambda: server.generate("toy", "hello"),
                 lambda: list(server.generate_stream("toy", "hello"))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "use Classify" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        server.generate("nope", "hello")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_models(server):
    resp = server.list_models()
    assert "toy" in {m.name for m in resp.models}
    (info,) = server.list_models("toy").models
    assert info.name == "toy" and info.task == "classification"
    assert info.production_version == "v1" and list(info.serving_versions) == ["v1"]
    assert list(info.labels) == ["negative", "positive"]
    (v1,) = info.versions
    assert v1.channels == ["production"] and v1.metrics["accuracy"] >= 0.9
    with pytest.raises(grpc.RpcError) as err:
        server.list_models("nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    (resp,) = list(stub.ServerReflectionInfo(iter([req]), timeout=10))
    names = {s.name for s in resp.list_services_response.service}
    assert "tuneserve.v1.Inference" in names


def test_cli_classify_table_and_json(server, capsys):
    assert main(["classify", "--address", server.address, "--model", "toy",
                 "a superb film with lovely acting"]) == 0
    out = capsys.readouterr().out
    assert "positive" in out and "toy v1" in out
    assert main(["classify", "--address", server.address, "--model", "toy", "--json",
                 "a superb film with lovely acting", "a dull story with awful acting"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == ["positive", "negative"]
    assert rows[0]["version"] == "v1" and set(rows[0]["scores"]) == {"negative", "positive"}
    assert main(["classify", "--address", server.address, "--model", "nope", "x"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_cli_train_string_labels_jsonl(trained, tmp_path, capsys, tiny_model_dir, toy_rows,
                                      monkeypatch):
    """`tuneserve train` end to end on the session cluster, JSONL, separate eval file;
    every path relative to the working folder, which Ray's workers do not share."""
    cfg, _ = trained
    train = tmp_path / "topics.jsonl"
    evalf = tmp_path / "topics-eval.jsonl"
    with train.open("w") as fh:
        for text, label in toy_rows[:120]:
            fh.write(json.dumps({"sentence": text, "category": label.upper()}) + "\n")
    with evalf.open("w") as fh:
        for text, label in toy_rows[120:160]:
            fh.write(json.dumps({"sentence": text, "category": label.upper()}) + "\n")
    # One run (a Ray Train run costs ~25 s here), eval-gated: published, but not
    # promoted, even as the first version (the first version of a plain run is
    # promoted: the session's `trained` fixture). One epoch at the default learning
    # rate learns nothing here, so the learned-nothing gate refuses it before the
    # threshold does (the threshold's message: tests/unit/test_promotion_gate.py).
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--model", os.path.relpath(tiny_model_dir), "--train", train.name,
                 "--eval", evalf.name, "--label-column", "category", "--workers", "2",
                 "--epochs", "1", "--batch-size", "16", "--registry", "reg",
                 "--runs-dir", "runs", "--name", "topics", "--json",
                 "--promote", "--min-metric", "loss=0.0001"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["version"] == "v1" and not summary["promoted"]
    assert "no better than always predicting" in summary["promotion"]
    m = Registry(tmp_path / "reg").verify("topics", "v1")
    assert m["labels"] == ["NEGATIVE", "POSITIVE"]
    assert m["data"]["eval"]["rows"] == 40
    assert Registry(tmp_path / "reg").channel("topics") is None
