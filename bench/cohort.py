"""One OFA cohort vs separately pruned networks: accuracy per member and total training wall-clock.

Usage: python bench/cohort.py [--search-epochs 20 --joint-epochs 20] [--tiny] [--json results.json]
resnet20 on builtin:digits, budgets {0.75, 0.5, 0.3} (fractions of the dense MACs at 32 px) x resolutions
{32, 24}. Each member of the one ofa training is compared with an l1-pruned network at the member's MACs and
resolution: a dense network trained for --search-epochs at that resolution, pruned by l1, fine-tuned alone for
--joint-epochs (the epochs each member shares in the cohort's joint training). Separate runs are charged their
own dense training each (as independent jobs would be); the table also shows the cost with one dense training
per resolution shared between budgets. Prints markdown tables; --tiny is a smoke test (1 epoch, few batches).
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
from pruning.train import evaluate, pick_device, seed_everything, train

ARCH, DATASET = "resnet20", "builtin:digits"


def machine(device: torch.device) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{cpu}{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def dense_weights(resolution: int, epochs: int, args, work: Path) -> tuple[Path, float, float]:
    """Train the dense network at `resolution`; returns (weights, seconds, test accuracy)."""
    splits = load_dataset(DATASET, None, resolution)
    train_loader, _, test_loader = make_loaders(splits, args.batch_size, args.seed)
    seed_everything(args.seed)
    model = zoo.build_model(ARCH, splits.num_classes, splits.in_channels)
    started = time.perf_counter()
    train(model, train_loader, epochs, lr=args.lr, device=args.device, seed=args.seed)
    seconds = time.perf_counter() - started
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
        request = PruneRequest(arch=ARCH, dataset=DATASET, method="ofa", budget=Budget("flops", args.budgets[0]),
                               epochs=args.search_epochs, finetune_epochs=args.joint_epochs, params=params,
                               resolution=max(args.resolutions), seed=args.seed, batch_size=args.batch_size,
                               lr=args.lr, finetune_lr=args.finetune_lr, device=str(args.device))
        started = time.perf_counter()
        cohort = run_cohort(request, work / "cohort")
        ofa_seconds = time.perf_counter() - started

        dense = {r: dense_weights(r, args.search_epochs, args, work) for r in args.resolutions}
        rows = []
        for member in cohort["members"]:
            resolution = member["resolution"]
            weights, dense_seconds, dense_accuracy = dense[resolution]
            started = time.perf_counter()
            report = run_prune(PruneRequest(
                arch=ARCH, dataset=DATASET, method="l1", budget=Budget("macs", member["macs"]),
                epochs=args.search_epochs, finetune_epochs=args.joint_epochs, weights_path=weights,
                resolution=resolution, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                finetune_lr=args.finetune_lr, device=str(args.device)), work / f"l1-{member['id']}")
            prune_seconds = time.perf_counter() - started
            rows.append({"member": member["id"], "budget": member["budget"]["value"], "resolution": resolution,
                         "ofa_macs": member["macs"], "ofa_params": member["params"],
                         "ofa_accuracy": member["accuracy"], "l1_macs": report["pruned"]["macs"],
                         "l1_accuracy": report["pruned"]["accuracy"], "l1_dense_accuracy": dense_accuracy,
                         "l1_seconds": dense_seconds + prune_seconds, "l1_prune_seconds": prune_seconds})

    separate = sum(r["l1_seconds"] for r in rows)
    shared_dense = sum(r["l1_prune_seconds"] for r in rows) + sum(d[1] for d in dense.values())
    search = cohort["method_info"]["search"]
    print(f"Machine: {machine(args.device)}; {ARCH} on {DATASET}; seed {args.seed}; batch {args.batch_size}.")
    print(f"ofa: search up to {args.search_epochs} epochs (early bird at epoch {search['early_bird_epoch']}, "
          f"ran {search['epochs_run']}), joint {args.joint_epochs} epochs, K={args.sampled}; full network "
          f"accuracy {cohort['dense']['accuracy']:.4f}. l1: {args.search_epochs} dense + {args.joint_epochs} "
          "fine-tune epochs per member.\n")
    print("| member | budget | res | ofa MACs | ofa params | ofa acc | l1 MACs | l1 acc | ofa - l1 (points) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['member']} | {r['budget']:g} | {r['resolution']} | {r['ofa_macs']:,} | {r['ofa_params']:,} | "
              f"{r['ofa_accuracy']:.4f} | {r['l1_macs']:,} | {r['l1_accuracy']:.4f} | "
              f"{100 * (r['ofa_accuracy'] - r['l1_accuracy']):+.2f} |")
    print("\n| training | wall-clock s | ofa / this |\n|---|---|---|"
          f"\n| ofa cohort (one job) | {ofa_seconds:.1f} | 1.00 |"
          f"\n| l1, separate jobs | {separate:.1f} | {ofa_seconds / separate:.2f} |"
          f"\n| l1, dense shared per resolution | {shared_dense:.1f} | {ofa_seconds / shared_dense:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "ofa_seconds": ofa_seconds, "l1_separate_seconds": separate,
                                         "l1_shared_dense_seconds": shared_dense, "cohort": cohort}, indent=1))


if __name__ == "__main__":
    main()
