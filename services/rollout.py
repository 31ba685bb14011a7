"""`tuneserve models rollout`: a stepped canary rollout with automatic analysis.

The candidate starts as a canary at the policy's first share (services/core/registry:
every replica reads the share there); at each step the serving metrics are read from
Ray's metrics endpoints (every serving process's own counters: no Prometheus needed)
and the candidate is judged against production over the same window
(services/core/analysis.py). A step passes after min_step_s with min_requests of the
candidate's, and the next share is set; a failing check aborts the canary at once
(production answers everything again), and so does an error that stops the rollout
(metrics that cannot be read); passing every step promotes the candidate.
Each decision, with its numbers and reason, goes into the model's history
(`tuneserve models history NAME`), and into the process's metrics
(tuneserve_rollout_step, tuneserve_rollout_percent, tuneserve_rollout_decisions_total:
exported through Ray's metrics endpoint when the process is connected to Ray).

The step is kept in the canary state (`step` in canary.json), so a rollout of the
version whose canary is running (one that was interrupted, or whose process died)
resumes at that step instead of starting over.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from services.core import metrics
from services.core.analysis import RolloutPolicy, Snapshot, Verdict, check, snapshot, window
from services.core.errors import InvalidInput, TuneserveError

SCRAPE_TIMEOUT_S = 10.0


class MetricsUnreadable(TuneserveError):
    grpc_code = "UNAVAILABLE"


class CanaryGone(TuneserveError):
    """The canary was ended or replaced by someone else during the rollout."""


@dataclass
class Outcome:
    promoted: bool
    reason: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    """Each step's share, verdict, numbers and seconds."""


def metrics_reader(urls: Sequence[str]) -> Callable[[], Snapshot]:
    """Reads and merges the snapshots of Ray metrics endpoints (one per node)."""
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"--metrics-url: expected http://HOST:PORT/metrics, got {url!r}")

    def read() -> Snapshot:
        merged: Snapshot = {}
        for url in urls:
            try:
                with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as resp:
                    text = resp.read().decode("utf-8", "replace")
            except (OSError, urllib.error.URLError) as exc:
                raise MetricsUnreadable(f"--metrics-url {url}: cannot read it ({exc})") \
                    from None
            merged.update(snapshot(text, source=url))
        return merged

    return read


class AccuracyCheck:
    """Both versions' accuracy on the same labelled rows (`score(version)`: the
    `tuneserve eval` code), computed on a thread of its own while the steps run."""

    def __init__(self, score: Callable[[str], float], rows: int, where: str):
        self.score, self.rows, self.where = score, rows, where
        self.scores: Optional[tuple[float, float]] = None
        self.error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None

    def start(self, candidate: str, production: str) -> None:
        def work():
            try:
                self.scores = (self.score(candidate), self.score(production))
            except BaseException as exc:  # noqa: BLE001 (reported by verdict)
                self.error = exc

        self.candidate, self.production = candidate, production
        self._thread = threading.Thread(target=work, name="tuneserve-analysis", daemon=True)
        self._thread.start()

    def verdict(self, wait: bool = False) -> Optional[Verdict]:
        """None while the scores are not ready (and `wait` is False)."""
        if wait:
            self._thread.join()
        if self.error is not None:
            message = getattr(self.error, "message", None) or type(self.error).__name__
            raise TuneserveError(f"--analysis-data: scoring failed: {message}")
        if self.scores is None:
            return None
        cand, prod = self.scores
        numbers = {"candidate_accuracy": round(cand, 4), "production_accuracy": round(prod, 4),
                   "analysis_rows": self.rows}
        said = (f"{self.candidate} accuracy {cand:.4f}, production {self.production} "
                f"{prod:.4f} on the {self.rows} rows of {self.where}")
        return Verdict("pass" if cand >= prod else "fail",
                       said if cand >= prod else f"accuracy check: {said}", numbers)


