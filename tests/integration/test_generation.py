"""Generation end to end: the tiny GPT-2 fine-tuned (SFT) by 2 Ray Train workers,
published next to the classifier, served by the session's Serve app, called over a
real gRPC channel: Generate, GenerateStream, cancellation, validation, CLI."""

import json
import math
import threading
import time

import grpc
import pytest

from tests.helpers import poll_until

from services.cli import main
from services.core.modeling import GENERATION_FILE
from services.protocol import pb
from services.core.registry import Registry
from services.serving.app import APP_NAME, model_deployment_name
from tests.conftest import GEN_MODEL
from tests.helpers import GEN_TEMPLATE, toy_generation_pairs

pytestmark = pytest.mark.timeout(600)

PAIRS = toy_generation_pairs()
LONG = dict(max_new_tokens=1000, ignore_eos=True)  # ~1000 tokens: seconds of work


@pytest.fixture(scope="module")
def tokenizer(trained_generator):
    from services.core.modeling import load_tokenizer

    cfg, result = trained_generator
    return load_tokenizer(str(Registry(cfg.registry).local_copy(GEN_MODEL, result.version)))


def gen_status() -> dict:
    """The generator replica's status (tests using it first wait for one replica)."""
    from ray import serve

    handle = serve.get_deployment_handle(model_deployment_name(GEN_MODEL), APP_NAME)
    return handle.status.remote().result(timeout_s=30)


def wait_for(predicate, timeout_s: float = 60, poll_s: float = 0.1):
    value = poll_until(predicate, timeout_s, poll_s)
    assert value, f"condition not met within {timeout_s}s"
    return value


def one_idle_replica() -> dict:
    """Wait until the generator runs on one replica with nothing in flight."""
    from ray import serve

    def settled():
        app = serve.status().applications[APP_NAME]
        states = app.deployments[model_deployment_name(GEN_MODEL)].replica_states
        if states.get("RUNNING", 0) != 1 or sum(states.values()) != 1:
            return None
        status = gen_status()
        return status if status["generating"] == 0 else None

    return wait_for(settled, timeout_s=120, poll_s=0.5)


