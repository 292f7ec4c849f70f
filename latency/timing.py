"""Robust timing of one inference callable: warm-up, blocks of timed runs, median, IQR/median, re-measure.

The machines latprune runs on are shared and noisy, so a latency label is the median of several blocks of
runs, its spread (IQR/median) is recorded, and a measurement whose spread exceeds `max_noise` is repeated.
A dense reference model can be timed in alternation with the sample, run by run: the ratio of the two
models' fast runs (10th percentiles) cancels the drifts of the machine's speed and most of its contention,
which a single absolute median cannot.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from latency.device import DeviceSpec, check_runnable, onnxruntime_provider_names

Clock = Callable[[], float]
Run = Callable[[], object]


@dataclass(frozen=True)
class TimingPlan:
    """How much to run: warm-up runs, blocks x runs per block, noise threshold and re-measure attempts; with a
    QuietReference, how much slower than its quiet level the reference may run (`max_slowdown`) before an
    attempt counts as taken in a slow spell and is retried after `slow_pause_s`, up to `slow_retries` times."""

    warmup_runs: int = 5
    blocks: int = 5
    runs_per_block: int = 10
    max_noise: float = 0.10
    max_attempts: int = 3
    max_slowdown: float = 0.08
    slow_retries: int = 6
    slow_pause_s: float = 0.5

    def __post_init__(self) -> None:
        if min(self.blocks, self.runs_per_block, self.max_attempts) < 1 or self.warmup_runs < 0:
            raise ValueError("blocks, runs_per_block and max_attempts must be >= 1, warmup_runs >= 0")
        if self.max_noise <= 0 or self.max_slowdown <= 0:
            raise ValueError("max_noise and max_slowdown must be > 0")
        if self.slow_retries < 0 or self.slow_pause_s < 0:
            raise ValueError("slow_retries and slow_pause_s must be >= 0")


@dataclass
class Timing:
    """One model's latency: median over all timed runs, IQR/median, 10th percentile, per-block medians."""

    median_ms: float
    iqr_ratio: float
    block_medians_ms: list[float]
    runs: int
    p10_ms: float = 0.0


@dataclass
class Measurement:
    """Outcome of a (possibly repeated) measurement; `reference` and `ratio` only when interleaved."""

    sample: Timing
    reference: Timing | None = None
    ratio: float | None = None
    attempts: int = 1
    noisy: bool = False
    noise_history: list[float] = field(default_factory=list)
    slow: bool = False  # the reference ran slower than its quiet level (see QuietReference)
    slow_retries: int = 0

    @property
    def noise(self) -> float:
        """The larger IQR/median of sample and reference: what decides a re-measure."""
        return max(self.sample.iqr_ratio, self.reference.iqr_ratio if self.reference else 0.0)


class QuietReference:
    """The reference model's 10th percentile in the machine's quiet state: the lowest of the last `window`
    measurements. Windowed, so that a machine that stays slower for good stops counting as in a spell."""

    def __init__(self, window: int = 20):
        self.recent: deque[float] = deque(maxlen=max(1, int(window)))

    @property
    def level_ms(self) -> float | None:
        """The quiet level, or None before any measurement."""
        return min(self.recent) if self.recent else None

    def is_slow(self, reference_p10_ms: float, max_slowdown: float) -> bool:
        """Whether a reference this slow was timed in a slow spell."""
        level = self.level_ms
        return level is not None and level > 0 and reference_p10_ms > level * (1 + max_slowdown)

    def observe(self, reference_p10_ms: float) -> None:
        """Add one measurement of the reference."""
        self.recent.append(float(reference_p10_ms))


def summarize(durations_s: Sequence[float], blocks: Sequence[Sequence[float]]) -> Timing:
    """Median (ms), IQR/median and per-block medians of timed runs given in seconds."""
    values = np.asarray(durations_s, dtype=np.float64)
    median = float(np.median(values))
    p10, q1, q3 = np.percentile(values, [10, 25, 75])
    iqr_ratio = float((q3 - q1) / median) if median > 0 else 0.0
    return Timing(median * 1e3, iqr_ratio, [float(np.median(b)) * 1e3 for b in blocks], len(values),
                  float(p10) * 1e3)


def _time_alternating(runs: Sequence[Run], n: int, clock: Clock) -> list[list[float]]:
    """`n` timed runs of every callable in `runs`, alternating run by run in ABBA order."""
    out: list[list[float]] = [[] for _ in runs]
    for i in range(n):
        # ABBA: each model runs as often right after itself as right after the other one's cache footprint.
        order = range(len(runs)) if i % 2 == 0 else reversed(range(len(runs)))
        for k in order:
            start = clock()
            runs[k]()
            out[k].append(clock() - start)
    return out


def _attempt(run: Run, reference: Run | None, plan: TimingPlan, clock: Clock) -> Measurement:
    runs = [run] if reference is None else [run, reference]
    for _ in range(plan.warmup_runs):
        for fn in runs:
            fn()
    sample_blocks: list[list[float]] = []
    reference_blocks: list[list[float]] = []
    for _ in range(plan.blocks):
        # Alternating run by run rather than block by block: this VM's slow spells (every run +0.5-0.8 ms for
        # a second or so) then hit both models alike. Measured over 90 s here, the ratio of 10th percentiles
        # of 50 alternated pairs varied 3.6% (cv); timed in blocks of 10 runs, 11%.
        timed = _time_alternating(runs, plan.runs_per_block, clock)
        sample_blocks.append(timed[0])
        if reference is not None:
            reference_blocks.append(timed[1])
    sample = summarize([t for blk in sample_blocks for t in blk], sample_blocks)
    if reference is None:
        return Measurement(sample)
    ref = summarize([t for blk in reference_blocks for t in blk], reference_blocks)
    # Other processes only ever add time to a run, so under contention a low quantile is the stable
    # location; measured here (8 repeats, load ~3.5 on 2 cores) the ratio of 10th percentiles varied
    # 1-4% where the ratio of medians varied 5-30%. Alternating keeps both quantiles from the same spell.
    ratio = sample.p10_ms / ref.p10_ms if ref.p10_ms > 0 else None
    return Measurement(sample, ref, ratio)


