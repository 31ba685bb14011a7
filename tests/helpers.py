"""Test-only builders: a tokenizer trained in the fixture and tiny models from a config.

Nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import threading
from pathlib import Path

from services.core.net import free_port  # noqa: F401  (one implementation, re-exported for tests)


def server_port() -> int:
    """A free TCP port below the kernel's ephemeral range, for a server that binds it
    later with SO_REUSEPORT (the replicas' own gRPC servers): a port from free_port()
    can meanwhile be handed to a Ray process's internal gRPC server binding port 0,
    also with SO_REUSEPORT, and the two would then split the connections."""
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randint(max(1024, low // 2), low - 1)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    return free_port()

POSITIVE = ["good", "great", "fine", "lovely", "superb", "wonderful", "brilliant"]
NEGATIVE = ["bad", "awful", "boring", "poor", "dull", "terrible", "clumsy"]
NOUNS = ["movie", "film", "story", "show", "script", "ending"]


def toy_sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = POSITIVE if i % 2 else NEGATIVE
        label = "positive" if i % 2 else "negative"
        rows.append((f"a {rng.choice(words)} {rng.choice(NOUNS)} with "
                     f"{rng.choice(words)} acting", label))
    return rows


def build_tokenizer(texts: list[str], vocab_size: int = 300):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(texts, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)


def build_tiny_bert(folder: Path, texts: list[str], num_labels: int = 2) -> Path:
    """A 2-layer, hidden-32 BERT classifier (random weights) with its tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    tokenizer = build_tokenizer(texts)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128, num_labels=num_labels)
    model = AutoModelForSequenceClassification.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path




# ---- generation: a byte-level BPE tokenizer and a tiny GPT-2 ---------------------------
ANIMALS = {"cat": "meow", "dog": "woof", "cow": "moo", "owl": "hoot", "duck": "quack",
           "lion": "roar"}
COLORS = ["red", "blue", "green", "pink", "gray", "gold"]
GEN_TEMPLATE = "Q: {prompt}\nA:"


def toy_generation_pairs() -> list[tuple[str, str]]:
    """36 prompt/response pairs: copy two words from the prompt, look one up."""
    return [(f"{color} {animal}", f" the {color} {animal} says {sound}.")
            for animal, sound in ANIMALS.items() for color in COLORS]


def build_bpe_tokenizer(texts: list[str], vocab_size: int = 400):
    """A GPT-2 style byte-level BPE tokenizer (any text encodes) without a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   model_max_length=1024)


def build_tiny_gpt2(folder: Path, texts: list[str], n_positions: int = 1024,
                    initializer_range: float = 0.02) -> Path:
    """A 2-layer, hidden-64 GPT-2 causal LM (random weights) with its tokenizer.

    At Hugging Face's default initializer_range (0.02) the untrained model continues
    every prompt with one token repeated (tied embeddings dominate), fine as a start
    for training; tests of generation itself want 0.2, where each prompt gets a
    continuation of its own that depends on attention."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    tokenizer = build_bpe_tokenizer(texts)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=64,
                        n_layer=2, n_head=2, bos_token_id=eos, eos_token_id=eos,
                        initializer_range=initializer_range)
    model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def poll_until(predicate, timeout_s: float = 60.0, poll_s: float = 0.2):
    """predicate()'s first truthy value within timeout_s, else None (polls, no blind sleeps)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    return None


def delete_app(name: str, server) -> None:
    """Delete a second Serve app a test deployed beside the session's, then wait until
    the session app answers through the gRPC proxy again (health SERVING)."""
    import grpc
    from ray import serve

    serve.delete(name)

    def session_app_routed():
        try:
            return server.health() == "SERVING"
        except grpc.RpcError:
            return False

    assert poll_until(session_app_routed, timeout_s=60), "the session app is unreachable"


@contextlib.contextmanager
def second_app(server, name: str, cfg, **client_kw):
    """`cfg` (a ServeConfig) deployed as the Serve app `name` beside the session's,
    behind the session's gRPC proxy: a Client of it (timeout_s=60, the Admin API's
    address when cfg has an admin_port; `client_kw` on top) once it serves; the app
    deleted after."""
    from ray import serve

    from services.client import Client
    from services.serving.app import build_app

    serve.run(build_app(cfg), name=name, route_prefix=f"/{name}", blocking=False)
    kw = {"timeout_s": 60, **({"admin_address": f"127.0.0.1:{cfg.admin_port}"}
                              if cfg.admin_port else {}), **client_kw}
    client = Client(server.address, application=name, **kw)
    try:
        client.wait_until_serving(timeout_s=180)
        yield client
    finally:
        client.close()
        delete_app(name, server)


class ClientThreads:
    """`threads` threads each running self.loop() until self.stop is set: started on
    entering the context, stopped and joined on leaving it. self.lock guards what the
    threads record."""

    join_s = 60.0

    def __init__(self, threads: int):
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.loop, daemon=True)
                        for _ in range(threads)]

    def loop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=self.join_s)


def listening_process(port: int) -> str:
    """The command line of the process listening on TCP `port` (IPv4 or IPv6), read
    from /proc; "" if none is found."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{inode}]")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                        errors="replace").strip()
        except OSError:
            continue
    return ""


