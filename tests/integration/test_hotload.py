"""Hot-load: new versions go live under load with zero failed calls; promote, rollback,
pin and unpin through the Admin API; corrupt versions are refused while the old one
keeps serving. Works on HOT_MODEL so that "toy" stays at v1 for the other tests."""

import time

import grpc
import pytest

from tests.helpers import ClientThreads
from tests.helpers import poll_until as wait_for

from services.core.registry import Registry
from tests.conftest import HOT_MODEL, publish_copy

pytestmark = pytest.mark.timeout(600)
TEXT = ["a superb film with lovely acting"]
SWAP_BOUND_S = 30.0  # poll interval 0.5 s + verify + load + smoke test, with slack




def serving_versions(client, model=HOT_MODEL) -> list[str]:
    (info,) = client.list_models(model).models
    return sorted(r.version for r in info.replicas)


def model_info(client, model=HOT_MODEL):
    (info,) = client.list_models(model).models
    return info


class Load(ClientThreads):
    """Several client threads calling Classify until stopped; every outcome recorded."""

    def __init__(self, client, threads: int = 4):
        super().__init__(threads)
        self.client = client
        self.calls: list[tuple[float, float, str]] = []  # (start, end, version)
        self.errors: list[str] = []

    def loop(self):
        from services.client import Client

        with Client(self.client.address, timeout_s=30) as c:
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    resp = c.classify(HOT_MODEL, TEXT)
                    with self.lock:
                        self.calls.append((start, time.monotonic(), resp.version))
                except grpc.RpcError as exc:
                    with self.lock:
                        self.errors.append(f"{exc.code().name}: {exc.details()}")

    def count(self):
        with self.lock:
            return len(self.calls)


def test_two_models_served_at_once(server):
    assert server.classify("toy", TEXT).version == "v1"
    assert server.classify(HOT_MODEL, TEXT).model == HOT_MODEL
    names = {m.name for m in server.list_models().models}
    assert {"toy", HOT_MODEL} <= names


def test_promote_under_load_has_zero_failed_calls(server, trained):
    cfg, _ = trained
    reg = Registry(cfg.registry)
    new = publish_copy(cfg.registry, HOT_MODEL, "v1", HOT_MODEL)
    assert new == "v2" and reg.channel(HOT_MODEL) == "v1"  # publishing never promotes
    assert wait_for(lambda: serving_versions(server) == ["v1"], 60)
    with Load(server) as load:
        assert wait_for(lambda: load.count() >= 20, 60), load.errors[:3]
        promoted_at = time.monotonic()
        resp = server.promote(HOT_MODEL, "v2")
        assert (resp.version, resp.previous_version, resp.channel) == ("v2", "v1", "production")
        assert wait_for(lambda: any(v == "v2" for _, _, v in list(load.calls)), SWAP_BOUND_S)
        first_new = min(s for s, _, v in list(load.calls) if v == "v2")
        assert wait_for(lambda: set(serving_versions(server)) == {"v2"}, SWAP_BOUND_S)
        switched_at = time.monotonic()
        n = load.count()
        assert wait_for(lambda: load.count() >= n + 20, 60)
    assert not load.errors, load.errors[:5]
    versions = {v for _, _, v in load.calls}
    assert versions == {"v1", "v2"}
    assert first_new - promoted_at < SWAP_BOUND_S
    # everything that started after every replica had swapped was answered by v2
    late = [v for s, _, v in load.calls if s > switched_at]
    assert late and set(late) == {"v2"}
    # everything that finished before the promote was answered by v1
    early = [v for _, e, v in load.calls if e < promoted_at]
    assert early and set(early) == {"v1"}
    info = model_info(server)
    assert info.production_version == "v2" and list(info.serving_versions) == ["v2"]


def test_request_can_name_a_version(server):
    assert server.classify(HOT_MODEL, TEXT, version="v1").version == "v1"
    assert server.classify(HOT_MODEL, TEXT).version == "v2"
    with pytest.raises(grpc.RpcError) as err:
        server.classify(HOT_MODEL, TEXT, version="v99")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_rollback_pin_unpin_through_admin(server):
    resp = server.rollback(HOT_MODEL)
    assert (resp.version, resp.previous_version) == ("v1", "v2")
    assert wait_for(lambda: serving_versions(server) and set(serving_versions(server)) == {"v1"},
                    SWAP_BOUND_S)
    assert model_info(server).production_version == "v1"
    server.promote(HOT_MODEL, "v2")
    assert wait_for(lambda: set(serving_versions(server)) == {"v2"}, SWAP_BOUND_S)
    resp = server.pin(HOT_MODEL, "v1")
    assert (resp.channel, resp.version) == ("pin", "v1")
    assert wait_for(lambda: set(serving_versions(server)) == {"v1"}, SWAP_BOUND_S)
    info = model_info(server)
    assert info.pinned_version == "v1" and info.production_version == "v2"
    assert server.classify(HOT_MODEL, TEXT).version == "v1"
    server.unpin(HOT_MODEL)
    assert wait_for(lambda: set(serving_versions(server)) == {"v2"}, SWAP_BOUND_S)
    assert model_info(server).pinned_version == ""