class Rollout:
    """One rollout of `version` of `name`: `run()` drives it to promotion or rollback.
    With `accuracy`, the candidate must also be as accurate as production on its rows
    (judged as soon as the scores are ready, and before the promotion at the latest)."""

    def __init__(self, registry, name: str, version: str, read: Callable[[], Snapshot],
                 policy: RolloutPolicy, out: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 accuracy: Optional[AccuracyCheck] = None):
        self.registry, self.name, self.version = registry, name, version
        self.read, self.policy, self.out = read, policy, out
        self.clock, self.sleep = clock, sleep
        self.production: Optional[str] = None
        self.accuracy = accuracy

    def run(self) -> Outcome:
        steps = self.policy.steps
        first = self._resume_at(steps)
        if first is None:
            state = self.registry.start_canary(
                self.name, self.version, steps[0],
                reason=f"rollout: step 1 of {len(steps)} ({_shares(steps)})")
            first = 0
        else:
            state = self.registry.canary(self.name)
        self.production = state["production"]
        if self.accuracy is not None:
            self.accuracy.start(self.version, self.production)
        try:
            return self._steps(steps, first)
        except CanaryGone:
            self._record(0, 0.0, "stopped")
            raise
        except TuneserveError as exc:  # metrics unreadable, say: production takes over
            self.registry.abort_canary(self.name, reason=f"rollout stopped: {exc.message}")
            self._record(0, 0.0, "stopped")
            raise

    def _resume_at(self, steps: tuple[float, ...]) -> Optional[int]:
        """The step a rollout of this version's running canary resumes at (the share
        moved to that step's if it differs), or None when none of it is running."""
        running = self.registry.canary(self.name)
        if running is None or running["version"] != self.version:
            return None
        step = min(running["step"], len(steps) - 1)
        if running["percent"] != steps[step] or running["step"] != step:
            self.registry.set_canary_share(
                self.name, steps[step], step=step,
                reason=f"rollout resumed at step {step + 1} of {len(steps)}")
        self.out(f"resuming the rollout of {self.version} at step {step + 1} of "
                 f"{len(steps)}")
        return step

    def _record(self, step: int, percent: float, decision: Optional[str] = None) -> None:
        """The rollout's metrics: its step (1-based, 0 once ended), its share, and a
        decision when one was made."""
        tags = {"model": self.name, "version": self.version}
        metrics.set_gauge("tuneserve_rollout_step", step, **tags)
        metrics.set_gauge("tuneserve_rollout_percent", percent, **tags)
        if decision is not None:
            metrics.inc("tuneserve_rollout_decisions_total", decision=decision, **tags)

    def _steps(self, steps: tuple[float, ...], first: int = 0) -> Outcome:
        outcome = Outcome(False, "")
        for i, percent in enumerate(steps):
            if i < first:
                continue
            if i > first:
                self.registry.set_canary_share(
                    self.name, percent, step=i, **outcome.steps[-1]["numbers"],
                    reason=f"rollout: step {i} passed ({outcome.steps[-1]['reason']})")
            self.out(f"step {i + 1} of {len(steps)}: {self.version} at {percent:g} %")
            self._record(i + 1, percent)
            verdict, took = self._step()
            outcome.steps.append({"percent": percent, "state": verdict.state,
                                  "reason": verdict.reason, "numbers": verdict.numbers,
                                  "seconds": round(took, 1)})
            if verdict.state != "pass":
                return self._roll_back(outcome, i, verdict)
            self._record(i + 1, percent, "step_passed")
            self.out(f"  passed: {verdict.reason}")
        if self.accuracy is not None:
            verdict = self.accuracy.verdict(wait=True)
            if verdict.state == "fail":
                return self._roll_back(outcome, len(steps) - 1, verdict)
            outcome.steps[-1]["numbers"].update(verdict.numbers)
        outcome.promoted = True
        outcome.reason = (f"promoted: {self.version} passed every step "
                          f"({_shares(steps)}) against {self.production}")
        self.registry.promote_canary(self.name, reason=f"rollout: {outcome.reason}",
                                     **outcome.steps[-1]["numbers"])
        self._record(0, 0.0, "promoted")
        self.out(outcome.reason)
        return outcome

    def _step(self) -> tuple[Verdict, float]:
        """Judge one step: "fail" at once, "pass" once min_step_s has passed with
        enough requests, "wait" when max_step_s ran out first."""
        started, base = self.clock(), self.read()
        while True:
            self.sleep(self.policy.poll_s)
            self._still_running()
            stats = window(base, self.read(), self.name)
            verdict = check(stats, self.version, self.production, self.policy)
            scored = self.accuracy.verdict() if self.accuracy is not None else None
            if scored is not None and scored.state == "fail":
                verdict = Verdict("fail", scored.reason, {**verdict.numbers,
                                                          **scored.numbers})
            took = self.clock() - started
            if verdict.state == "fail":
                return verdict, took
            if verdict.state == "pass" and took >= self.policy.min_step_s:
                return verdict, took
            if took >= self.policy.max_step_s:
                return Verdict("wait", f"too few requests to judge in "
                               f"{self.policy.max_step_s:g} s: {verdict.reason}",
                               verdict.numbers), took

    def _still_running(self) -> None:
        running = self.registry.canary(self.name)
        if running is None or running["version"] != self.version:
            raise CanaryGone(f"the canary of {self.version} was ended or replaced "
                             "outside this rollout; stopping")

    def _roll_back(self, outcome: Outcome, i: int, verdict: Verdict) -> Outcome:
        share = self.policy.steps[i]
        outcome.reason = f"rolled back at {share:g} % (step {i + 1}): {verdict.reason}"
        self.registry.abort_canary(self.name, reason=f"rollout: {outcome.reason}",
                                   **verdict.numbers)
        self._record(0, 0.0, "rolled_back")
        self.out(outcome.reason)
        return outcome


def _shares(steps: Sequence[float]) -> str:
    return " -> ".join(f"{s:g} %" for s in (*steps, 100.0))