def copy_version(source, name: str, version: str, target, new_name: str) -> str:
    """Publish `name` `version` of the `source` Registry into `target` as the next
    version of `new_name` (same files and manifest fields)."""
    manifest = {k: v for k, v in source.manifest(name, version).items()
                if k not in ("files", "version", "name", "created_at")}
    return target.publish(new_name, source.local_copy(name, version), manifest).version


# ---- the run that the training fault tests interrupt ----------------------------------
FAULT_RUN = {"workers": 2, "epochs": 2, "batch_size": 16, "learning_rate": 1e-2,
             "eval_steps": 4, "log_every_steps": 2, "seed": 7, "max_length": 32}
"""The tiny BERT on the 200 toy rows: 180 training rows / 16 = 12 optimizer steps an
epoch, evaluated and checkpointed every 4 steps; it learns the task within the run
(eval accuracy 0.5 at step 4, 1.0 by step 16), so that a resumed run's quality
compares with something."""


def fault_run_config(tmp_path: Path, model_dir, csv, name: str, **kw):
    """FAULT_RUN's TrainConfig, with its registry and runs folder in tmp_path."""
    from services.core.config import TrainConfig

    return TrainConfig(**{"model": str(model_dir), "train": str(csv), "name": name,
                          "registry": str(tmp_path / "registry"),
                          "runs_dir": str(tmp_path / "runs"), **FAULT_RUN, **kw})


def train_with_fault(cfg, fault: str | None = None):
    """run_training(cfg) with TUNESERVE_TEST_FAULT set to `fault` (unset without one)
    while it runs, the variable as it was after: (the result, the lines it printed)."""
    from services.training.loop import FAULT_ENV
    from services.training.run import run_training

    lines: list[str] = []
    old = os.environ.pop(FAULT_ENV, None)
    if fault:
        os.environ[FAULT_ENV] = fault
    try:
        return run_training(cfg, progress_bar=False, out=lines.append), lines
    finally:
        os.environ.pop(FAULT_ENV, None)
        if old is not None:
            os.environ[FAULT_ENV] = old


def eval_events(result) -> list[dict]:
    """A training result's evaluations, in order."""
    return [e for e in result.history if e["type"] == "eval"]


