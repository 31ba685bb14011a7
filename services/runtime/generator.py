"""A generation version of the registry, loaded and run (torch side).

    loaded = load_generator(registry, "gsm8k", "v2")        # verified, smoke-tested
    job = loaded.engine.job(prompt, sampling_params({"max_new_tokens": 32}))
    run_jobs([(loaded, job)]); job_result(job, loaded.version)

A generation version must carry its prompt template (tuneserve.json in the checkpoint,
the same as the manifest's), which every prompt goes through, exactly as at training
time; `load_generator` refuses (CorruptVersion) one whose template differs, whose task
is not generation, or whose smoke generation fails. No gRPC and no Ray Serve in here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from services.core.config import GENERATION
from services.core.errors import CorruptVersion
from services.core.modeling import (
    GENERATION_FILE,
    context_length,
    dtype_name,
    load_causal_lm_for_serving,
)
from services.core.registry import Registry
from services.runtime.continuous import ContinuousBatcher
from services.runtime.generation import GenerationEngine, GenerationJob, SamplingParams

SMOKE_PROMPT = "tuneserve smoke test"


@dataclass
class LoadedGenerator:
    version: str
    engine: GenerationEngine
    prompt_template: Optional[str]
    loaded_at: float
    continuous: Optional[ContinuousBatcher] = None
    """The version's continuous batcher; None: its requests go in static batches."""

    @property
    def dtype(self) -> str:
        return dtype_name(self.engine.model)


def _prompt_template(manifest: dict[str, Any], folder: Path, what: str) -> Optional[str]:
    """The checkpoint's prompt template (its GENERATION_FILE), checked against the
    manifest's; the manifest's where the checkpoint has none."""
    template = manifest.get("prompt_template")
    task_file = folder / GENERATION_FILE
    if task_file.is_file():
        try:
            saved = json.loads(task_file.read_text(encoding="utf-8"))
        except ValueError:
            raise CorruptVersion(f"{what}: {GENERATION_FILE} is not valid JSON") from None
        if "prompt_template" in manifest and saved.get("prompt_template") != template:
            raise CorruptVersion(f"{what}: the checkpoint's prompt template "
                                 "differs from the manifest's")
        template = saved.get("prompt_template")
    return template


def load_generator(registry: Registry, name: str, version: str,
                   dtype: str = "auto") -> LoadedGenerator:
    """Verify, load and smoke-test one generation version (a serving replica runs this
    in a worker thread); the weights in `services.core.modeling.serving_dtype(dtype)`."""
    manifest = registry.verify(name, version)
    if manifest.get("task") != GENERATION:
        raise CorruptVersion(f"{name} {version}: task is {manifest.get('task')!r}, "
                             f"not {GENERATION}")
    folder = registry.local_copy(name, version)
    template = _prompt_template(manifest, folder, f"{name} {version}")
    model, tokenizer = load_causal_lm_for_serving(folder, dtype)
    engine = GenerationEngine(model, tokenizer, template, context_length(model.config, tokenizer))
    job = engine.job(SMOKE_PROMPT, SamplingParams(max_new_tokens=2, ignore_eos=True))
    engine.run([job])
    if job.completion_tokens != 2:
        raise CorruptVersion(f"{name} {version}: smoke generation produced "
                             f"{job.completion_tokens} tokens instead of 2")
    return LoadedGenerator(version, engine, template, time.time())


def sampling_params(params: dict[str, Any]) -> SamplingParams:
    """Validated request parameters (plain values) -> SamplingParams."""
    return SamplingParams(
        max_new_tokens=int(params["max_new_tokens"]),
        temperature=float(params.get("temperature", 0.0)),
        top_p=float(params.get("top_p", 1.0)), top_k=int(params.get("top_k", 0)),
        stop=tuple(params.get("stop") or ()), seed=int(params.get("seed", 0)),
        ignore_eos=bool(params.get("ignore_eos", False)))


def job_result(job: GenerationJob, version: str) -> dict[str, Any]:
    """A finished job's answer: text, token counts, finish reason, version."""
    return {"text": job.text, "prompt_tokens": job.prompt_tokens,
            "completion_tokens": job.completion_tokens, "finish_reason": job.finish_reason,
            "version": version}


def run_jobs(items: list[tuple[LoadedGenerator, GenerationJob]]) -> None:
    """A static batch: the jobs of each version in one `GenerationEngine.run` (one
    Hugging Face `generate` call), one version after another."""
    groups: dict[int, list] = {}
    for loaded, job in items:
        groups.setdefault(id(loaded), [loaded]).append(job)
    for loaded, *jobs in groups.values():
        loaded.engine.run(jobs)
