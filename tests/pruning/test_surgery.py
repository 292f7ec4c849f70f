import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pruning import zoo
from pruning.allocation import round_counts
from pruning.surgery import (
    channel_scales,
    export_onnx,
    fold_scales,
    materialize,
    pruned_arch,
)


def random_masks(graph, keep_fraction, seed):
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for size in graph.sizes:
        mask = torch.rand(size, generator=gen) < keep_fraction
        mask[torch.randint(size, (1,), generator=gen)] = True
        masks.append(mask)
    return masks


def flop_count_macs(model, x):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("keep_fraction", [0.3, 0.7])
def test_materialized_equals_masked_and_onnx_matches(engine_case, keep_fraction, tmp_path):
    arch, resolution, model, graph, cost = engine_case
    masks = random_masks(graph, keep_fraction, seed=int(keep_fraction * 10))
    x = torch.randn(2, 3, resolution, resolution)
    with torch.no_grad(), channel_scales(model, graph, [m.float() for m in masks]):
        masked_out = model(x)
    compact = materialize(model, graph, masks).eval()
    with torch.no_grad():
        compact_out = compact(x)
    assert (masked_out - compact_out).abs().max().item() <= 1e-4
    counts = [int(m.sum()) for m in masks]
    # Physical removal really happened and the cost model counts it exactly.
    assert zoo.param_count(compact) == int(cost.params(counts)) < cost.dense_params
    assert flop_count_macs(compact, x[:1]) == pytest.approx(float(cost.macs(counts)), rel=0.005)
    # The arch.json computed from counts alone rebuilds the same shapes.
    arch_json = pruned_arch(zoo.describe(model, arch, 10, 3, resolution), cost, counts)
    zoo.rebuild(arch_json).load_state_dict(compact.state_dict())

    path = export_onnx(compact, tmp_path / "m.onnx", (1, 3, resolution, resolution))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"input": x[:1].numpy()})[0]
    assert np.abs(onnx_out - compact_out[:1].numpy()).max() <= 1e-4


def test_scales_fold_exactly(built):
    model, graph, _ = built("resnet20", 32)
    gen = torch.Generator().manual_seed(3)
    scales = [torch.rand(size, generator=gen) * 2 - 0.5 for size in graph.sizes]
    masks = [s > 0.2 for s in scales]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), channel_scales(model, graph, [s * m for s, m in zip(scales, masks, strict=True)]):
        reference = model(x)
    compact = materialize(model, graph, masks, scales=scales).eval()
    with torch.no_grad():
        assert (compact(x) - reference).abs().max().item() <= 1e-4
    copy = zoo.build_model("resnet20")
    copy.load_state_dict(model.state_dict())
    copy.eval()
    fold_scales(copy, graph, scales)
    with torch.no_grad(), channel_scales(model, graph, scales):
        assert (copy(x) - model(x)).abs().max().item() <= 1e-4


def test_materialize_rejects_empty_group(built):
    model, graph, _ = built("resnet20", 32)
    masks = [torch.ones(s, dtype=torch.bool) for s in graph.sizes]
    masks[0][:] = False
    with pytest.raises(ValueError, match="keep no channel"):
        materialize(model, graph, masks)


def test_round_counts_to_multiples():
    assert round_counts([5, 13, 30, 64], [16, 16, 32, 64], 8) == [8, 16, 32, 64]
    assert round_counts([1, 3], [4, 64], 8) == [4, 8]
    assert round_counts([5, 7], [16, 16], 1) == [5, 7]