def assert_same_quality(metrics: dict, plain: dict, n_eval: int) -> None:
    """An interrupted run's published metrics within noise of the uninterrupted run's:
    at most one held-out example in twenty classified differently (compared in
    examples, not as floats: 1.0 - 0.95 is a hair over 0.05), the loss close."""
    import pytest

    # Only a model that learned makes the comparison mean something.
    assert plain["accuracy"] >= 0.9, plain
    assert n_eval >= 20
    assert abs(round(metrics["accuracy"] * n_eval) - round(plain["accuracy"] * n_eval)) \
        <= max(1, n_eval // 20), (metrics, plain)
    assert metrics["loss"] == pytest.approx(plain["loss"], rel=0.25, abs=0.05), \
        (metrics, plain)


# ---- a Ray cluster of several nodes on one machine (`ray start`) ------------------------
RAY_BIN = str(Path(sys.executable).parent / "ray")
ALIVE_NODES = "out = len([n for n in ray.nodes() if n['Alive']])"
NODE_IDS = "out = {n['NodeManagerPort']: n['NodeID'] for n in ray.nodes() if n['Alive']}"
"""Code for ray_query: the alive nodes' count, their ids by node manager port."""


class RayNode:
    """One Ray node: `ray start --block` in a session of its own. kill() kills its
    process group (`ray start`, its raylet and agents: the node leaves the cluster; its
    workers, in process groups of their own, exit a few seconds later when they see
    their raylet gone); lose() kills every process of its session at once, workers
    included, as a lost pod or machine does."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path):
        self.name, self.args, self.env, self.logs = name, args, env, logs
        self.port = next(int(a.split("=")[1]) for a in args
                         if a.startswith("--node-manager-port="))
        self.proc = None

    def start(self) -> "RayNode":
        import subprocess

        with open(self.logs / f"{self.name}.log", "ab") as log:
            self.proc = subprocess.Popen([RAY_BIN, "start", "--block", *self.args],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def started(self) -> int:
        """How many times this node came up (its `ray start` log says so each time)."""
        log = self.logs / f"{self.name}.log"
        return log.read_text(errors="replace").count("Ray runtime started") \
            if log.exists() else 0

    def processes(self, title: str) -> list[int]:
        """The pids of this node's processes (those of its process group's session)
        whose command line starts with `title`: Ray names its workers' processes, e.g.
        'ray::RayTrainWorker' for a Ray Train worker's."""
        pids = []
        if self.proc is None or self.proc.poll() is not None:
            return pids
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getsid(int(entry.name)) == self.proc.pid and \
                        (entry / "cmdline").read_bytes().startswith(title.encode()):
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
        return pids

    def kill(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def lose(self) -> None:
        """SIGKILL every live process of this node's session, until none is left."""
        import signal

        if self.proc is None or self.proc.poll() is not None:
            return

        def sweep() -> bool:
            alive = []
            for entry in Path("/proc").iterdir():
                try:
                    if entry.name.isdigit() and os.getsid(int(entry.name)) == self.proc.pid \
                            and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                        alive.append(int(entry.name))
                        os.kill(int(entry.name), signal.SIGKILL)
                except OSError:  # gone meanwhile
                    continue
            return not alive

        assert poll_until(sweep, timeout_s=30, poll_s=0.05), f"{self.name} outlived SIGKILL"
        self.proc.wait(timeout=30)


def ray_node_args(temp_dir: str) -> list[str]:
    """`ray start` flags that give a node ports of its own and the cluster's temp dir
    (not /tmp/ray, which the session's cluster uses), on loopback."""
    # Every agent port given: a raylet whose agents pick their own ports waits a fixed
    # ~15 s for them to write them down, and aborts when they start slower than that.
    return [f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--temp-dir={temp_dir}",
            "--node-ip-address=127.0.0.1", "--disable-usage-stats"]


ROOT = Path(__file__).resolve().parents[1]


def ray_nodes_env(**extra: str) -> dict[str, str]:
    """The environment of a test's own `ray start` nodes: this one without RAY_ADDRESS
    or a training fault, the repository importable, plus `extra`."""
    from services.training.loop import FAULT_ENV

    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           # a raylet waits this long for its agents to start: slow on a loaded machine
           "RAY_agent_register_timeout_ms": "120000", **extra}
    env.pop("RAY_ADDRESS", None)
    env.pop(FAULT_ENV, None)
    return env


def head_and_workers(env: dict[str, str], logs: Path, temp_dir: str, gcs_port: int,
                     head_args: tuple[str, ...] = ("--include-dashboard=false",)
                     ) -> tuple[RayNode, list[RayNode]]:
    """A head node with no CPUs (its GCS on gcs_port, plus `head_args`) and two worker
    nodes of 2 CPUs each, on ports of their own; not started yet."""
    head = RayNode("head", ["--head", f"--port={gcs_port}", "--num-cpus=0", *head_args,
                            *ray_node_args(temp_dir)], env, logs)
    workers = [RayNode(f"worker{i}", [f"--address=127.0.0.1:{gcs_port}", "--num-cpus=2",
                                      *ray_node_args(temp_dir)], env, logs) for i in (1, 2)]
    return head, workers


def ray_query(address: str, code: str, env: dict[str, str]) -> object:
    """Run `code` (which sets `out`) in a driver connected to the cluster at `address`,
    in a process of its own (this one may be connected to the session's cluster); its
    JSON, or None if it could not connect."""
    import json
    import subprocess

    script = ("import json, ray\nray.init(address=%r, logging_level='ERROR')\n%s\n"
              "print('OUT=' + json.dumps(out))\n" % (address, code))
    try:
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:  # no GCS to answer (yet)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("OUT="):
            return json.loads(line[4:])
    return None


