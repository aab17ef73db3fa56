"""Provenance of ``tests/data/*.npz``: recompute (or regenerate) them from independent code.

``vffc_reference.npz`` (read by tests/test_vffc.py): inputs, weights and outputs of the *published*
VFFC code (Quattrini et al., ICCV Workshops 2023; https://github.com/aimagelab/vffc,
``models/vffc/vffc.py``, last changed in commit 740083c, checked at e259694): a 3D
``FourierUnit(4, 4)`` and a 3D ``SpectralTransform(16, 16)`` with the local Fourier unit, their
BatchNorms replaced by identity (the tests compare the Fourier maths, not the norms).

``metrics_reference.npz`` (read by tests/test_metrics.py): 24 mask pairs with voxel spacings, their
Dice (NumPy below) and HD95 from MONAI (``monai.metrics.compute_hausdorff_distance``,
``percentile=95``, with the spacing; MONAI 1.6.1), with the BraTS empty-mask rules applied here:
both masks empty -> Dice 1, HD95 0; exactly one empty -> Dice 0, HD95 373.13.

Neither the published code nor MONAI (nor SciPy, which MONAI's distance transform needs) is a
dgseg dependency, and the test suite never runs this script::

    git clone https://github.com/aimagelab/vffc ../vffc
    pip install monai==1.6.1 scipy
    python tests/data/make_reference.py --vffc-repo ../vffc           # check the committed files
    python tests/data/make_reference.py --vffc-repo ../vffc --write   # new seeded inputs

The default (check) recomputes every output from the committed inputs and weights and reports the
largest difference; it exits 1 when one exceeds the tolerance the tests use. ``--write`` draws new
inputs (``--seed``) and writes both files.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
BRATS_EMPTY_HD95 = 373.13  # the 240x240x155 diagonal (docs/SPEC.md "Metrics")
TOLERANCE = {"vffc": 1e-5, "metrics": 1e-4}  # what tests/test_vffc.py, test_metrics.py allow


# --------------------------------------------------------------------------- published VFFC
def load_published_vffc(repo: Path) -> types.ModuleType:
    """``models/vffc/vffc.py`` of the published repository, without its package ``__init__``
    (which imports the whole training code): only ``models.nn`` and ``models.drop`` are needed."""
    pkg = types.ModuleType("models")
    pkg.__path__ = [str(repo / "models")]
    sys.modules["models"] = pkg
    for name in ("nn", "drop", "vffc.vffc"):
        path = repo / "models" / (name.replace(".", "/") + ".py")
        spec = importlib.util.spec_from_file_location(f"models.{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"models.{name}"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["models.vffc.vffc"]


def _no_norms(module: nn.Module) -> nn.Module:
    for m in list(module.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(m, child_name, nn.Identity())
        if type(m).__name__ == "FourierUnit":
            m.use_se = False  # read in forward, never set in __init__ of the published code
    return module.eval()


def _fourier_unit(pub: types.ModuleType, c_in: int, c_out: int) -> nn.Module:
    # The first published version takes ffc3d=True (2D by default); the current one is 3D only.
    kw = {"ffc3d": True} if "ffc3d" in inspect.signature(pub.FourierUnit).parameters else {}
    return pub.FourierUnit(c_in, c_out, **kw)


def vffc_outputs(pub: types.ModuleType, d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of the published FourierUnit / SpectralTransform for the inputs and weights."""
    fu = _no_norms(_fourier_unit(pub, 4, 4))
    st = _no_norms(pub.SpectralTransform(16, 16, dims=3, enable_lfu=True))
    with torch.no_grad():
        fu.conv_layer.weight.copy_(torch.from_numpy(d["fu_conv_weight"]))
        st.conv1[0].weight.copy_(torch.from_numpy(d["st_conv1_weight"]))
        st.fu.conv_layer.weight.copy_(torch.from_numpy(d["st_fu_conv_weight"]))
        st.lfu.conv_layer.weight.copy_(torch.from_numpy(d["st_lfu_conv_weight"]))
        st.conv2.weight.copy_(torch.from_numpy(d["st_conv2_weight"]))
        return {
            "fu_output": fu(torch.from_numpy(d["fu_input"])).numpy(),
            "st_output": st(torch.from_numpy(d["st_input"])).numpy(),
        }


