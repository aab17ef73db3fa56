"""The fit loop: build data, network and optimiser from a :class:`~dgseg.config.Config`, train
epoch by epoch, validate, checkpoint, resume (``tools/train.py`` is its command line).

Run folder ``<run.out>/<run.name>/``: config.json, last.pt (every epoch), best.pt (best validation
mean Dice), log.jsonl and, with matplotlib, curves.png. An existing run is continued with
``--resume`` or never touched. While it trains, rank 0 holds the folder's ``run.lock``
(:mod:`dgseg.run_lock`): a second training into it is refused naming the holder, and the stale
lock of a killed run is taken over by ``--resume``. The data folder is checked (manifest schema,
every shard read) before any process starts work. gloo on CPU, NCCL on CUDA; only rank 0 prints
and writes.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dgseg.atomic import atomic_write_text
from dgseg.cli_checks import ArgumentFault, check_config_values, check_output_dir
from dgseg.config import Config, add_set_argument, apply_overrides, config_diff
from dgseg.data.dataset import ShardDataset
from dgseg.data.manifest import load_manifest, split_cases
from dgseg.data.prepared import check_prepared
from dgseg.inference.source_stats import SOURCE_STATS_KEY, compute_source_stats
from dgseg.logging_utils import JsonlWriter, log, trim_jsonl
from dgseg.models import build_model
from dgseg.presets import PRESETS, format_presets, get_preset
from dgseg.run_lock import RunLockError, acquire
from dgseg.training.checkpoint import (
    capture_rng_state,
    check_resume,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    training_state,
)
from dgseg.training.distributed import (
    DistState,
    all_gather_objects,
    barrier,
    cleanup,
    init_distributed,
    wrap_ddp,
)
from dgseg.training.engine import (
    NonFiniteLossError,
    channels_last_choice,
    check_cpu_bf16_depths,
    train_one_epoch,
    validate,
)
from dgseg.training.losses import SegLoss
from dgseg.training.optim import build_optimizer, build_scheduler, fused_supported
from dgseg.training.precision import describe, resolve_amp
from dgseg.viz import plot_curves


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="experiment preset")
    p.add_argument(
        "--list-presets", action="store_true", help="print every preset with one line, exit"
    )
    p.add_argument("--data", help="shard folder from tools/prepare_brats.py (= data.root)")
    p.add_argument("--out", help="parent of the run folder (= run.out)")
    add_set_argument(
        p,
        "override a config field, e.g. --set optim.epochs=50 --set model.vffc=true "
        "(repeatable; tuples as 1,2,2,4; None as none)",
    )
    p.add_argument("--resume", action="store_true", help="continue from <run>/last.pt if present")
    p.add_argument(
        "--stop-after-epochs",
        type=int,
        default=None,
        metavar="N",
        help="stop after N epochs of this invocation (time-limited jobs; continue with --resume)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    args = p.parse_args(argv)
    if args.list_presets:
        return args
    if args.preset is None:
        p.error("--preset is required (see --list-presets)")
    if args.data is not None:
        args.overrides = [f"data.root={args.data}"] + args.overrides
    if args.out is not None:
        args.overrides = [f"run.out={args.out}"] + args.overrides
    try:
        args.config = apply_overrides(get_preset(args.preset), args.overrides)
        check_config_values(args.config)
    except ValueError as e:
        p.error(str(e))
    if args.stop_after_epochs is not None and args.stop_after_epochs < 1:
        p.error(f"--stop-after-epochs={args.stop_after_epochs} must be >= 1")
    return args


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def place_model(
    cfg: Config, dist: DistState, *, channels_last: bool = False
) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """(unwrapped network on the device, the module the step calls: DDP and/or compiled)."""
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    net = build_model(cfg.data.in_channels, cfg.model).to(dist.device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    model = wrap_ddp(net, dist)
    if cfg.run.compile:
        model = torch.compile(model)  # checkpoints still save `net` (no _orig_mod./module.)
    return net, model


def build_loaders(cfg: Config, dist: DistState) -> Tuple[Any, DistributedSampler, DataLoader, Any]:
    """Training dataset, its DistributedSampler and DataLoader, and the validation dataset."""
    d = cfg.data
    train_ds = ShardDataset(
        d.root,
        split="train",
        fold=d.fold,
        modalities=d.modalities,
        patch_size=d.patch_size,
        flip=d.flip,
        rot90=d.rot90,
        rotation_degrees=d.rotation_degrees,
        seed=cfg.run.seed,
        rank=dist.rank,
        intensity_augs=d.intensity_augs,
        domain_assignment=d.domain_assignment,
        saliency_pair=cfg.loss.step == "saliency_balanced",
        views=d.consistency_views,
        input_repr=d.input_repr,
        gradient_sigmas=d.gradient_sigmas,
    )
    val_ds = None  # no validation cases: no validation, no best.pt
    if split_cases(load_manifest(d.root), d.val_split, d.fold):
        val_ds = ShardDataset(
            d.root,
            split=d.val_split,
            modalities=d.modalities,
            seed=cfg.run.seed,
            fold=d.fold,
            input_repr=d.input_repr,
            gradient_sigmas=d.gradient_sigmas,
        )
    # Same sampler seed on every rank: the ranks split one shared permutation per epoch.
    sampler = DistributedSampler(
        train_ds,
        num_replicas=dist.world_size,
        rank=dist.rank,
        shuffle=True,
        seed=cfg.run.seed,
        drop_last=True,
    )
    cuda = dist.device.type == "cuda"
    loader = DataLoader(
        train_ds,
        batch_size=cfg.optim.batch_size,
        sampler=sampler,
        num_workers=d.workers,
        pin_memory=cuda,  # page-locked batches make the non_blocking copies asynchronous
        drop_last=True,
        # Kept alive across epochs (HDF5 files stay open); set_epoch reaches them through the
        # dataset's shared-memory epoch counter.
        persistent_workers=d.workers > 0,
        prefetch_factor=4 if d.workers > 0 else None,
        # The loader draws its workers' base seed from this generator, not from the global RNG,
        # so that starting the workers at a resumed epoch leaves the dropout stream unchanged.
        generator=torch.Generator().manual_seed(cfg.run.seed + dist.rank),
    )
    if len(loader) == 0:
        raise ValueError(
            f"{len(train_ds)} training cases cannot fill one step of batch "
            f"{cfg.optim.batch_size} on {dist.world_size} process(es)"
        )
    return train_ds, sampler, loader, val_ds


def optimizer_and_schedule(
    cfg: Config, net: torch.nn.Module, dist: DistState, steps_per_epoch: int
) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    # fused: one kernel for all parameters (CUDA, and the CPU on torch >= 2.4)
    optimizer = build_optimizer(net.parameters(), cfg.optim, fused=fused_supported(dist.device))
    return optimizer, build_scheduler(optimizer, cfg.optim, steps_per_epoch)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.list_presets:
        print(format_presets())
        return 0
    cfg: Config = args.config
    if args.print_config:
        print(cfg.to_json())
        return 0
    run_dir = Path(cfg.run.out) / cfg.run.name
    try:
        check_output_dir("run folder (run.out/run.name)", run_dir)
    except ArgumentFault as e:
        raise SystemExit(f"error: {e}") from None
    lock = None
    if int(os.environ.get("RANK", "0")) == 0:  # one holder per run: rank 0, for every rank
        try:
            lock = acquire(
                run_dir,
                what="run folder",
                take_stale=args.resume,
                hint="pass --resume to continue that run in it, or delete the folder",
            )
        except RunLockError as e:
            raise SystemExit(f"error: {e}") from None
        except OSError as e:
            raise SystemExit(f"error: run folder {run_dir}: {e.strerror or e}") from None
    try:
        return _locked_main(args, cfg, run_dir)
    finally:
        if lock is not None:
            lock.release()


def _locked_main(args: argparse.Namespace, cfg: Config, run_dir: Path) -> int:
    """:func:`main` once this process holds the run folder."""
    last_path = run_dir / "last.pt"
    ckpt, diff = None, []
    if args.resume and last_path.exists():
        try:  # a corrupt or refused file, or not a dgseg checkpoint: one line, no traceback
            ckpt = load_checkpoint(last_path)
            if not isinstance(ckpt.get("config"), dict):
                raise ValueError(f"{last_path}: no 'config' dict: not a dgseg checkpoint")
            # The run continues with its saved config; this command's --set items apply on top.
            saved = apply_overrides(Config.from_dict(ckpt["config"]), args.overrides)
        except ValueError as e:
            raise SystemExit(f"error: --resume: {e}") from None
        diff = config_diff(saved, cfg)
        cfg = saved
    elif last_path.exists():
        # No --overwrite: a new run that kept the old last.pt would, after a failed first epoch,
        # let --resume continue the old run under the new config.
        raise SystemExit(
            f"error: {last_path} exists; pass --resume to continue it, or delete {run_dir} (or "
            "set another run.name) to start again"
        )

    try:  # a missing or damaged data folder: one line before any process starts work
        d = cfg.data
        check_prepared(d.root, splits=("train", d.val_split), modalities=d.modalities, fold=d.fold)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: data.root: {e}") from None

    dist = init_distributed(cfg.run.device)
    try:
        code = _train(cfg, dist, args, run_dir, ckpt, diff)
        # Nobody tears the process group down while rank 0 still writes its checkpoint: a gloo
        # peer that exits mid-way can abort the writing process (seen once, during fsync).
        barrier()
        return code
    finally:
        cleanup()


def _train(
    cfg: Config,
    dist: DistState,
    args: argparse.Namespace,
    run_dir: Path,
    ckpt: Optional[Dict[str, Any]],
    diff: List[str],
) -> int:
    is_main = dist.is_main
    amp, why = resolve_amp(cfg.run.amp, dist.device)  # the engine's autocast resolves the same
    log(describe(amp, why), is_main=is_main)
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.run.deterministic  # autotune fixed-size convs
        torch.backends.cudnn.deterministic = cfg.run.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 paths (FFT unit, heads) on TF32
        torch.backends.cudnn.allow_tf32 = True
    try:  # settings the data cannot run with: one line, no traceback
        train_ds, sampler, loader, val_ds = build_loaders(cfg, dist)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    shape = (cfg.data.patch_size,) * 3 if cfg.data.patch_size else train_ds[0]["image"].shape[1:]
    try:  # a shape CPU bf16 gets wrong, or a resume that would bend the schedules
        check_cpu_bf16_depths(cfg, dist, shape)
        if ckpt is not None:
            check_resume(ckpt, cfg, len(loader))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    channels_last, why = channels_last_choice(cfg, dist.device, shape)  # as the engine decides
    log(
        f"memory format: {'channels-last' if channels_last else 'contiguous'} ({why})",
        is_main=is_main,
    )
    net, model = place_model(cfg, dist, channels_last=channels_last)
    seed_everything(cfg.run.seed + dist.rank)  # dropout / loader seeds differ per rank
    steps_per_epoch = len(loader)
    total_steps = cfg.optim.epochs * steps_per_epoch
    optimizer, scheduler = optimizer_and_schedule(cfg, net, dist, steps_per_epoch)
    loss_fn = SegLoss(bce_weight=cfg.loss.bce_weight, squared_pred=cfg.loss.squared_pred)

    start_epoch, step, best = 0, 0, -1.0
    log_path = run_dir / "log.jsonl"
    d, source_stats = cfg.data, None
    if ckpt is not None:
        try:  # a checkpoint of another network or optimiser: one line, no traceback
            net.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            start_epoch, step, best = ckpt["epoch"], ckpt["step"], ckpt["best_metric"]
            rng = ckpt["rng"]
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            why = " ".join(str(e).split())[:300]
            raise SystemExit(
                f"error: --resume: {run_dir / 'last.pt'} does not fit this network and "
                f"optimiser ({type(e).__name__}: {why})"
            ) from None
        if len(rng) == dist.world_size:
            restore_rng_state(rng[dist.rank])
        else:  # a different process count cannot replay the same random streams
            seed_everything(cfg.run.seed + dist.rank + 1000 * start_epoch)
            log(
                f"note: checkpoint written by {len(rng)} process(es), resuming on "
                f"{dist.world_size}: data order and augmentation differ from an uninterrupted run",
                is_main=is_main,
            )
        if is_main:
            trim_jsonl(log_path, step)
        log(f"resumed {run_dir / 'last.pt'} at epoch {start_epoch}, step {step}", is_main=is_main)
        if diff:
            log(
                f"  using the checkpoint's config; it differs from preset + --set in: "
                f"{'; '.join(diff)}",
                is_main=is_main,
            )
    elif args.resume:
        log(f"--resume: no {run_dir / 'last.pt'} yet, starting a new run", is_main=is_main)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", cfg.to_json() + "\n")
        if ckpt is None:  # a new run: nothing an earlier, failed start left may pass for it
            for stale in ("log.jsonl", "best.pt", "curves.png"):
                (run_dir / stale).unlink(missing_ok=True)
    writer = JsonlWriter(log_path, enabled=is_main)

    n_params = sum(p.numel() for p in net.parameters())
    log(
        f"run {run_dir} | {cfg.model.arch} ({n_params / 1e6:.2f} M params) | "
        f"{len(train_ds)} train / {len(val_ds or [])} {cfg.data.val_split} cases | "
        f"{dist.world_size} process(es) on {dist.device} | batch {cfg.optim.batch_size}/process | "
        f"{steps_per_epoch} steps/epoch | amp {amp}",
        is_main=is_main,
    )
    if start_epoch >= cfg.optim.epochs:
        log(f"nothing to do: {cfg.optim.epochs} epochs already done", is_main=is_main)
    epochs_this_run = 0
    for epoch in range(start_epoch, cfg.optim.epochs):
        sampler.set_epoch(epoch)  # new shared permutation every epoch
        train_ds.set_epoch(epoch)  # per-sample augmentation RNG (seed, epoch, index, rank)
        summary, step = train_one_epoch(
            model,
            loader,
            optimizer,
            scheduler,
            loss_fn,
            cfg=cfg,
            dist=dist,
            epoch=epoch,
            step=step,
            total_steps=total_steps,
            writer=writer,
        )
        if cfg.optim.schedule_interval == "epoch":
            scheduler.step()
        done = epoch + 1
        epoch_rec: Dict[str, Any] = {"kind": "epoch", "epoch": done, "step": step, **summary}
        val = None
        if val_ds is not None and (done % cfg.run.val_every == 0 or done == cfg.optim.epochs):
            val = validate(net, val_ds, cfg=cfg, dist=dist)
        is_best = val is not None and val["n_cases"] > 0 and val["dice_mean"] > best
        if is_best:
            best = val["dice_mean"]
        # Every rank's RNG streams, so that a resumed run replays them exactly.
        rng = all_gather_objects(capture_rng_state())
        if is_main:
            state = training_state(
                net, optimizer, scheduler, cfg, epoch=done, step=step, best_metric=best, rng=rng
            )
            if source_stats is None:  # test-time adaptation's prior and quantiles, once
                source_stats = compute_source_stats(d.root, d.modalities, fold=d.fold)
            state[SOURCE_STATS_KEY] = source_stats
            try:  # a full disk: the previous last.pt stays whole (atomic), --resume continues
                save_checkpoint(run_dir / "last.pt", state)
                if is_best:
                    save_checkpoint(run_dir / "best.pt", state)
            except OSError as e:
                raise SystemExit(
                    f"error: epoch {done}: writing a checkpoint in {run_dir} failed "
                    f"({e.strerror or e}); the files there hold the previous epoch"
                ) from None
            writer.write(epoch_rec)
            msg = (
                f"epoch {done}/{cfg.optim.epochs} done in {summary['epoch_time_s']:.1f}s: "
                f"loss {summary['loss']:.4f} train dice {summary['dice']:.3f}"
            )
            if val is not None:
                writer.write({"kind": "val", "epoch": done, "step": step, "best": best, **val})
                msg += (
                    f" | val WT {val['dice_WT']:.3f} TC {val['dice_TC']:.3f} "
                    f"ET {val['dice_ET']:.3f} mean {val['dice_mean']:.3f} "
                    f"(best {best:.3f}{', saved best.pt' if is_best else ''})"
                )
            log(msg)
            if cfg.run.plot and (val is not None or done == cfg.optim.epochs):
                try:
                    plot_curves(log_path, run_dir / "curves.png")
                except Exception as e:  # a figure is never worth a training run
                    log(f"warning: curves.png not written: {e}")
        epochs_this_run += 1
        if args.stop_after_epochs is not None and epochs_this_run >= args.stop_after_epochs:
            log(f"stopped after {epochs_this_run} epoch(s); --resume continues", is_main=is_main)
            break
    return 0


def run_cli(argv: Optional[Sequence[str]] = None) -> int:
    """``tools/train.py``: :func:`main` with a diverging loss as one ``error:`` line, status 3, and
    a file-system fault during the run (a full disk) as one line, status 1."""
    try:
        return main(argv)
    except NonFiniteLossError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    except OSError as e:  # a full disk or a vanished folder mid-run: checkpoints are atomic
        where = f"{e.filename}: " if e.filename else ""
        print(
            f"error: {where}{e.strerror or e}; the run folder keeps the last complete epoch "
            "(--resume continues from it)",
            file=sys.stderr,
            flush=True,
        )
        return 1
