"""Profile an architecture on a device: sample widths, build, export, time against the dense reference, store."""

from __future__ import annotations

import math
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latency.backends import backend_for
from latency.device import DeviceSpec, EnvironmentFingerprint, check_runnable, current_fingerprint
from latency.sampler import config_key, sample_configs
from latency.samples import LatencySample, SampleStore, best_measurements
from latency.timing import (
    Clock,
    Measurement,
    QuietReference,
    Run,
    TimingPlan,
    input_shape,
    measure,
    torch_threads,
)

Progress = Callable[[int, int, str], None]


class ProfileCancelled(Exception):
    """should_cancel() returned True between two samples; everything measured so far is stored."""


@dataclass
class ProfileTarget:
    """An architecture at one resolution, with what is needed to build any of its width configurations."""

    arch: str
    resolution: int
    num_classes: int
    in_channels: int
    arch_json: dict
    graph: object  # pruning.groups.ChannelGraph
    cost: object  # pruning.cost.CostModel

    @classmethod
    def build(cls, arch: str, resolution: int, num_classes: int = 10, in_channels: int = 3) -> ProfileTarget:
        """Build the dense model once and trace its channel groups at `resolution`."""
        from pruning import zoo
        from pruning.cost import CostModel
        from pruning.groups import ChannelGraph

        if resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        model = zoo.build_model(arch, num_classes, in_channels).eval()
        graph = ChannelGraph.build(model, (1, in_channels, resolution, resolution))
        arch_json = zoo.describe(model, arch, num_classes, in_channels, resolution)
        return cls(arch, resolution, num_classes, in_channels, arch_json, graph, CostModel(graph))

    def matches(self, sample: LatencySample) -> bool:
        """Whether `sample` was measured on this architecture, resolution, class and input-channel count."""
        return (sample.arch, sample.resolution, sample.num_classes, sample.in_channels) == (
            self.arch, self.resolution, self.num_classes, self.in_channels)

    @property
    def group_sizes(self) -> list[int]:
        """Channels of every prunable group, in group order."""
        return list(self.graph.sizes)

    def model(self, keep_counts: Sequence[int]):
        """A freshly initialised model keeping `keep_counts` channels per group (latency ignores values)."""
        from pruning import surgery, zoo

        return zoo.rebuild(surgery.pruned_arch(self.arch_json, self.cost, list(keep_counts))).eval()


def export_for_device(model, path: Path, spec: DeviceSpec, shape: Sequence[int]) -> Path:
    """ONNX file of `model` at the device's input shape and precision."""
    from pruning import surgery

    if spec.precision == "fp32":
        return surgery.export_onnx(model, path, shape)
    import torch

    half = model.to("cuda", torch.float16).eval()
    torch.onnx.export(half, (torch.randn(*shape, device="cuda", dtype=torch.float16),), str(path),
                      input_names=["input"], output_names=["logits"], opset_version=17, dynamo=False)
    return path


def make_runner(spec: DeviceSpec, target: ProfileTarget, keep_counts: Sequence[int], workdir: Path,
                tag: str) -> Run:
    """A callable doing one inference of the configuration on the device's runtime."""
    model = target.model(keep_counts)
    shape = input_shape(spec, target.in_channels, target.resolution)
    backend = backend_for(spec)
    path = export_for_device(model, workdir / f"{tag}.onnx", spec, shape) if backend.uses_onnx else None
    return backend.runner(spec, path, model, shape)


