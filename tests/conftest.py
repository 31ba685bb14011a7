"""Session fixtures: one tiny model, one Ray cluster, one trained registry, one server.

The Ray cluster is started once per test session (8 logical CPUs on 2 cores: training
uses 2, the session's serving replicas hold about 2, and a streamed run's Ray Data tasks
get CPUs of their own beside them instead of running one at a time). Fixtures that need
Ray are only created when a test asks for them, so `pytest tests/unit` never starts Ray.

The image tests (tests/e2e/test_image.py) run last: their image builds in the background
from the moment the tests are collected.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from tests.helpers import (
    GEN_TEMPLATE,
    build_tiny_bert,
    build_tiny_gpt2,
    free_port,
    server_port,
    toy_generation_pairs,
    toy_sentiment_rows,
    write_csv,
    write_jsonl,
)


def _image_tests(items):
    return [item for item in items if item.path.parts[-2:] == ("e2e", "test_image.py")]


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected
def pytest_collection_modifyitems(config, items):
    image = _image_tests(items)
    if image:
        items[:] = [item for item in items if item not in image] + image


def pytest_collection_finish(session):
    image = _image_tests(session.items)
    if image and not session.config.option.collectonly:
        image[0].module.start_build()


@pytest.fixture(scope="session")
def toy_rows():
    return toy_sentiment_rows(200)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, toy_rows):
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), [t for t, _ in toy_rows])


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory, toy_rows):
    return write_csv(tmp_path_factory.mktemp("data") / "toy.csv", toy_rows)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from services.core.config import ServeConfig
    from services.core.raycluster import ensure_ray
    from services.serving.app import proxy_env

    # Serve's gRPC proxy reads its message limit from the environment of the cluster,
    # as `tuneserve serve` gives it to a cluster it starts (test_proxy_bounds.py).
    os.environ.update(proxy_env(ServeConfig()))
    # Ray's metrics endpoint on a known port, for test_prometheus.py to scrape.
    metrics_port = free_port()
    ensure_ray(num_cpus=8, metrics_port=metrics_port)
    yield {"metrics_port": metrics_port}
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def trained(ray_cluster, tmp_path_factory, tiny_model_dir, toy_csv):
    """The tiny BERT fine-tuned by 2 Ray Train workers and published as toy v1."""
    from services.core.config import TrainConfig
    from services.training.run import run_training

    home = tmp_path_factory.mktemp("home")
    cfg = TrainConfig(model=str(tiny_model_dir), train=str(toy_csv), name="toy",
                      registry=str(home / "registry"), runs_dir=str(home / "runs"),
                      workers=2, epochs=4, batch_size=16, learning_rate=2e-3,
                      log_every_steps=2, seed=1)
    result = run_training(cfg, progress_bar=False)
    return cfg, result


@pytest.fixture(scope="session")
def uninterrupted_run(ray_cluster, tmp_path_factory, tiny_model_dir, toy_csv):
    """The training fault tests' run (tests.helpers.FAULT_RUN) without a fault, on the
    session's cluster: what an interrupted run must match."""
    from services.training.run import run_training
    from tests.helpers import fault_run_config

    tmp = tmp_path_factory.mktemp("plain")
    return run_training(fault_run_config(tmp, tiny_model_dir, toy_csv, "plain"),
                        progress_bar=False, out=lambda line: None)


GEN_MODEL = "tinygen"


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A 2-layer, hidden-64 GPT-2 (random weights) and a BPE tokenizer trained here."""
    texts = [GEN_TEMPLATE.format(prompt=p) + r for p, r in toy_generation_pairs()]
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), texts)


@pytest.fixture(scope="session")
def varied_gpt2_dir(tmp_path_factory):
    """The same, with weights spread wide enough (initializer_range 0.2) that greedy
    continuations differ by prompt and depend on attention: for tests of decoding."""
    texts = [GEN_TEMPLATE.format(prompt=p) + r for p, r in toy_generation_pairs()]
    return build_tiny_gpt2(tmp_path_factory.mktemp("varied-gpt2"), texts,
                           initializer_range=0.2)


@pytest.fixture(scope="session")
def trained_generator(trained, tmp_path_factory, tiny_gpt2_dir):
    """A 2-layer GPT-2 (hidden 64, tokenizer trained here) fine-tuned by 2 Ray Train
    workers on 36 prompt/response pairs until it reproduces them greedily, published
    as GEN_MODEL v1 into the same registry as toy, so that the one session server
    serves both."""
    from services.core.config import TrainConfig
    from services.training.run import run_training

    cfg, _ = trained
    folder = tmp_path_factory.mktemp("gen")
    rows = [{"prompt": p, "response": r} for p, r in toy_generation_pairs()]
    # The pairs six times over: more optimizer steps per epoch, fewer epochs.
    train = write_jsonl(folder / "pairs.jsonl", rows * 6)
    evald = write_jsonl(folder / "pairs-eval.jsonl", rows)
    gen_cfg = TrainConfig(model=str(tiny_gpt2_dir), train=str(train), eval=str(evald),
                          task="generation", prompt_template=GEN_TEMPLATE, name=GEN_MODEL,
                          registry=cfg.registry, runs_dir=str(folder / "runs"), workers=2,
                          epochs=6, batch_size=8, learning_rate=1e-2, warmup_ratio=0.1,
                          weight_decay=0.0, max_length=64, log_every_steps=10, seed=1)
    return gen_cfg, run_training(gen_cfg, progress_bar=False)


HOT_MODEL = "toy-hot"


def publish_copy(registry: str, name: str, version: str, new_name: str) -> str:
    """Publish an existing version again (same weights) as the next version of new_name."""
    from services.core.registry import Registry

    reg = Registry(registry)
    manifest = {k: v for k, v in reg.manifest(name, version).items()
                if k not in ("files", "version", "name", "created_at")}
    return reg.publish(new_name, reg.local_copy(name, version), manifest).version


@pytest.fixture(scope="session")
def server(trained, trained_generator):
    """Serve's gRPC proxy on a free port in front of the trained registry, and the
    Admin service on a port of its own (the client's admin_address).

    It serves "toy" (which tests expect at v1 throughout) and HOT_MODEL, a copy that
    test_hotload.py promotes, pins, rolls back and corrupts."""
    from services.client import Client
    from services.core.config import ServeConfig
    from services.serving.app import start_serving

    cfg, _ = trained
    publish_copy(cfg.registry, "toy", "v1", HOT_MODEL)
    port, admin_port = free_port(), server_port()
    # Autoscaling between 1 and 2 replicas with quick reactions, so that
    # test_autoscaling.py can watch Serve scale up under load and back down.
    serve_cfg = ServeConfig(registry=cfg.registry, grpc_port=port, replica_cpus=0.5,
                            poll_interval_s=0.5, min_replicas=1, max_replicas=2,
                            target_ongoing_requests=1, upscale_delay_s=1,
                            downscale_delay_s=4, admin_port=admin_port,
                            autoscaling_overrides={"metrics_interval_s": 0.5,
                                                   "look_back_period_s": 2})
    start_serving(serve_cfg,
                  http_port=free_port())
    client = Client(f"127.0.0.1:{port}", timeout_s=60,
                    admin_address=f"127.0.0.1:{admin_port}")
    client.serve_cfg = serve_cfg  # for tests that redeploy the same app with a change
    client.wait_until_serving(timeout_s=120)
    yield client
    client.close()