def measure(run: Run, plan: TimingPlan | None = None, clock: Clock = time.perf_counter,
            reference: Run | None = None, quiet: QuietReference | None = None,
            sleep: Callable[[float], None] = time.sleep) -> Measurement:
    """Time `run` (and `reference` alternated with it run by run, if given); re-measure while too noisy, and,
    given `quiet`, while the reference runs slower than its quiet level (a slow spell; `quiet` learns from
    every attempt).

    Keeps the least noisy attempt outside slow spells (if all were in one: the one with the fastest reference);
    `noisy` is True when that attempt's IQR/median is over plan.max_noise.
    """
    plan = plan or TimingPlan()
    gate = quiet if reference is not None else None
    attempts: list[Measurement] = []
    history = []
    noisy_left, slow_left = plan.max_attempts, plan.slow_retries if gate is not None else 0
    while True:
        current = _attempt(run, reference, plan, clock)
        history.append(current.noise)
        attempts.append(current)
        if gate is not None:
            # This VM has spells of 0.25-3.5 s in which every inference takes 0.4-0.8 ms longer; the fixed
            # extra time inflates a small model's ratio to the dense one (0.39 read as 0.47-0.49), so a reading
            # taken in one is retried once the spell has passed.
            slow = gate.is_slow(current.reference.p10_ms, plan.max_slowdown)
            gate.observe(current.reference.p10_ms)
            if slow and slow_left > 0:
                slow_left -= 1
                sleep(plan.slow_pause_s)
                continue
        noisy_left -= 1
        if current.noise <= plan.max_noise or noisy_left == 0:
            break
    if gate is not None:
        for m in attempts:
            m.slow = gate.is_slow(m.reference.p10_ms, plan.max_slowdown)
    calm = [m for m in attempts if not m.slow]
    best = min(calm, key=lambda m: m.noise) if calm else min(attempts, key=lambda m: m.reference.p10_ms)
    best.attempts = len(history)
    best.noise_history = history
    best.noisy = best.noise > plan.max_noise
    best.slow_retries = sum(1 for m in attempts if m.slow)
    return best


def relative_reading(readings: Sequence[Measurement], reference_ms: float) -> dict[str, float]:
    """{'ms', 'ratio', 'raw_ms', 'slow_retries'} of alternated readings of one model: ms = the median ratio to the
    reference x `reference_ms`, raw_ms = the median of the model's own medians, slow_retries summed."""
    ratio = float(np.median([float(m.ratio) for m in readings]))
    return {"ms": ratio * reference_ms, "ratio": ratio,
            "raw_ms": float(np.median([m.sample.median_ms for m in readings])),
            "slow_retries": sum(int(m.slow_retries) for m in readings)}


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run a block with torch's intra-op thread count set to `threads`, restoring it afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def input_shape(spec: DeviceSpec, in_channels: int, resolution: int) -> tuple[int, int, int, int]:
    """The NCHW shape every inference on the device uses."""
    return (spec.batch, in_channels, resolution, resolution)


def onnxruntime_session(onnx_path: str | Path, spec: DeviceSpec):
    """An InferenceSession with the device's settings: fixed threads, sequential, no spinning, full opt."""
    import onnxruntime as ort

    check_runnable(spec)
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn the shared cores between runs and make neighbours' timings (and ours) noisy.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    provider = onnxruntime_provider_names()[spec.provider]
    return ort.InferenceSession(str(onnx_path), options, providers=[provider])


class OnnxRuntimeRunner:
    """One inference of an ONNX model per call, with a fixed random input of the model's input shape."""

    def __init__(self, onnx_path: str | Path, spec: DeviceSpec, seed: int = 0):
        self.session = onnxruntime_session(onnx_path, spec)
        inp = self.session.get_inputs()[0]
        dtype = np.float16 if "float16" in inp.type else np.float32
        shape = [d if isinstance(d, int) else spec.batch for d in inp.shape]
        self.feed = {inp.name: np.random.default_rng(seed).standard_normal(shape).astype(dtype)}

    def __call__(self) -> None:
        self.session.run(None, self.feed)


class TorchRunner:
    """One inference of a torch model per call (inference mode; CUDA synchronised so the time is real)."""

    def __init__(self, model, spec: DeviceSpec, shape: Sequence[int]):
        import torch

        check_runnable(spec)
        self.device = torch.device("cuda" if spec.provider == "cuda" else "cpu")
        dtype = torch.float16 if spec.precision == "fp16" else torch.float32
        self.model = model.to(self.device, dtype).eval()
        self.x = torch.randn(*shape, device=self.device, dtype=dtype)
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else None
        self.torch = torch

    def __call__(self) -> None:
        with self.torch.inference_mode():
            self.model(self.x)
        if self.sync is not None:
            self.sync()