def repeatability(samples: Sequence[LatencySample]) -> dict | None:
    """Agreement of every repeat with the (best) measurement of its configuration (None without repeats).

    Scored with the predictors' metrics (the repeat as the 'prediction' of the first measurement), so the
    result is the floor no predictor can beat on this machine: {pairs, median_gap_s, relative, absolute_ms,
    relative_clean (pairs where neither measurement was flagged noisy)}.
    """
    from latency.evaluation import metrics

    first = best_measurements(samples)
    pairs = [(first[s.key], s) for s in samples
             if s.repeat and s.key in first and first[s.key].fingerprint == s.fingerprint]
    if not pairs:
        return None
    out = {"pairs": len(pairs), "median_gap_s": float(np.median([b.measured_at - a.measured_at for a, b in pairs])),
           "absolute_ms": metrics([b.latency_ms for _, b in pairs], [a.latency_ms for a, _ in pairs])}
    with_ratio = [(a, b) for a, b in pairs if a.ratio and b.ratio]
    if with_ratio:
        out["relative"] = metrics([b.ratio for _, b in with_ratio], [a.ratio for a, _ in with_ratio])
    clean = [(a, b) for a, b in with_ratio if not a.noisy and not b.noisy]
    if len(clean) > 2:
        out["relative_clean"] = metrics([b.ratio for _, b in clean], [a.ratio for a, _ in clean])
    return out


@dataclass
class ProfileResult:
    """What a profile run did."""

    measured: int = 0
    skipped: int = 0
    retried: int = 0
    repeats: int = 0
    noisy: int = 0  # configurations whose best measurement is still above the noise threshold
    elapsed_s: float = 0.0
    total_samples: int = 0
    repeatability: dict | None = None
    fingerprint: EnvironmentFingerprint | None = field(default=None, repr=False)


def _sample(key: str, kind: str, target: ProfileTarget, counts: Sequence[int], m: Measurement,
            fingerprint: EnvironmentFingerprint, repeat: bool) -> LatencySample:
    ref = m.reference
    return LatencySample(
        key=key, kind=kind, arch=target.arch, resolution=target.resolution, num_classes=target.num_classes,
        in_channels=target.in_channels, keep_counts=list(counts),
        latency_ms=m.sample.median_ms, iqr_ratio=m.sample.iqr_ratio, latency_p10_ms=m.sample.p10_ms,
        reference_ms=ref.median_ms if ref else None, reference_iqr_ratio=ref.iqr_ratio if ref else None,
        reference_p10_ms=ref.p10_ms if ref else None,
        ratio=m.ratio, attempts=m.attempts, noisy=m.noisy, slow=m.slow, runs=m.sample.runs, measured_at=time.time(),
        repeat=repeat, fingerprint=fingerprint)


def profile(spec: DeviceSpec, target: ProfileTarget, store: SampleStore, n_samples: int, seed: int = 0,
            repeat_share: float = 0.05, plan: TimingPlan | None = None, progress: Progress | None = None,
            should_cancel: Callable[[], bool] | None = None, clock: Clock = time.perf_counter,
            noisy_retries: int = 0, sleep: Callable[[float], None] = time.sleep) -> ProfileResult:
    """Measure the first `n_samples` configurations not yet in `store`, retry the noisy ones, then repeat some.

    Every sample is timed alternated run by run with the dense reference; one taken while the reference ran
    slower than its quiet level (a slow spell of the machine) is retried after a pause. With `noisy_retries` > 0, a
    configuration whose measurement stayed noisy after the plan's attempts is measured again after the
    main pass (up to that many more times over all runs): a busy spell has often passed by then. It
    costs time and improves the median-ms label only; the reference ratio is robust without it. A share
    `repeat_share` of the configurations is measured once more at the very end, far apart in time from
    the first measurement, for the repeatability floor.
    """
    if not 0 <= repeat_share <= 1:
        raise ValueError(f"repeat share must be in [0, 1], got {repeat_share}")
    check_runnable(spec)
    started = time.perf_counter()
    todo_plan = ProfilePlan.make(target, store, current_fingerprint(spec), n_samples, seed, repeat_share)
    result = ProfileResult(skipped=len(todo_plan.todo) - len(todo_plan.pending), total_samples=len(todo_plan.todo),
                           fingerprint=todo_plan.fingerprint)
    with tempfile.TemporaryDirectory(prefix="latprune-profile-") as tmp, torch_threads(spec.threads):
        runs = ProfileMeasurer(spec, target, store, todo_plan.fingerprint, Path(tmp), plan, clock, sleep, progress,
                               should_cancel, len(todo_plan.pending) + len(todo_plan.repeat_todo))
        for key, config in todo_plan.pending:
            runs.run_one(key, config, "measure")
            result.measured += 1
        if noisy_retries > 0:
            retry = todo_plan.noisy(noisy_retries)
            runs.total += len(retry)
            for key, config in retry:
                runs.run_one(key, config, "retry")
                result.retried += 1
        for key, config in todo_plan.repeat_todo:
            runs.run_one(key, config, "repeat")
            result.repeats += 1
    final = todo_plan.stored()
    keys = {k for k, _ in todo_plan.todo}
    result.noisy = sum(1 for k, s in best_measurements(final).items() if k in keys and s.noisy)
    result.repeatability = repeatability(final)
    result.elapsed_s = time.perf_counter() - started
    return result