def new_vffc_inputs(pub: types.ModuleType, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs and the published modules' own initial weights."""
    torch.manual_seed(seed)
    fu = _fourier_unit(pub, 4, 4)
    st = pub.SpectralTransform(16, 16, dims=3, enable_lfu=True)
    return {
        "fu_input": torch.randn(2, 4, 6, 5, 7).numpy(),  # odd, non-cubic sizes
        "fu_conv_weight": fu.conv_layer.weight.detach().numpy(),
        "st_input": torch.randn(2, 16, 6, 8, 8).numpy(),  # H = W: the published LFU split
        "st_conv1_weight": st.conv1[0].weight.detach().numpy(),
        "st_fu_conv_weight": st.fu.conv_layer.weight.detach().numpy(),
        "st_lfu_conv_weight": st.lfu.conv_layer.weight.detach().numpy(),
        "st_conv2_weight": st.conv2.weight.detach().numpy(),
    }


# --------------------------------------------------------------------------- Dice and HD95
def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred.astype(bool), truth.astype(bool)
    if not p.any() and not t.any():
        return 1.0
    return float(2 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))


def hd95_monai(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    from monai.metrics import compute_hausdorff_distance

    p, t = pred.astype(bool), truth.astype(bool)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return BRATS_EMPTY_HD95
    value = compute_hausdorff_distance(
        torch.from_numpy(p)[None, None].float(),
        torch.from_numpy(t)[None, None].float(),
        include_background=True,
        percentile=95,
        spacing=[float(s) for s in spacing],
    )
    return float(value.item())


def metric_outputs(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    pred, truth, spacing = d["pred"], d["truth"], d["spacing"]
    return {
        "dice": np.array([dice(p, t) for p, t in zip(pred, truth)]),
        "hd95": np.array([hd95_monai(p, t, s) for p, t, s in zip(pred, truth, spacing)]),
    }


def new_metric_inputs(seed: int, n: int = 24, shape=(32, 28, 20)) -> dict[str, np.ndarray]:
    """Ellipsoid truths, predictions shifted / scaled / speckled from them; cases 0-2 empty."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float64)  # (3, D, H, W)

    def blob() -> np.ndarray:
        centre = rng.uniform(0.3, 0.7, 3) * np.array(shape)
        radii = rng.uniform(2.0, 7.0, 3)
        return (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) < 1

    pred = np.zeros((n, *shape), np.uint8)
    truth = np.zeros((n, *shape), np.uint8)
    spacing = np.ones((n, 3))
    for i in range(n):
        if i > 0:
            spacing[i] = np.round(rng.uniform(0.5, 2.5, 3), 1)
        if i == 0:
            continue  # both empty
        t = blob()
        p = np.roll(t, tuple(rng.integers(-3, 4, 3)), axis=(0, 1, 2)) | (rng.random(shape) < 0.002)
        if i % 5 == 0:
            p |= blob()  # a second, separate component
        pred[i] = 0 if i == 1 else p
        truth[i] = 0 if i == 2 else t
    return {"pred": pred, "truth": truth, "spacing": spacing}


# --------------------------------------------------------------------------- main
def _check(name: str, got: dict[str, np.ndarray], ref: dict[str, np.ndarray], tol: float) -> bool:
    ok = True
    for k, v in got.items():
        err = float(np.max(np.abs(v.astype(np.float64) - ref[k].astype(np.float64))))
        ok &= err <= tol
        print(f"{name}: {k} max |difference| {err:.2e} ({'ok' if err <= tol else 'MISMATCH'})")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vffc-repo", type=Path, required=True, help="checkout of aimagelab/vffc")
    p.add_argument("--write", action="store_true", help="draw new inputs and write both files")
    p.add_argument("--seed", type=int, default=0, help="seed of the new inputs (--write)")
    p.add_argument("--out", type=Path, default=HERE, help="folder of the .npz files")
    args = p.parse_args(argv)
    pub = load_published_vffc(args.vffc_repo)
    if args.write:
        v = new_vffc_inputs(pub, args.seed)
        m = new_metric_inputs(args.seed)
        np.savez_compressed(args.out / "vffc_reference.npz", **v, **vffc_outputs(pub, v))
        np.savez_compressed(args.out / "metrics_reference.npz", **m, **metric_outputs(m))
        print(f"wrote {args.out / 'vffc_reference.npz'} and {args.out / 'metrics_reference.npz'}")
        return 0
    with np.load(args.out / "vffc_reference.npz") as f:
        v = {k: f[k] for k in f.files}
    with np.load(args.out / "metrics_reference.npz") as f:
        m = {k: f[k] for k in f.files}
    ok = _check("vffc_reference.npz", vffc_outputs(pub, v), v, TOLERANCE["vffc"])
    ok &= _check("metrics_reference.npz", metric_outputs(m), m, TOLERANCE["metrics"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
