"""LPNet: an MLP from per-group keep ratios (+ resolution) to latency on one device; fit, predict, save, load.

The input features are computed inside the module from the keep ratios, so `predict_ms` is differentiable
end to end: keep ratios -> per-layer MAC shares (bilinear, as in pruning.cost) -> MLP -> latency.
Channel-block alignment features (is the kept count a multiple of 8 / 16?) are step functions of the
counts: they move the prediction to the right side of onnxruntime's block cliffs but carry no gradient.
Saved as safetensors (tensors) + JSON (metadata); never pickle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

FORMAT = "latprune.lpnet/1"
Target = Literal["log_ratio", "log_ms"]
ALIGN_FEATURES = 3  # per group: count % 8 != 0, count % 16 != 0, distance to the next multiple of 16 / 16


class PredictorError(ValueError):
    """A predictor file that is missing, corrupt, or used outside what it was fitted for."""


class FingerprintMismatchError(PredictorError):
    """The predictor was fitted in another environment (hardware, library versions, thread settings)."""


class WidthFeatures(nn.Module):
    """Keep ratios [B, G] -> features [B, F]: ratios, per-layer MAC shares, log MAC ratio, alignment, resolution.

    Holds the cost structure of pruning.cost.CostModel (one MAC factor row per resolution) as buffers, so a
    loaded predictor computes its features without rebuilding the model or its channel graph.
    """

    def __init__(self, n_groups: int, n_layers: int, resolutions: Sequence[int]):
        super().__init__()
        self.resolutions = [int(r) for r in resolutions]
        n_res = len(self.resolutions)
        self.register_buffer("group_sizes", torch.ones(n_groups))
        self.register_buffer("a_out", torch.zeros(n_layers, n_groups))
        self.register_buffer("a_in", torch.zeros(n_layers, n_groups))
        self.register_buffer("full_in", torch.ones(n_layers))
        self.register_buffer("full_out", torch.ones(n_layers))
        self.register_buffer("conv_groups", torch.ones(n_layers))
        self.register_buffer("depthwise", torch.zeros(n_layers))
        self.register_buffer("mac_factor", torch.ones(n_res, n_layers))
        self.register_buffer("dense_macs", torch.ones(n_res))

    @classmethod
    def from_cost_models(cls, cost_models: Sequence[Any], resolutions: Sequence[int]) -> WidthFeatures:
        """Copy the cost structure of one CostModel per resolution (same architecture, same groups)."""
        first = cost_models[0]
        features = cls(len(first.group_sizes), len(first.layers), resolutions)
        for cm in cost_models[1:]:
            if cm.a_out.shape != first.a_out.shape or not torch.equal(cm.a_out, first.a_out):
                raise PredictorError("cost models of different resolutions disagree on the channel groups")
        with torch.no_grad():
            features.group_sizes.copy_(first.group_sizes)
            features.a_out.copy_(first.a_out)
            features.a_in.copy_(first.a_in)
            features.full_in.copy_(first.full_in)
            features.full_out.copy_(first.full_out)
            features.conv_groups.copy_(first.conv_groups)
            features.depthwise.copy_(first.depthwise.float())
            for i, cm in enumerate(cost_models):
                features.mac_factor[i].copy_(cm.mac_factor)
                features.dense_macs[i] = float(cm.dense_macs)
        return features

    @property
    def n_groups(self) -> int:
        return self.group_sizes.numel()

    @property
    def n_features(self) -> int:
        n_res = len(self.resolutions)
        return self.n_groups * (1 + ALIGN_FEATURES) + self.a_out.shape[0] + 1 + (n_res if n_res > 1 else 0)

    def layer_macs(self, keep_ratios: torch.Tensor, res_index: torch.Tensor) -> torch.Tensor:
        """MACs of every conv/linear layer [B, L] (same formula as pruning.cost.CostModel.macs)."""
        removed = self.group_sizes * (1 - keep_ratios)
        out = self.full_out - removed @ self.a_out.T
        cin = torch.where(self.depthwise > 0, out, self.full_in - removed @ self.a_in.T)
        in_per_group = torch.where(self.depthwise > 0, torch.ones_like(cin), cin / self.conv_groups)
        return self.mac_factor[res_index] * out * in_per_group

    def forward(self, keep_ratios: torch.Tensor, res_index: torch.Tensor) -> torch.Tensor:
        macs = self.layer_macs(keep_ratios, res_index)
        dense = self.dense_macs[res_index].unsqueeze(1)
        share = macs / dense
        log_ratio = torch.log(share.sum(1, keepdim=True).clamp_min(1e-9))
        with torch.no_grad():
            counts = torch.clamp(torch.round(keep_ratios * self.group_sizes), min=1)
            align = [(counts % 8 != 0).float(), (counts % 16 != 0).float(), ((-counts) % 16) / 16]
        parts = [keep_ratios, share, log_ratio, *align]
        if len(self.resolutions) > 1:
            parts.append(nn.functional.one_hot(res_index, len(self.resolutions)).float())
        return torch.cat(parts, dim=1)


class LPNet(nn.Module):
    """Latency predictor of one (device, architecture): features -> standardised MLP -> log latency target."""

    def __init__(self, features: WidthFeatures, hidden: Sequence[int] = (256, 256), target: Target = "log_ratio",
                 members: int = 1):
        super().__init__()
        if target not in ("log_ratio", "log_ms"):
            raise PredictorError(f"target must be log_ratio or log_ms, got {target!r}")
        if members < 1:
            raise PredictorError(f"an LPNet needs at least one member, got {members}")
        self.features = features
        self.target = target
        self.hidden = [int(h) for h in hidden]
        n_in = features.n_features
        self.register_buffer("feature_mean", torch.zeros(n_in))
        self.register_buffer("feature_std", torch.ones(n_in))
        self.register_buffer("target_mean", torch.zeros(1))
        self.register_buffer("target_std", torch.ones(1))
        self.register_buffer("reference_ms", torch.ones(len(features.resolutions)))
        self.members = nn.ModuleList(self._mlp(n_in) for _ in range(members))

    def _mlp(self, n_in: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        width = n_in
        for h in self.hidden:
            # SiLU, not ReLU: a smooth network gives smooth gradients to the keep ratios.
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        return nn.Sequential(*layers)

    @property
    def resolutions(self) -> list[int]:
        return self.features.resolutions

    def resolution_index(self, resolution: int | None, batch: int) -> torch.Tensor:
        """Index of `resolution` among the fitted ones (None: the only one), repeated `batch` times."""
        if resolution is None:
            if len(self.resolutions) > 1:
                raise PredictorError(f"this predictor covers resolutions {self.resolutions}; say which one")
            index = 0
        elif int(resolution) in self.resolutions:
            index = self.resolutions.index(int(resolution))
        else:
            raise PredictorError(f"this predictor was fitted for resolutions {self.resolutions}, not {resolution}")
        return torch.full((batch,), index, dtype=torch.long, device=self.reference_ms.device)

    def standardized(self, features: torch.Tensor, member: int | None = None) -> torch.Tensor:
        """Standardised prediction from features computed by self.features: one member's, or the members' mean."""
        x = (features - self.feature_mean) / self.feature_std
        if member is not None:
            return self.members[member](x).squeeze(1)
        return torch.stack([m(x).squeeze(1) for m in self.members]).mean(0)

    def forward(self, keep_ratios: torch.Tensor, res_index: torch.Tensor) -> torch.Tensor:
        """Prediction in target space (log ratio to the reference, or log ms)."""
        z = self.standardized(self.features(keep_ratios, res_index))
        return z * self.target_std + self.target_mean

    def _batched(self, keep_ratios: torch.Tensor) -> tuple[torch.Tensor, bool]:
        ratios = torch.as_tensor(keep_ratios)
        single = ratios.dim() == 1
        ratios = ratios.unsqueeze(0) if single else ratios
        if ratios.dim() != 2 or ratios.shape[1] != self.features.n_groups:
            raise PredictorError(f"keep ratios must have shape [{self.features.n_groups}] or "
                                 f"[batch, {self.features.n_groups}], got {tuple(ratios.shape)}")
        return ratios.to(self.reference_ms.device, torch.float32), single

    def predict_ratio(self, keep_ratios: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
        """Latency relative to the dense reference; [G] -> scalar, [B, G] -> [B]; differentiable."""
        ratios, single = self._batched(keep_ratios)
        index = self.resolution_index(resolution, len(ratios))
        y = self(ratios, index)
        out = torch.exp(y) if self.target == "log_ratio" else torch.exp(y) / self.reference_ms[index]
        return out[0] if single else out

    def predict_ms(self, keep_ratios: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
        """Latency in ms; [G] -> scalar, [B, G] -> [B]; differentiable with respect to the keep ratios."""
        ratios, single = self._batched(keep_ratios)
        index = self.resolution_index(resolution, len(ratios))
        y = self(ratios, index)
        out = torch.exp(y) * self.reference_ms[index] if self.target == "log_ratio" else torch.exp(y)
        return out[0] if single else out


@dataclass(frozen=True)
class FitConfig:
    """LPNet training: MLP size, AdamW, mini-batches, early stopping on a validation split."""

    hidden: tuple[int, ...] = (256, 256)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    max_epochs: int = 800
    patience: int = 80
    val_share: float = 0.15
    seed: int = 0
    threads: int = 1  # a small MLP trains fastest on one thread; more only contend on shared cores
    # Huber in log-latency units: quadratic within +-delta (~ +-5%), linear beyond, so the few samples a
    # busy machine ruined pull on the fit no harder than a 5% error does.
    huber_delta: float = 0.05
    # Members trained from different initialisations and validation splits; their mean (in log space)
    # has lower variance than any one of them, and so do its gradients.
    members: int = 4


def fit_lpnet(features: WidthFeatures, keep_ratios: torch.Tensor, res_index: torch.Tensor, target_values: torch.Tensor,
              reference_ms: Sequence[float], target: Target = "log_ratio", config: FitConfig | None = None,
              sample_weights: torch.Tensor | None = None) -> tuple[LPNet, dict]:
    """Fit an LPNet on (keep ratios, resolution index) -> target values (already log-transformed)."""
    from latency.timing import torch_threads

    config = config or FitConfig()
    weights = torch.ones(len(keep_ratios)) if sample_weights is None else sample_weights.float()
    # fork_rng: seeding the initialisation must not reseed the caller's global generator.
    with torch_threads(config.threads), torch.random.fork_rng():
        torch.manual_seed(config.seed)
        return _fit(features, keep_ratios, res_index, target_values, reference_ms, target, config, weights)


def _weighted_huber(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, delta: float) -> torch.Tensor:
    losses = nn.functional.huber_loss(pred, target, delta=delta, reduction="none")
    return (losses * weights).sum() / weights.sum()


def _fit(features: WidthFeatures, keep_ratios: torch.Tensor, res_index: torch.Tensor, target_values: torch.Tensor,
         reference_ms: Sequence[float], target: Target, config: FitConfig,
         weights: torch.Tensor) -> tuple[LPNet, dict]:
    n = len(keep_ratios)
    if n < 4:
        raise PredictorError(f"fitting needs at least 4 samples, got {n}")
    net = LPNet(features, config.hidden, target, config.members)
    y = target_values.float()
    with torch.no_grad():
        feats = features(keep_ratios.float(), res_index)
        mean, std = feats.mean(0), feats.std(0)
        net.feature_mean.copy_(mean)
        net.feature_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
        net.target_mean.fill_(float(y.mean()))
        net.target_std.fill_(float(y.std()) if n > 1 and float(y.std()) > 1e-6 else 1.0)
        net.reference_ms.copy_(torch.as_tensor(reference_ms, dtype=torch.float32))
    z = (y - net.target_mean) / net.target_std
    delta = config.huber_delta / float(net.target_std)
    n_val = max(1, int(round(config.val_share * n)))
    infos = []
    for k in range(config.members):
        generator = torch.Generator().manual_seed(config.seed * 1000 + k)
        order = torch.randperm(n, generator=generator)
        infos.append(_fit_member(net, k, feats, z, weights, order[n_val:], order[:n_val], delta, config, generator))
    net.eval()
    info = {"epochs": [i[0] for i in infos], "best_epoch": [i[1] for i in infos],
            "val_huber_log": float(sum(i[2] for i in infos) / len(infos)) * float(net.target_std) ** 2,
            "train_samples": n - n_val, "val_samples": n_val, "members": config.members}
    return net, info


def _fit_member(net: LPNet, k: int, feats: torch.Tensor, z: torch.Tensor, weights: torch.Tensor, train: torch.Tensor,
                val: torch.Tensor, delta: float, config: FitConfig,
                generator: torch.Generator) -> tuple[int, int, float]:
    mlp = net.members[k]
    optimizer = torch.optim.AdamW(mlp.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=config.patience // 3)
    best_loss, best_state, best_epoch, epoch = math.inf, None, 0, 0
    for epoch in range(1, config.max_epochs + 1):
        mlp.train()
        perm = train[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(perm), config.batch_size):
            batch = perm[start:start + config.batch_size]
            loss = _weighted_huber(net.standardized(feats[batch], k), z[batch], weights[batch], delta)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        mlp.eval()
        with torch.no_grad():
            val_loss = float(_weighted_huber(net.standardized(feats[val], k), z[val], weights[val], delta))
        scheduler.step(val_loss)
        if val_loss < best_loss - 1e-7:
            best_loss, best_epoch = val_loss, epoch
            best_state = {name: v.detach().clone() for name, v in mlp.state_dict().items()}
        elif epoch - best_epoch >= config.patience:
            break
    if best_state is not None:
        mlp.load_state_dict(best_state)
    return epoch, best_epoch, best_loss