def test_sft_learns_and_publishes(trained_generator):
    cfg, result = trained_generator
    evals = [e for e in result.history if e["type"] == "eval"]
    assert len(evals) == cfg.epochs
    assert all("eval_perplexity" in e for e in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] / 5
    assert evals[-1]["eval_perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    # the epoch's last step closes the logging window even off the log_every_steps
    # grid, so every epoch has its train loss (an epoch shorter than the grid had none)
    from services.training.tracking import epoch_rows

    assert evals[0]["step"] % cfg.log_every_steps != 0
    logged = {e["step"] for e in result.history if e["type"] == "step"}
    assert {e["step"] for e in evals} <= logged
    assert all(row["train_loss"] is not None for row in epoch_rows(result.history))
    assert result.version == "v1" and result.promoted
    reg = Registry(cfg.registry)
    m = reg.verify(GEN_MODEL, "v1")
    assert m["task"] == "generation" and m["labels"] == []
    assert m["prompt_template"] == GEN_TEMPLATE == m["config"]["prompt_template"]
    assert set(m["metrics"]) == {"loss", "perplexity"}
    assert m["metrics"]["loss"] == min(e["eval_loss"] for e in evals)
    assert m["data"]["train"]["rows"] == 6 * len(PAIRS) and m["data"]["eval"]["rows"] == len(PAIRS)
    saved = json.loads((reg.local_copy(GEN_MODEL, "v1") / GENERATION_FILE).read_text())
    assert saved["prompt_template"] == GEN_TEMPLATE and GENERATION_FILE in m["files"]


def test_generate_reproduces_every_training_pair_concurrently(server, tokenizer):
    """Greedy decoding gives back each response (masking and template are right);
    36 concurrent calls also exercise batching with per-request parameters."""
    results = {}

    def call(i, prompt):
        results[i] = server.generate(GEN_MODEL, prompt, max_new_tokens=30)

    threads = [threading.Thread(target=call, args=(i, p)) for i, (p, _) in enumerate(PAIRS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, (prompt, response) in enumerate(PAIRS):
        r = results[i]
        assert (r.text, r.finish_reason) == (response, "eos"), prompt
        assert r.model == GEN_MODEL and r.version == "v1"
        assert r.prompt_tokens == len(tokenizer(GEN_TEMPLATE.format(prompt=prompt))["input_ids"])
        assert r.completion_tokens == len(tokenizer(response)["input_ids"]) + 1  # + EOS


def test_finish_reasons_and_stop_strings(server):
    prompt, response = PAIRS[0]  # "red cat" -> " the red cat says meow."
    r = server.generate(GEN_MODEL, prompt, max_new_tokens=2)
    assert (r.text, r.finish_reason, r.completion_tokens) == (" the red", "length", 2)
    r = server.generate(GEN_MODEL, prompt, stop=[" says"])
    assert (r.text, r.finish_reason) == (" the red cat", "stop")
    r = server.generate(GEN_MODEL, prompt, stop=["meow", " cat"])  # the earliest wins
    assert (r.text, r.finish_reason) == (" the red", "stop")
    r = server.generate(GEN_MODEL, prompt, stop=["xyz", "."])
    assert (r.text, r.finish_reason) == (" the red cat says meow", "stop")
    r = server.generate(GEN_MODEL, prompt, stop=["not there"])
    assert (r.text, r.finish_reason) == (response, "eos")
    r = server.generate(GEN_MODEL, prompt, max_new_tokens=40, ignore_eos=True)
    assert r.finish_reason == "length" and r.completion_tokens == 40
    assert r.text.startswith(response)
    assert server.generate(GEN_MODEL, "😀 ✓ 日本語 \u202e", max_new_tokens=5).completion_tokens <= 5


def test_stream_chunks_add_up_and_arrive_early(server):
    prompt, response = PAIRS[7]
    chunks = list(server.generate_stream(GEN_MODEL, prompt, stop=["says"]))
    assert "".join(c.text for c in chunks) == response[:response.index("says")]
    assert [c.finish_reason for c in chunks] == [""] * (len(chunks) - 1) + ["stop"]
    assert all(c.model == GEN_MODEL and c.version == "v1" for c in chunks)
    assert chunks[-1].completion_tokens == server.generate(
        GEN_MODEL, prompt, stop=["says"]).completion_tokens

    started = time.monotonic()
    stream = server.generate_stream(GEN_MODEL, prompt, max_new_tokens=400, ignore_eos=True)
    first = next(stream)
    first_s = time.monotonic() - started
    rest = list(stream)
    total_s = time.monotonic() - started
    assert first.text and len(rest) >= 5
    assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 400
    assert first_s < total_s / 4, (first_s, total_s)
    unary = server.generate(GEN_MODEL, prompt, max_new_tokens=400, ignore_eos=True)
    assert first.text + "".join(c.text for c in rest) == unary.text


def test_seeded_sampling_is_deterministic(server):
    prompt = PAIRS[3][0]
    params = dict(temperature=1.5, top_p=0.95, top_k=40, max_new_tokens=30, ignore_eos=True)
    a = server.generate(GEN_MODEL, prompt, seed=1234, **params).text
    assert server.generate(GEN_MODEL, prompt, seed=1234, **params).text == a
    streamed = "".join(c.text for c in server.generate_stream(GEN_MODEL, prompt, seed=1234,
                                                              **params))
    assert streamed == a
    others = {server.generate(GEN_MODEL, prompt, seed=s, **params).text for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds gave the same text every time"
    # Concurrent requests with other parameters do not change a seeded request's text.
    out = {}
    threads = [threading.Thread(target=lambda: out.setdefault("a", server.generate(
        GEN_MODEL, prompt, seed=1234, **params).text))]
    threads += [threading.Thread(target=lambda p=p: server.generate(GEN_MODEL, p))
                for p, _ in PAIRS[:4]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out["a"] == a


def test_concurrent_requests_are_batched(server):
    before = one_idle_replica()
    results = [None] * 8

    def call(i):
        kw = dict(temperature=0.7, seed=i + 1) if i % 2 else {}
        results[i] = server.generate(GEN_MODEL, PAIRS[i][0], max_new_tokens=30, **kw)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = gen_status()
    assert [r.text for r in results[::2]] == [PAIRS[i][1] for i in range(0, 8, 2)]
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == 8 and batches < requests, (requests, batches)
    # the replica batches continuously (ServeConfig.generation_batching's default):
    # the tiny GPT-2 passed the check at load
    assert after["batching"] == "continuous"
    # ... and says so in ListModels (classifiers: empty)
    info = {m.name: m for m in server.list_models().models}
    assert {r.batching for r in info[GEN_MODEL].replicas} == {"continuous"}
    assert {r.batching for r in info["toy"].replicas} == {""}
    # the session's classifiers run traced (ServeConfig.trace's default); generators never
    assert {r.torchscript for r in info["toy"].replicas} == {True}
    assert {r.torchscript for r in info[GEN_MODEL].replicas} == {False}


def _finished_job(before: dict) -> dict:
    """Wait for the generator to have finished one more request; return its record."""
    status = wait_for(lambda: (s := gen_status())["requests"] > before["requests"]
                      and s["generating"] == 0 and s)
    assert status["requests"] == before["requests"] + 1
    return status["recent"][-1]


def observe_cancellation(abandon, attempts: int = 3) -> dict:
    """Start a long generation and abandon it (`abandon` returns the client's status
    code); return the server's record of it once it stopped early.

    With Ray Serve 2.60's gRPC proxy, about 1 cancellation in 30 never reaches the
    replicas (they see no cancel at all; most likely the proxy's handler is cancelled
    while it writes a message to the client, outside the generator that holds the
    replica call) and that generation runs to max_new_tokens. So one attempt may see
    that; three in a row do not unless cancellation does not work."""
    seen = []
    for _ in range(attempts):
        before = one_idle_replica()
        code = abandon()
        job = _finished_job(before)
        seen.append((code, job))
        if job["finish_reason"] == "cancelled":
            # well before its end: how far it got depends on how fast this machine
            # generates (a 0.5 s deadline is about half of LONG on a quiet 2-core one)
            assert job["completion_tokens"] < 0.9 * job["max_new_tokens"], job
            return job
    raise AssertionError(f"generation never stopped early: {seen}")


def test_client_cancelling_a_stream_stops_generation(server):
    def abandon():
        stream = server.generate_stream(GEN_MODEL, PAIRS[0][0], **LONG)
        assert next(stream).text
        stream.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.CANCELLED
        return err.value.code()

    observe_cancellation(abandon)


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_deadline_stops_generation(server, method):
    def abandon():
        request = pb.GenerateRequest(model=GEN_MODEL, prompt=PAIRS[1][0], **LONG)
        with pytest.raises(grpc.RpcError) as err:
            call = getattr(server.inference, method)(request, timeout=0.5)
            if method == "GenerateStream":
                list(call)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        return err.value.code()

    observe_cancellation(abandon)


@pytest.mark.parametrize("kw,needle", [
    (dict(prompt=""), "prompt"),
    (dict(prompt="cat " * 1100), "prompt: "),  # more tokens than the model's context
    (dict(prompt="x" * 20_001), "prompt: 20001 characters"),
    (dict(prompt="a\x00b"), "prompt"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=1025), "max_new_tokens: 1025; the limit is 1024"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop: 5 strings; the limit is 4"),
    (dict(stop=["x" * 65]), "stop[0]"),
    (dict(stop=["ok", ""]), "stop[1]"),
    (dict(version="latest"), "version"),
    (dict(model=""), "model"),
    (dict(model="../x"), "model"),
])
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_invalid_parameters_name_the_field(server, method, kw, needle):
    request = pb.GenerateRequest(**{"model": GEN_MODEL, "prompt": "red cat", **kw})
    with pytest.raises(grpc.RpcError) as err:
        call = getattr(server.inference, method)(request, timeout=30)
        if method == "GenerateStream":
            list(call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    details = err.value.details()
    assert needle in details and "Traceback" not in details


def test_wrong_task_and_unknown_version(server):
    with pytest.raises(grpc.RpcError) as err:
        server.classify(GEN_MODEL, ["red cat"])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "use Generate" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        server.generate(GEN_MODEL, "red cat", version="v9")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "v9" in err.value.details()
    assert server.generate(GEN_MODEL, "red cat", version="v1").version == "v1"


def test_list_models_shows_the_generator(server):
    (info,) = server.list_models(GEN_MODEL).models
    assert info.task == "generation" and list(info.serving_versions) == ["v1"]
    assert set(info.versions[0].metrics) == {"loss", "perplexity"}


def test_cli_generate(server, capsys):
    prompt, response = PAIRS[2]
    assert main(["generate", "--address", server.address, "--model", GEN_MODEL, prompt]) == 0
    out = capsys.readouterr()
    assert out.out == response + "\n" and "finish: eos" in out.err
    assert main(["generate", "--address", server.address, "--model", GEN_MODEL, "--stream",
                 "--max-new-tokens", "3", prompt]) == 0
    out = capsys.readouterr()
    assert out.out == " the green cat\n" and "3 generated tokens, finish: length" in out.err
    assert main(["generate", "--address", server.address, "--model", GEN_MODEL, "--json",
                 "--stop", " says", "--temperature", "0.5", "--seed", "3", prompt]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["finish_reason"] in ("stop", "eos") and row["version"] == "v1"
    assert main(["generate", "--address", server.address, "--model", GEN_MODEL,
                 "--top-p", "0", prompt]) == 2
    assert "INVALID_ARGUMENT: top_p" in capsys.readouterr().err
