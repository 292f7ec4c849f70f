"""The local latency state under a latprune home: devices/, profiles/, predictors/; and the loader the engine uses.

    <home>/devices/<device>.json
    <home>/profiles/<device>/<arch>_r<resolution>.jsonl
    <home>/predictors/<device>/<arch>_r<resolution>[-<resolution>...].{safetensors,json}
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from latency.device import DEVICE_NAME, DeviceError, DeviceSpec, load_device, save_device
from latency.lpnet import PredictorError
from latency.lpnet_io import read_meta
from latency.samples import LatencySample, SampleStore

HOME_ENV = "LATPRUNE_HOME"
DEFAULT_HOME = ".latprune"
ARCH_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
PROFILE_FILE = re.compile(r"^(?P<arch>[A-Za-z0-9_]+)_r(?P<res>\d+)\.jsonl$")


def resolve_home(home: str | Path | None = None) -> Path:
    """The latprune home: `home` if given, else $LATPRUNE_HOME, else ./.latprune."""
    return Path(home or os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().absolute()


def _check_device(name: str) -> str:
    if not DEVICE_NAME.match(name):
        raise DeviceError(f"device name {name!r} must be 1-63 lower-case letters, digits, '_', '.' or '-', "
                          "starting with a letter or digit")
    return name


def _check_arch(arch: str) -> str:
    if not ARCH_NAME.match(arch):
        raise ValueError(f"architecture name {arch!r} may hold only letters, digits and '_'")
    return arch


class LatencyHome:
    """Paths and listings of devices, profiles and predictors under one home directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def device_path(self, name: str) -> Path:
        return self.root / "devices" / f"{_check_device(name)}.json"

    def add_device(self, spec: DeviceSpec, replace: bool = False) -> Path:
        """Register a device; an existing one of that name is kept unless `replace`."""
        path = self.device_path(spec.name)
        if path.exists() and not replace:
            raise DeviceError(f"device {spec.name!r} exists; pass replace to overwrite it")
        return save_device(spec, path)

    def device(self, name: str) -> DeviceSpec:
        """A registered device, or DeviceError naming the known ones."""
        path = self.device_path(name)
        if not path.exists():
            known = ", ".join(d.name for d in self.devices()) or "none"
            raise DeviceError(f"unknown device {name!r} (known: {known}); add it with `latprune device add`")
        return load_device(path)

    def devices(self) -> list[DeviceSpec]:
        """All registered devices, by name."""
        folder = self.root / "devices"
        return [load_device(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []

    def profile_path(self, device: str, arch: str, resolution: int) -> Path:
        """JSONL sample file of (device, arch, resolution)."""
        return self.root / "profiles" / _check_device(device) / f"{_check_arch(arch)}_r{int(resolution)}.jsonl"

    def profiled_resolutions(self, device: str, arch: str) -> list[int]:
        """Resolutions with a sample file for (device, arch)."""
        folder = self.root / "profiles" / _check_device(device)
        out = []
        for p in folder.glob(f"{_check_arch(arch)}_r*.jsonl") if folder.is_dir() else []:
            m = PROFILE_FILE.match(p.name)
            if m and m["arch"] == arch:
                out.append(int(m["res"]))
        return sorted(out)

    def samples(self, device: str, arch: str, resolutions: list[int]) -> list[LatencySample]:
        """Every stored sample of (device, arch) at `resolutions`."""
        out = []
        for res in resolutions:
            out += SampleStore(self.profile_path(device, arch, res)).load()
        return out

    def predictor_stem(self, device: str, arch: str, resolutions: list[int]) -> Path:
        """Where the predictor of (device, arch, resolutions) is saved (without suffix)."""
        tag = "-".join(str(int(r)) for r in sorted(resolutions))
        return self.root / "predictors" / _check_device(device) / f"{_check_arch(arch)}_r{tag}"

    def find_predictor(self, device: str, arch: str, resolution: int) -> Path:
        """The predictor covering `resolution`: the single-resolution one if fitted, else a multi-resolution one."""
        single = self.predictor_stem(device, arch, [resolution])
        if single.with_name(single.name + ".json").exists():
            return single
        folder = self.root / "predictors" / _check_device(device)
        for meta_path in sorted(folder.glob(f"{_check_arch(arch)}_r*.json")) if folder.is_dir() else []:
            stem = meta_path.with_suffix("")
            try:
                meta = read_meta(stem)
            except PredictorError:
                continue
            if meta.arch == arch and resolution in meta.resolutions:
                return stem
        raise PredictorError(f"no latency predictor for {arch} at resolution {resolution} on device {device!r}; "
                             f"run `latprune profile` and `latprune predictor fit` first")


def load_latency_model(home: str | Path, device_name: str, arch: str, resolution: int, force: bool = False,
                       calibrate: bool = False):
    """The LatencyModel of (device, arch, resolution) from `home`; refuses another environment unless `force`."""
    from latency.device import current_fingerprint
    from latency.latency_model import LatencyModel
    from latency.lpnet_io import load_predictor

    store = LatencyHome(home)
    spec = store.device(device_name)
    stem = store.find_predictor(device_name, arch, resolution)
    net, meta = load_predictor(stem, current_fingerprint(spec), force=force)
    model = LatencyModel(net, meta, spec, resolution)
    if calibrate:
        model.calibrate()
    return model
