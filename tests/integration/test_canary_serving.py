"""A canary through the whole serving path: gRPC proxy, ingress, model replica.

A second Serve application in the session cluster (colocated: one replica, cheap to
start) over a registry of its own holding toy v1 (production) and v2. `tuneserve models
canary` starts v2 at 10 %; under steady load from several clients, v2 answers 10 % +-
3 % of the calls (counted from the responses' version), a routing key always lands on
one version, ListModels shows the canary; promoting it moves every call to v2.
"""

from __future__ import annotations

import collections
import concurrent.futures

import grpc
import pytest

from services.cli import main
from services.client import Client
from services.core.config import ServeConfig
from services.core.registry import Registry
from tests.helpers import copy_version, poll_until, second_app, server_port

pytestmark = pytest.mark.timeout(600)

APP = "tuneserve-canary"
TEXT = ["a lovely film with superb acting"]
CALLS = 1500


@pytest.fixture(scope="module")
def canary_app(server, trained, tmp_path_factory):
    source = Registry(trained[0].registry)
    registry = Registry(tmp_path_factory.mktemp("canary") / "registry")
    copy_version(source, "toy", "v1", registry, "toy")
    copy_version(source, "toy", "v1", registry, "toy")  # v2, the candidate
    # the Admin API answers on its own port only
    cfg = ServeConfig(registry=registry.uri, colocate=True, replica_cpus=0.5,
                      poll_interval_s=0.5, admin_port=server_port())
    with second_app(server, APP, cfg, token="") as client:
        yield client, registry


def _versions(client: Client, n: int, keys=None) -> list[str]:
    """The version that answered each of n calls, sent by 8 threads at once."""
    def one(i: int) -> str:
        key = keys[i % len(keys)] if keys else ""
        return client.classify("toy", TEXT, routing_key=key).version

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def test_ten_percent_canary_sticky_keys_and_promote(canary_app, capsys):
    client, registry = canary_app
    resp = client.start_canary("toy", "v2", 10, reason="integration test")  # Admin API
    assert (resp.candidate_version, resp.production_version, resp.percent) == \
        ("v2", "v1", 10.0)

    def candidate_loaded():
        (info,) = client.list_models("toy").models
        return info.replicas and all(r.canary_version == "v2" for r in info.replicas)

    assert poll_until(candidate_loaded, timeout_s=120), client.list_models("toy")
    (info,) = client.list_models("toy").models
    assert (info.canary_version, info.canary_percent, info.production_version) == \
        ("v2", 10.0, "v1")

    counts = collections.Counter(_versions(client, CALLS))
    assert set(counts) == {"v1", "v2"}
    assert 0.07 <= counts["v2"] / CALLS <= 0.13, counts

    keys = [f"user-{i}" for i in range(40)]
    answers = _versions(client, 4 * len(keys), keys)
    by_key = collections.defaultdict(set)
    for i, version in enumerate(answers):
        by_key[keys[i % len(keys)]].add(version)
    assert all(len(v) == 1 for v in by_key.values()), by_key

    _refused_without_change(client)
    assert main(["models", "canary", "--registry", registry.uri, "toy", "--promote"]) == 0
    assert capsys.readouterr().out == "toy production: v1 -> v2 (canary promoted)\n"
    assert poll_until(lambda: set(_versions(client, 40)) == {"v2"}, timeout_s=60)
    (info,) = client.list_models("toy").models
    assert info.production_version == "v2" and info.canary_version == ""
    assert [e["action"] for e in registry.history("toy")][-2:] == ["canary-start",
                                                                   "canary-promote"]


def _refused_without_change(client: Client) -> None:
    """Bad Admin canary calls answer their status code and change nothing."""
    for call, code, needle in [
            (lambda: client.set_canary_share("toy", 150), grpc.StatusCode.INVALID_ARGUMENT,
             "percent: expected a number from 0 to 100"),
            (lambda: client.set_canary_share("toy", 5, reason="x" * 501),
             grpc.StatusCode.INVALID_ARGUMENT, "reason: 501 characters"),
            (lambda: client.start_canary("toy", "v1", 5), grpc.StatusCode.FAILED_PRECONDITION,
             "v1 is production already"),
            (lambda: client.start_canary("toy", "v9", 5), grpc.StatusCode.NOT_FOUND,
             "no version 'v9'"),
            (lambda: client.abort_canary("nope"), grpc.StatusCode.NOT_FOUND, "'nope'")]:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code and needle in err.value.details(), err.value
    (info,) = client.list_models("toy").models
    assert (info.canary_version, info.canary_percent) == ("v2", 10.0)
