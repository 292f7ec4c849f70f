"""One OFA cohort vs separately pruned networks: accuracy per member and total training wall-clock.

Usage: python bench/cohort.py [--search-epochs 20 --joint-epochs 20] [--tiny] [--json results.json]
resnet20 on builtin:digits, budgets {0.75, 0.5, 0.3} (fractions of the dense MACs at 32 px) x resolutions
{32, 24}. Each member of the one ofa training is compared with an l1-pruned network at the member's MACs and
resolution: a dense network trained for --search-epochs at that resolution, pruned by l1, fine-tuned alone for
--joint-epochs (the epochs each member shares in the cohort's joint training).

Cost model: both sides are charged everything from data to exported members. ofa: search (the dense training,
with the L1 penalty, at the largest resolution; fewer epochs if the early bird stops it), joint training, then
per member BN recalibration, evaluation and export, plus the full network's recalibration and evaluation. l1,
separate jobs: each member's own dense training at its resolution, pruning, fine-tuning, evaluation and export
(what six independent jobs cost). The stricter row shares one dense training per resolution between the three
budgets. One-time imports (ONNX export, data) are warmed up before either is timed. Wall-clock and process CPU
seconds are both reported: CPU seconds are what to compare when other work shares the machine (a niced process
under load gets a fraction of a core, which once made the cohort look 5x slower than it was).
Prints markdown tables; --tiny is a smoke test (1 epoch, few batches).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from pruning import zoo
from pruning.budget import Budget
from pruning.cohort import run_cohort
from pruning.data import load_dataset, make_loaders
from pruning.pipeline import PruneRequest, run_prune
from pruning.surgery import export_onnx
from pruning.train import evaluate, pick_device, seed_everything, train

ARCH, DATASET = "resnet20", "builtin:digits"


def machine(device: torch.device) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{cpu}{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


class Clock:
    """Wall-clock and process CPU seconds since start()."""

    def start(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def warm_up(work: Path, resolutions: list[int]) -> None:
    """Pay one-time costs (ONNX exporter imports, dataset loading) before anything is timed."""
    for resolution in resolutions:
        load_dataset(DATASET, None, resolution)
    export_onnx(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)), work / "warm.onnx",
                (1, 1, 8, 8))


def dense_weights(resolution: int, epochs: int, args, work: Path) -> tuple[Path, tuple[float, float], float]:
    """Train the dense network at `resolution`; returns (weights, (wall s, cpu s), test accuracy)."""
    splits = load_dataset(DATASET, None, resolution)
    train_loader, _, test_loader = make_loaders(splits, args.batch_size, args.seed)
    seed_everything(args.seed)
    model = zoo.build_model(ARCH, splits.num_classes, splits.in_channels)
    clock = Clock().start()
    train(model, train_loader, epochs, lr=args.lr, device=args.device, seed=args.seed)
    seconds = clock.read()
    path = work / f"dense-{resolution}.safetensors"
    zoo.save_weights(model.cpu(), path)
    return path, seconds, evaluate(model, test_loader, args.device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5, 0.3])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 24])
    parser.add_argument("--search-epochs", type=int, default=20, help="ofa search (max) = l1 dense epochs")
    parser.add_argument("--joint-epochs", type=int, default=20, help="ofa joint = l1 fine-tune epochs")
    parser.add_argument("--sampled", type=int, default=2, help="K sampled members per joint step")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="smoke test: 1 epoch each, 2 calibration batches")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.tiny:
        args.search_epochs, args.joint_epochs = 1, 1
    args.device = pick_device(args.device)
    params = {"budgets": args.budgets, "resolutions": args.resolutions, "sampled_members": args.sampled,
              "recalibration_batches": 2 if args.tiny else 20}

    with tempfile.TemporaryDirectory(prefix="latprune-bench-cohort-") as tmp:
        work = Path(tmp)
        warm_up(work, args.resolutions)
        request = PruneRequest(arch=ARCH, dataset=DATASET, method="ofa", budget=Budget("flops", args.budgets[0]),
                               epochs=args.search_epochs, finetune_epochs=args.joint_epochs, params=params,
                               resolution=max(args.resolutions), seed=args.seed, batch_size=args.batch_size,
                               lr=args.lr, finetune_lr=args.finetune_lr, device=str(args.device))
        clock = Clock().start()
        cohort = run_cohort(request, work / "cohort")
        ofa_wall, ofa_cpu = clock.read()

        dense = {r: dense_weights(r, args.search_epochs, args, work) for r in args.resolutions}
        rows = []
        for member in cohort["members"]:
            resolution = member["resolution"]
            weights, dense_seconds, dense_accuracy = dense[resolution]
            clock = Clock().start()
            report = run_prune(PruneRequest(
                arch=ARCH, dataset=DATASET, method="l1", budget=Budget("macs", member["macs"]),
                epochs=args.search_epochs, finetune_epochs=args.joint_epochs, weights_path=weights,
                resolution=resolution, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                finetune_lr=args.finetune_lr, device=str(args.device)), work / f"l1-{member['id']}")
            prune_wall, prune_cpu = clock.read()
            rows.append({"member": member["id"], "budget": member["budget"]["value"], "resolution": resolution,
                         "ofa_macs": member["macs"], "ofa_params": member["params"],
                         "ofa_accuracy": member["accuracy"], "l1_macs": report["pruned"]["macs"],
                         "l1_accuracy": report["pruned"]["accuracy"], "l1_dense_accuracy": dense_accuracy,
                         "l1_seconds": dense_seconds[0] + prune_wall, "l1_prune_seconds": prune_wall,
                         "l1_cpu_seconds": dense_seconds[1] + prune_cpu, "l1_prune_cpu_seconds": prune_cpu})

    separate = sum(r["l1_seconds"] for r in rows), sum(r["l1_cpu_seconds"] for r in rows)
    shared_dense = (sum(r["l1_prune_seconds"] for r in rows) + sum(d[1][0] for d in dense.values()),
                    sum(r["l1_prune_cpu_seconds"] for r in rows) + sum(d[1][1] for d in dense.values()))
    joint = cohort["method_info"]["joint"]
    search = cohort["method_info"]["search"]
    print(f"Machine: {machine(args.device)}; {ARCH} on {DATASET}; seed {args.seed}; batch {args.batch_size}.")
    print(f"ofa: search up to {args.search_epochs} epochs (early bird at epoch {search['early_bird_epoch']}, "
          f"ran {search['epochs_run']}), joint {args.joint_epochs} epochs, K={args.sampled}; full network "
          f"accuracy {cohort['dense']['accuracy']:.4f}; search {search.get('seconds') or 0:.1f} s, joint "
          f"{joint.get('seconds') or 0:.1f} s (wall). l1: {args.search_epochs} dense + {args.joint_epochs} "
          "fine-tune epochs per member.\n")
    print("| member | budget | res | ofa MACs | ofa params | ofa acc | l1 MACs | l1 acc | ofa - l1 (points) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['member']} | {r['budget']:g} | {r['resolution']} | {r['ofa_macs']:,} | {r['ofa_params']:,} | "
              f"{r['ofa_accuracy']:.4f} | {r['l1_macs']:,} | {r['l1_accuracy']:.4f} | "
              f"{100 * (r['ofa_accuracy'] - r['l1_accuracy']):+.2f} |")
    print("\n| training | wall-clock s | ofa / this | CPU s | ofa / this (CPU) |\n|---|---|---|---|---|"
          f"\n| ofa cohort (one job) | {ofa_wall:.1f} | 1.00 | {ofa_cpu:.1f} | 1.00 |")
    for name, (wall, cpu) in (("l1, separate jobs", separate), ("l1, dense shared per resolution", shared_dense)):
        print(f"| {name} | {wall:.1f} | {ofa_wall / wall:.2f} | {cpu:.1f} | {ofa_cpu / cpu:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "ofa_seconds": ofa_wall, "ofa_cpu_seconds": ofa_cpu,
                                         "l1_separate_seconds": separate[0], "l1_separate_cpu_seconds": separate[1],
                                         "l1_shared_dense_seconds": shared_dense[0],
                                         "l1_shared_dense_cpu_seconds": shared_dense[1], "cohort": cohort},
                                        indent=1))


if __name__ == "__main__":
    main()
