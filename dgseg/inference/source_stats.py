"""Source statistics for test-time adaptation, from the training split's labels and images.

``region_prior``: per region (WT, TC, ET) the share of brain voxels (any input channel ≠ 0: the
z-scored brain, background exactly 0) inside it, pooled over the training cases; the class prior
of GM-Guided DG's test-time adaptation (the authors count every pixel of their 2D slices, each
class against all others; here the binary prior of each sigmoid channel within the brain).
``quantiles``: per input channel, the brain voxels' intensity quantiles at ``quantile_levels``,
averaged over the training cases; the target of test-time intensity matching. Stored in the
checkpoint under :data:`SOURCE_STATS_KEY` (plain lists and floats: loads with weights_only).
Computed from the stored volumes as prepared, before any augmentation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from dgseg.data.dataset import ShardDataset
from dgseg.training.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["SOURCE_STATS_KEY", "N_QUANTILES", "compute_source_stats", "attach_source_stats"]

SOURCE_STATS_KEY = "source_stats"
N_QUANTILES = 101  # levels 0, 0.01, ..., 1


def compute_source_stats(
    root: Path | str,
    modalities: Sequence[str],
    *,
    split: str = "train",
    fold: Optional[int] = None,
    n_quantiles: int = N_QUANTILES,
) -> Dict[str, Any]:
    """Region prior and per-channel brain quantiles of the ``split`` cases of ``root``."""
    ds = ShardDataset(root, split=split, modalities=tuple(modalities), fold=fold)
    levels = torch.linspace(0.0, 1.0, n_quantiles, dtype=torch.float64)
    inside = torch.zeros(3, dtype=torch.float64)
    brain_total = 0.0
    qsum = torch.zeros(len(ds.modalities), n_quantiles, dtype=torch.float64)
    n_cases = 0
    try:
        for i in range(len(ds)):
            item = ds[i]
            image = item["image"].double()  # (C, D, H, W), the stored volume
            brain = (image != 0).any(dim=0)  # (D, H, W)
            if not bool(item["has_label"]) or int(brain.sum()) == 0:
                continue
            inside += item["label"][:, brain].double().sum(dim=1)
            brain_total += float(brain.sum())
            for c in range(image.shape[0]):
                qsum[c] += torch.quantile(image[c][brain], levels)
            n_cases += 1
    finally:
        ds.close()
    if n_cases == 0:
        raise ValueError(f"split {split!r} of {root} has no labelled case with a brain")
    return {
        "modalities": list(ds.modalities),
        "n_cases": n_cases,
        "region_prior": (inside / brain_total).tolist(),
        "quantile_levels": levels.tolist(),
        "quantiles": (qsum / n_cases).tolist(),
    }


def attach_source_stats(checkpoint: Path | str, stats: Dict[str, Any]) -> None:
    """Add (or replace) ``stats`` in a checkpoint file, written atomically."""
    state = load_checkpoint(checkpoint)
    state[SOURCE_STATS_KEY] = stats
    save_checkpoint(checkpoint, state)
