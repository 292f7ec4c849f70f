from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from latency.device import current_fingerprint, make_device
from latency.lpnet import FingerprintMismatchError, FitConfig, PredictorError, WidthFeatures, fit_lpnet
from latency.lpnet_io import PredictorMeta, load_predictor, predictor_paths, save_predictor
from latency.sampler import sample_configs

FAST = FitConfig(hidden=(32, 32), max_epochs=200, patience=40, batch_size=32, members=2)


def synthetic(target, n=160, seed=0):
    """Keep ratios and a latency ratio that is MAC-driven plus a penalty for counts off the 8-channel grid."""
    sizes = np.asarray(target.group_sizes)
    configs = sample_configs(list(sizes), n, seed)
    counts = np.asarray([c.keep_counts for c in configs], dtype=np.float64)
    macs = np.asarray([float(target.cost.macs(list(c))) for c in counts]) / target.cost.dense_macs
    ratio = 0.1 + 0.9 * macs + 0.1 * (counts % 8 != 0).mean(1)
    return torch.as_tensor(counts / sizes, dtype=torch.float32), torch.as_tensor(ratio, dtype=torch.float32)


@pytest.fixture(scope="module")
def fitted(tiny_target):
    features = WidthFeatures.from_cost_models([tiny_target.cost], [tiny_target.resolution])
    x, ratio = synthetic(tiny_target)
    index = torch.zeros(len(x), dtype=torch.long)
    net, info = fit_lpnet(features, x[:120], index[:120], torch.log(ratio[:120]), [2.0], "log_ratio", FAST)
    return net, info, x, ratio


def meta_for(net, target, device_name="cpu1", threads=1):
    spec = make_device(name=device_name, threads=threads)
    return PredictorMeta(arch=target.arch, device=spec, fingerprint=current_fingerprint(spec),
                         resolutions=[target.resolution], group_sizes=target.group_sizes,
                         n_layers=int(net.features.a_out.shape[0]), target=net.target, hidden=net.hidden,
                         members=len(net.members), reference_ms=net.reference_ms.tolist(), training_samples=100,
                         validation_samples=20)


def test_fit_learns_held_out_latencies(fitted):
    net, info, x, ratio = fitted
    assert info["train_samples"] + info["val_samples"] == 120
    predicted = net.predict_ratio(x[120:]).detach()
    error = ((predicted - ratio[120:]).abs() / ratio[120:]).mean()
    assert error < 0.05
    assert torch.allclose(net.predict_ms(x[120:]), predicted * 2.0, rtol=1e-5)


def test_features_match_the_engine_cost_model(tiny_target):
    features = WidthFeatures.from_cost_models([tiny_target.cost], [tiny_target.resolution])
    counts = [max(1, s // 3) for s in tiny_target.group_sizes]
    ratios = torch.tensor([[c / s for c, s in zip(counts, tiny_target.group_sizes, strict=True)]])
    macs = features.layer_macs(ratios, torch.zeros(1, dtype=torch.long)).sum()
    assert float(macs) == pytest.approx(float(tiny_target.cost.macs(counts)), rel=1e-5)


def test_predict_is_differentiable_and_batched(fitted):
    net = fitted[0]
    ratios = torch.full((net.features.n_groups,), 0.6, requires_grad=True)
    ms = net.predict_ms(ratios)
    assert ms.dim() == 0
    ms.backward()
    assert ratios.grad is not None and torch.isfinite(ratios.grad).all() and ratios.grad.abs().sum() > 0
    batch = torch.rand(5, net.features.n_groups) * 0.9 + 0.1
    together = net.predict_ms(batch)
    assert together.shape == (5,)
    assert torch.allclose(together, torch.stack([net.predict_ms(r) for r in batch]), rtol=1e-5)
    with pytest.raises(PredictorError, match="keep ratios must have shape"):
        net.predict_ms(torch.ones(3))
    with pytest.raises(PredictorError, match="resolutions"):
        net.predict_ms(batch, resolution=999)


def test_save_load_round_trip_without_pickle(fitted, tiny_target, tmp_path):
    net = fitted[0]
    meta = meta_for(net, tiny_target)
    weights, meta_path = save_predictor(net, meta, tmp_path / "p" / "resnet20_r16")
    assert weights.read_bytes()[8:9] == b"{"  # safetensors header, not a pickle
    assert json.loads(meta_path.read_text())["arch"] == tiny_target.arch
    loaded, loaded_meta = load_predictor(tmp_path / "p" / "resnet20_r16", meta.fingerprint)
    assert loaded_meta.fingerprint == meta.fingerprint and loaded_meta.created_at > 0
    x = fitted[2][:10]
    assert torch.equal(loaded.predict_ms(x), net.predict_ms(x))


def test_fingerprint_mismatch_is_refused_unless_forced(fitted, tiny_target, tmp_path):
    net = fitted[0]
    stem = tmp_path / "resnet20_r16"
    save_predictor(net, meta_for(net, tiny_target, threads=1), stem)
    elsewhere = current_fingerprint(make_device(name="cpu1", threads=2))
    with pytest.raises(FingerprintMismatchError, match="threads: 1 != 2"):
        load_predictor(stem, elsewhere)
    loaded, _ = load_predictor(stem, elsewhere, force=True)
    assert loaded is not None


def test_corrupt_predictor_files_are_clear_errors(fitted, tiny_target, tmp_path):
    net = fitted[0]
    stem = tmp_path / "resnet20_r16"
    weights, meta_path = save_predictor(net, meta_for(net, tiny_target), stem)
    weights.write_bytes(b"\x00" * 32)
    with pytest.raises(PredictorError):
        load_predictor(stem)
    meta_path.write_text("{}")
    with pytest.raises(PredictorError, match="not predictor metadata"):
        load_predictor(stem)
    with pytest.raises(PredictorError, match="no predictor metadata"):
        load_predictor(tmp_path / "missing")
    assert predictor_paths(stem)[0].name == "resnet20_r16.safetensors"