def join_ray_nodes(nodes: list[RayNode], alive: int, address: str, env: dict[str, str],
                   attempts: int = 2) -> None:
    """Start nodes together and wait until the cluster has `alive` nodes; those whose
    `ray start` gave up (it waits 30 s for its raylet, which a loaded machine can
    exceed) are started once more."""
    pending = list(nodes)
    for _ in range(attempts):
        before = {node.name: node.started() for node in pending}
        for node in pending:
            node.start()

        def up(node: RayNode) -> bool:
            # `ray start` says so once its raylet registered (or exits when it gave up).
            return node.proc.poll() is None and node.started() > before[node.name]

        poll_until(lambda: all(up(n) or n.proc.poll() is not None for n in pending),
                   timeout_s=180, poll_s=1)
        failed = [node for node in pending if not up(node)]
        if not failed and poll_until(lambda: ray_query(address, ALIVE_NODES, env) == alive,
                                     timeout_s=120):
            return
        pending = failed or pending
        for node in pending:
            node.kill()
    raise AssertionError(f"nodes {[n.name for n in pending]} did not join; "
                         f"see {pending[0].logs}")


def join_ray_node(node: RayNode, alive: int, address: str, env: dict[str, str]) -> None:
    """join_ray_nodes for one node."""
    join_ray_nodes([node], alive, address, env)


def keep_ray_logs(temp_dirs: list[str], logs: Path) -> None:
    """Ray's own logs beside the nodes' (the session folders, with their sockets, go)."""
    import shutil

    for i, folder in enumerate(temp_dirs):
        try:
            shutil.copytree(Path(folder) / "session_latest" / "logs", logs / f"ray{i}",
                            ignore=shutil.ignore_patterns("*.sock"), dirs_exist_ok=True)
        except OSError:
            pass
        shutil.rmtree(folder, ignore_errors=True)


# ---- a raw HTTP/2 client: what a hostile peer sends, byte by byte --------------------
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + \
        stream.to_bytes(4, "big") + payload


def _hpack_literal(name: str, value: str) -> bytes:
    """A header as an HPACK literal without indexing (no Huffman); short values only."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def grpc_length_prefix_probe(port: int, path: str, declared_bytes: int,
                             metadata: tuple = (), timeout_s: float = 30.0) -> dict:
    """Open a connection to 127.0.0.1:port and start a gRPC call to `path` whose
    message's length prefix says `declared_bytes`, followed by 1 KiB of it only: what a
    client that means to send a huge message sends first. Returns {"status" (grpc-status
    of the trailers, an int, or None), "message", "seconds"} once the server ends the
    call or closes the connection."""
    import re
    import socket
    import time

    headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
               (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
               ("te", "trailers"), *metadata]
    block = b"".join(_hpack_literal(k, v) for k, v in headers)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(H2_PREFACE + h2_frame(4, 0, 0, b"") + h2_frame(1, 4, 1, block)
                     + h2_frame(0, 0, 1, b"\x00" + declared_bytes.to_bytes(4, "big")
                                + b"x" * 1024))
        received = b""
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
            if b"grpc-status" in received:
                break
    seconds = time.monotonic() - started
    status = re.search(rb"grpc-status([\x01-\x03])(\d+)", received)
    message = re.search(rb"grpc-message([\x01-\x7e])", received)
    text = ""
    if message:
        start = message.end()
        text = received[start:start + message.group(1)[0]].decode(errors="replace")
    return {"status": int(status.group(2)) if status else None, "message": text,
            "seconds": seconds}


def idle_h2_connections(port: int, count: int) -> list:
    """`count` connections to 127.0.0.1:port that send the HTTP/2 preface and settings,
    then nothing: idle clients. The caller closes them."""
    import socket

    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(H2_PREFACE + h2_frame(4, 0, 0, b""))
        socks.append(sock)
    return socks


def closed_by_server(sock, wait_s: float = 0.0) -> bool:
    """Whether the server closed (or reset) this connection, reading what it sent."""
    import select

    while True:
        ready, _, _ = select.select([sock], [], [], wait_s)
        if not ready:
            return False
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, OSError):
            return True


def publish_toy_classifier(tiny_model_dir, folder: Path, max_length: int = 64):
    """A registry in `folder` holding one version (v1) of a two-label classifier "toy"
    made from the tiny BERT, published as trained with `max_length`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from services.core.registry import Registry

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    model.save_pretrained(folder / "ckpt")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder / "ckpt")
    reg = Registry(folder / "registry")
    reg.publish("toy", folder / "ckpt", {"task": "classification", "labels": ["neg", "pos"],
                                        "config": {"max_length": max_length}, "metrics": {}})
    return reg