@pytest.mark.parametrize("call,code", [
    (lambda c: c.promote(HOT_MODEL, "v77"), "NOT_FOUND"),
    (lambda c: c.promote("nope", "v1"), "NOT_FOUND"),
    (lambda c: c.promote(HOT_MODEL, ""), "INVALID_ARGUMENT"),
    (lambda c: c.promote(HOT_MODEL, "v1", channel="../x"), "INVALID_ARGUMENT"),
    (lambda c: c.pin(HOT_MODEL, "latest"), "INVALID_ARGUMENT"),
    (lambda c: c.rollback("toy"), "FAILED_PRECONDITION"),
])
def test_admin_bad_requests(server, call, code):
    with pytest.raises(grpc.RpcError) as err:
        call(server)
    assert err.value.code().name == code
    assert "Traceback" not in err.value.details()


def test_corrupt_versions_are_refused_and_old_keeps_serving(server, trained):
    cfg, _ = trained
    reg = Registry(cfg.registry)
    flipped = publish_copy(cfg.registry, HOT_MODEL, "v1", HOT_MODEL)
    weights = reg.local_copy(HOT_MODEL, flipped) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    missing = publish_copy(cfg.registry, HOT_MODEL, "v1", HOT_MODEL)
    (reg.local_copy(HOT_MODEL, missing) / "tokenizer.json").unlink()

    # The Admin API verifies before it moves anything.
    for bad in (flipped, missing):
        with pytest.raises(grpc.RpcError) as err:
            server.promote(HOT_MODEL, bad)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reg.channel(HOT_MODEL) == "v2"

    # A channel moved behind the server's back: replicas verify and refuse too.
    for bad, reason in ((flipped, "sha256"), (missing, "missing file")):
        reg.set_channel(HOT_MODEL, "production", bad)

        def refused():
            reps = model_info(server).replicas
            return reps and all(bad in r.refused for r in reps)

        assert wait_for(refused, SWAP_BOUND_S), model_info(server)
        assert all(reason in r.refused[bad] for r in model_info(server).replicas)
        resp = server.classify(HOT_MODEL, TEXT)
        assert resp.version == "v2"  # the old version keeps serving
        assert set(serving_versions(server)) == {"v2"}
    reg.set_channel(HOT_MODEL, "production", "v2")


def test_cli_models_commands_through_the_admin_api(server, capsys):
    from services.cli import main

    assert main(["models", "pin", "--address", server.admin_address, HOT_MODEL, "v1"]) == 0
    assert f"{HOT_MODEL} pin: - -> v1" in capsys.readouterr().out
    assert wait_for(lambda: set(serving_versions(server)) == {"v1"}, SWAP_BOUND_S)
    production = model_info(server).production_version
    assert main(["models", "unpin", "--address", server.admin_address, HOT_MODEL]) == 0
    assert wait_for(lambda: set(serving_versions(server)) == {production}, SWAP_BOUND_S)
    capsys.readouterr()
    assert main(["models", "promote", "--address", server.admin_address, HOT_MODEL, "v77"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_user_config_pin_reconfigures_in_place(server, trained):
    """The declarative pin: Serve calls `reconfigure` with the new user_config (a
    RayService or `serve deploy` edit of user_config does only that, since the app's
    code version depends on its import path and args alone). The same replica object
    switches versions in the background and back, without being rebuilt."""
    import asyncio

    from services.serving.classifier import Classifier

    cfg, _ = trained
    reg = Registry(cfg.registry)
    production = reg.channel(HOT_MODEL)
    other = "v1" if production != "v1" else "v2"

    async def scenario():
        replica = Classifier(cfg.registry, HOT_MODEL, poll_interval_s=0.2, threads=1)
        await replica.reconfigure({"channel": "production", "pinned_version": None})
        assert replica.current is not None, (replica.state, replica.last_error, replica.refused)
        assert replica.current.version == production  # first load before traffic
        await replica.reconfigure({"channel": "production", "pinned_version": other})
        for _ in range(200):
            if replica.current.version == other:
                break
            await asyncio.sleep(0.05)
        assert replica.current.version == other and replica.pinned == other
        await replica.reconfigure({"channel": "production", "pinned_version": None})
        for _ in range(200):
            if replica.current.version == production:
                break
            await asyncio.sleep(0.05)
        assert replica.current.version == production
        replica._follower.cancel()

    asyncio.run(scenario())