@dataclass
class ProfilePlan:
    """Which configurations a profile run measures: the sampled ones not stored yet, then a share again."""

    target: ProfileTarget
    store: SampleStore
    fingerprint: EnvironmentFingerprint
    todo: list[tuple[str, Any]]
    pending: list[tuple[str, Any]]
    repeat_todo: list[tuple[str, Any]]

    @classmethod
    def make(cls, target: ProfileTarget, store: SampleStore, fingerprint: EnvironmentFingerprint, n_samples: int,
             seed: int, repeat_share: float) -> ProfilePlan:
        configs = sample_configs(target.group_sizes, n_samples, seed)
        todo = [(config_key(c.keep_counts, target.resolution), c) for c in configs]
        plan = cls(target, store, fingerprint, todo, [], [])
        existing = plan.stored()
        done = {s.key for s in existing if not s.repeat}
        repeated = {s.key for s in existing if s.repeat}
        plan.pending = [(k, c) for k, c in todo if k not in done]
        n_repeats = math.ceil(repeat_share * len(configs)) if repeat_share > 0 else 0
        order = np.random.default_rng([seed, 7919]).permutation(len(todo))
        candidates = [todo[i] for i in order if todo[i][0] not in repeated]
        plan.repeat_todo = candidates[:max(0, n_repeats - len(repeated & {k for k, _ in todo}))]
        return plan

    def stored(self) -> list[LatencySample]:
        return [s for s in self.store.load() if s.fingerprint == self.fingerprint and self.target.matches(s)]

    def noisy(self, retries: int) -> list[tuple[str, Any]]:
        """Configurations whose best measurement is still noisy and that were measured at most `retries` times."""
        measured = self.stored()
        best = best_measurements(measured)
        tries = Counter(s.key for s in measured if not s.repeat)
        return [(k, c) for k, c in self.todo if k in best and best[k].noisy and tries[k] <= retries]


class ProfileMeasurer:
    """Times configurations against the dense reference (one quiet level for the run) and stores each sample."""

    def __init__(self, spec: DeviceSpec, target: ProfileTarget, store: SampleStore,
                 fingerprint: EnvironmentFingerprint, workdir: Path, plan: TimingPlan | None, clock: Clock,
                 sleep: Callable[[float], None], progress: Progress | None,
                 should_cancel: Callable[[], bool] | None, total: int):
        self.spec, self.target, self.store, self.fingerprint, self.workdir = spec, target, store, fingerprint, workdir
        self.plan, self.clock, self.sleep = plan, clock, sleep
        self.progress, self.should_cancel = progress, should_cancel
        self.total, self.count = total, 0
        self.reference = make_runner(spec, target, target.group_sizes, workdir, "reference")
        self.quiet = QuietReference()
        if progress:
            progress(0, total, "measure")

    def run_one(self, key: str, config: Any, phase: str) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise ProfileCancelled(f"profile cancelled after {self.count} of {self.total} measurements")
        run = make_runner(self.spec, self.target, config.keep_counts, self.workdir, "sample")
        m = measure(run, self.plan, self.clock, reference=self.reference, quiet=self.quiet, sleep=self.sleep)
        del run
        self.store.append(_sample(key, config.kind, self.target, config.keep_counts, m, self.fingerprint,
                                  phase == "repeat"))
        self.count += 1
        if self.progress:
            self.progress(self.count, self.total, phase)
