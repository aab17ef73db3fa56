"""Where do T2-trained models put the tumour on the other sequences? (docs/results/t1_failure)

For every run folder ``<study>/<preset>/seed<S>/last.pt`` and every modality, predicts the test
cases as ``tools/evaluate.py`` does (the checkpoint's own sliding window) and splits the brain
voxels by the whole-tumour prediction: hit (predicted, in the true WT), missed (true WT, not
predicted), false alarm (predicted, outside WT) and the rest of the brain. For each group it
reports the voxel count, the mean z-scored intensity and the mean local standard deviation
(3³ window: how textured the group is), summed over cases and averaged over seeds.

    python docs/results/t1_failure/analyse.py --study STUDY_RUNS --data SHARDS \
        --presets segresnet_t2_noaug segresnet_t2_sdg_bezier --out docs/results/t1_failure
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dgseg.atomic import atomic_write_text
from dgseg.constants import MODALITIES
from dgseg.data.dataset import ShardDataset
from dgseg.inference.predict_case import load_predictor

GROUPS = ("hit", "missed", "false_alarm", "other_brain")


def local_std(x: torch.Tensor) -> torch.Tensor:
    """(D, H, W) standard deviation over each voxel's 3³ neighbourhood."""
    v = x[None, None]  # (1, 1, D, H, W)
    mean = F.avg_pool3d(v, 3, 1, 1, count_include_pad=False)
    sq = F.avg_pool3d(v * v, 3, 1, 1, count_include_pad=False)
    return (sq - mean * mean).clamp_min(0).sqrt()[0, 0]


def case_sums(image: torch.Tensor, wt_true: torch.Tensor, wt_pred: torch.Tensor) -> dict:
    """Per group: [voxels, sum of intensity, sum of local std] of one single-channel case."""
    x = image[0]  # (D, H, W)
    brain = x != 0
    texture = local_std(x)
    masks = {
        "hit": wt_pred & wt_true,
        "missed": ~wt_pred & wt_true,
        "false_alarm": wt_pred & ~wt_true & brain,
        "other_brain": ~wt_pred & ~wt_true & brain,
    }
    return {
        k: [float(m.sum()), float(x[m].sum()), float(texture[m].sum())] for k, m in masks.items()
    }


def analyse_run(checkpoint: Path, data: Path) -> dict:
    """{modality: {group: [voxels, intensity sum, texture sum]}} over the test cases."""
    prob_fn, channels, _ = load_predictor(checkpoint, torch.device("cpu"))
    if len(channels) != 1:
        raise ValueError(f"{checkpoint}: one input channel expected, got {channels}")
    out = {}
    for mod in MODALITIES:
        ds = ShardDataset(data, "test", (mod,))
        totals = {k: [0.0, 0.0, 0.0] for k in GROUPS}
        for i in range(len(ds)):
            s = ds[i]
            with torch.no_grad():
                prob = prob_fn(s["image"][None])[0]  # (3, D, H, W)
            sums = case_sums(s["image"], s["label"][0] > 0.5, prob[0] > 0.5)
            for k in GROUPS:
                totals[k] = [a + b for a, b in zip(totals[k], sums[k])]
        out[mod] = totals
    return out


def summarise(runs: list[dict]) -> dict:
    """Seed-averaged {modality: {group: {voxels, intensity, texture}}} and the WT volume ratio."""
    res = {}
    for mod in MODALITIES:
        res[mod] = {}
        for k in GROUPS:
            vox = [r[mod][k][0] for r in runs]
            res[mod][k] = {
                "voxels": sum(vox) / len(runs),
                "intensity": sum(r[mod][k][1] for r in runs) / max(sum(vox), 1.0),
                "texture": sum(r[mod][k][2] for r in runs) / max(sum(vox), 1.0),
            }
        g = res[mod]
        true = g["hit"]["voxels"] + g["missed"]["voxels"]
        pred = g["hit"]["voxels"] + g["false_alarm"]["voxels"]
        res[mod]["pred_over_true"] = pred / max(true, 1.0)
        res[mod]["hit_share"] = g["hit"]["voxels"] / max(true, 1.0)
    return res


def table(results: dict) -> str:
    lines = [
        "| preset | modality | predicted / true WT voxels | share of WT found | "
        "intensity: hit / missed / false alarm / other brain | "
        "local std: hit / missed / false alarm / other brain |",
        "|---|---|---|---|---|---|",
    ]
    for preset, res in results.items():
        for mod in MODALITIES:
            r = res[mod]
            inten = " / ".join(f"{r[k]['intensity']:+.2f}" for k in GROUPS)
            tex = " / ".join(f"{r[k]['texture']:.2f}" for k in GROUPS)
            lines.append(
                f"| `{preset}` | {mod} | {r['pred_over_true']:.2f} | {r['hit_share']:.2f} | "
                f"{inten} | {tex} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, required=True, help="run_experiments --out folder")
    ap.add_argument("--data", type=Path, required=True, help="prepared folder of the study")
    ap.add_argument("--presets", nargs="+", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    for preset in args.presets:
        runs = []
        for seed in args.seeds:
            ckpt = args.study / preset / f"seed{seed}" / "last.pt"
            print(f"{preset} seed {seed}", flush=True)
            runs.append(analyse_run(ckpt, args.data))
        results[preset] = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "t1_failure.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(args.out / "t1_failure.md", table(results))
    print(table(results))


if __name__ == "__main__":
    main()
