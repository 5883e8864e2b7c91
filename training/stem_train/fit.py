"""``stem-train fit``: train Stem on a prepared folder, alone or as one rank of ``torchrun``.

One loop in the manner of DiT's train.py — set up, then per step: batch, diffusion loss, AdamW,
EMA; log every N steps, validate every M, checkpoint every K. What differs from the reference:

* Step-based, and every step is a pure function of (seed, step): the batch rows come from
  :class:`~stem_train.data.BatchOrder`, the timesteps and noise from a generator seeded by
  (seed, step), drawn for the whole global batch and split by rank. ``--resume`` therefore
  continues a killed run exactly — same batches, same noise — and the global batch does not depend
  on the number of ranks.
* Checkpoints are napari-stem checkpoints (safetensors + JSON: EMA and raw weights, genes,
  embedding spec, provenance) with a ``training_state.pt`` beside them (optimiser, step, running
  log sums, RNG states), each written atomically; ``checkpoints/latest`` names the newest complete one.
  Writing and reading that state is :mod:`stem_train.fit_state`; this module is the loop.
* Validation on the held-out slides (diffusion loss and the per-gene PCC of a few-step DDIM
  sampler's mean) goes to ``log.jsonl`` with the training losses.
"""

from __future__ import annotations

import argparse
import math
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np

from napari_stem.errors import describe_path
from napari_stem.stem.model_config import PRESETS, TRAINING_DEFAULTS
from napari_stem.validate import (
    AUGMENTATION_RATIO,
    BATCH_SIZE,
    FRACTION,
    LEARNING_RATE,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    STEPS,
)
from stem_train.fit_state import (
    CHECKPOINTS_DIR,
    FINAL_CHECKPOINT,
    LATEST_FILE,
    LOG_FILE,
    RUN_FILE,
    STATE_FILE,  # noqa: F401  (the run folder's names, importable from the command that writes it)
    TrainingError,
    append_log,
    check_same_rows,
    plain_args,
    read_resume_state,
    restore,
    resume_folder,
    save_final_checkpoint,
    save_step_checkpoint,
    start_log,
    training_state,
    write_json_atomic,
)
from stem_train.manifest import PreparedDataset

#: Mixed into the seed so training noise, validation noise and the augmentation draw never share a stream.
STEP_STREAM, VALIDATION_STREAM = 0x57E9, 0x7A11
#: Put the whole training set on the GPU when it takes less than this share of its memory.
DEVICE_DATA_SHARE = 0.25
#: Arguments a resumed run must share with the run it continues (the rest may change).
RESUME_MUST_MATCH = (
    "target_transform",
    "num_aug_ratio",
    "seed",
    "global_batch_size",
    "lr",
    "weight_decay",
    "ema_decay",
    "grad_clip",
)


# ---------------------------------------------------------------------- command line
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from napari_stem.metrics import TRAINING_TARGET_TRANSFORMS

    parser = subparsers.add_parser(
        "fit",
        help="train a Stem model on a prepared folder (CPU, one GPU, or many GPUs/nodes with torchrun)",
        description=(
            "Train Stem's gene-token diffusion transformer on PREP_DIR (made by 'stem-train prepare'): targets are "
            "the panel's raw counts transformed (log2(1+x), as the reference), conditions the patch embeddings of "
            "the training slides plus --num-aug-ratio of their flipped/rotated versions. Runs as one process on "
            "CPU or a GPU, or under torchrun on many GPUs and nodes (NCCL on GPUs, gloo on CPU), e.g. "
            "'torchrun --nproc_per_node 8 -m stem_train.cli fit PREP_DIR --out RUN_DIR'. Writes RUN_DIR/log.jsonl, "
            "RUN_DIR/checkpoints/step_<N>/ (resumable) and RUN_DIR/checkpoint (the final EMA model for "
            "'stem-train predict' and the napari plugin)."
        ),
        epilog=(
            "Batches, timesteps and noise depend only on --seed and the step number, so --resume continues a "
            "killed run exactly and a run gives the same global batches on any number of GPUs. The reference "
            "trains ~200k-300k steps at batch 256 (about 12 h on one A100)."
        ),
    )
    parser.add_argument(
        "prep_dir", type=Path, metavar="PREP_DIR", help="folder written by 'stem-train prepare' (holds manifest.json)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="RUN_DIR", help="run folder for logs and checkpoints (created)"
    )
    arch = parser.add_argument_group("model")
    arch.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="stem-reference",
        help="architecture: stem-reference (the paper's: 12 blocks, hidden 384, 6 heads; default) or stem-small "
        "(4 blocks, hidden 128, 4 heads: CPU-sized); the condition width always comes from the prepared embeddings",
    )
    arch.add_argument("--hidden-size", type=POSITIVE_INT, default=None, help="override the preset's token width")
    arch.add_argument(
        "--depth", type=POSITIVE_INT, default=None, help="override the preset's number of transformer blocks"
    )
    arch.add_argument(
        "--num-heads",
        type=POSITIVE_INT,
        default=None,
        help="override the preset's attention heads (must divide the hidden size)",
    )
    train = parser.add_argument_group("training")
    train.add_argument(
        "--max-steps",
        type=POSITIVE_INT,
        default=1000,
        help="optimiser steps to train in total, counting resumed ones (default: 1000)",
    )
    train.add_argument(
        "--global-batch-size",
        type=BATCH_SIZE,
        default=256,
        help="rows per step summed over all ranks; must divide by the number of ranks (default: 256)",
    )
    train.add_argument(
        "--lr",
        type=LEARNING_RATE,
        default=None,
        help=f"AdamW learning rate, constant (default: the preset's: {_preset_defaults('lr')})",
    )
    train.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, default=0.0, help="AdamW weight decay (default: 0)")
    train.add_argument(
        "--ema-decay",
        type=FRACTION,
        default=None,
        help=f"decay of the weight average that is saved for sampling (default: the preset's: {_preset_defaults('ema_decay')}; use ~0.98 for runs of a few hundred steps)",
    )
    train.add_argument(
        "--grad-clip",
        type=_grad_clip,
        default=None,
        metavar="none|NORM",
        help="clip the gradient's global norm to NORM (default: none, as the reference)",
    )
    train.add_argument(
        "--num-aug-ratio",
        type=AUGMENTATION_RATIO,
        default=None,
        help=f"augmented views (0..7) used per training spot besides the original, drawn once per run (default: the preset's: {_preset_defaults('num_aug_ratio')}; needs views: prepare without --no-augment)",
    )
    train.add_argument(
        "--target-transform",
        choices=sorted(TRAINING_TARGET_TRANSFORMS),
        default="log2p1",
        help="count → target: log2p1 = log2(1+x) (the reference's) or log1p = ln(1+x) (default: log2p1)",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initial weights, the augmentation draw, the batch order and the noise (default: 0)",
    )
    train.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto: bf16 autocast on CUDA, fp32 elsewhere (default: auto)",
    )
    train.add_argument(
        "--device", default="auto", help="auto (this rank's GPU if any, else CPU), cpu, cuda (default: auto)"
    )
    io = parser.add_argument_group("logging, validation and checkpoints")
    io.add_argument(
        "--log-every", type=POSITIVE_INT, default=50, help="steps between training-loss lines in the log (default: 50)"
    )
    io.add_argument(
        "--ckpt-every", type=POSITIVE_INT, default=500, help="steps between resumable checkpoints (default: 500)"
    )
    io.add_argument(
        "--keep-last",
        type=NON_NEGATIVE_INT,
        default=3,
        help="resumable checkpoints kept on disk, newest first; 0 keeps all (default: 3)",
    )
    io.add_argument(
        "--val-every",
        type=NON_NEGATIVE_INT,
        default=500,
        help="steps between validations on the held-out slides; 0 turns validation off (default: 500)",
    )
    io.add_argument(
        "--val-spots",
        type=POSITIVE_INT,
        default=256,
        help="held-out spots validated, evenly spread over the held-out slides (default: 256)",
    )
    io.add_argument(
        "--val-samples",
        type=POSITIVE_INT,
        default=2,
        help="samples per spot averaged for the validation PCC (default: 2)",
    )
    io.add_argument(
        "--val-sample-steps",
        type=STEPS,
        default=10,
        help="steps of the validation sampler (ancestral, as predict) (default: 10)",
    )
    io.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in RUN_DIR from checkpoints/latest (same model, genes and training options)",
    )
    return parser


def _grad_clip(text: str) -> float | None:
    if text.strip().lower() in ("none", "off", "0"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'none' or a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the clipping norm must be positive, got {text!r}")
    return value


def _preset_defaults(option: str) -> str:
    return ", ".join(
        f"{value:g} for {preset}"
        for preset, values in TRAINING_DEFAULTS.items()
        for name, value in values.items()
        if name == option
    )


def apply_preset_defaults(args: argparse.Namespace) -> None:
    """Fill the training options left unset from the preset's :data:`TRAINING_DEFAULTS`."""
    for name, value in TRAINING_DEFAULTS[args.preset].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def run(args: argparse.Namespace) -> int:
    from stem_train import distributed

    apply_preset_defaults(args)
    _check_args(args)
    try:
        ctx = distributed.setup(args.device)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    try:
        train(args, ctx)
    finally:
        distributed.cleanup(ctx)
    return 0


def _check_args(args: argparse.Namespace) -> None:
    positive = (
        "max_steps",
        "global_batch_size",
        "log_every",
        "ckpt_every",
        "val_spots",
        "val_samples",
        "val_sample_steps",
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.val_every < 0 or args.keep_last < 0:
        raise TrainingError("--val-every and --keep-last must be 0 or more")
    if not 0 <= args.num_aug_ratio <= 7:
        raise TrainingError(f"--num-aug-ratio must be between 0 and 7, got {args.num_aug_ratio}")
    if not 0 <= args.ema_decay < 1:
        raise TrainingError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")


# ---------------------------------------------------------------------- the loop
def train(args: argparse.Namespace, ctx: Any) -> None:
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from tqdm.auto import tqdm

    from napari_stem.stem.diffusion import create_diffusion
    from napari_stem.stem.model import StemConfig, StemModel, count_parameters
    from stem_train import distributed
    from stem_train.data import BatchOrder, assemble_held_out, assemble_training_set

    manifest = PreparedDataset.load(args.prep_dir)
    run_dir = args.out.resolve()
    checkpoints = run_dir / CHECKPOINTS_DIR
    resume_from = resume_folder(run_dir) if args.resume else None
    if not args.resume and (checkpoints / LATEST_FILE).exists():
        raise TrainingError(
            f"{describe_path(run_dir)} already holds a run; pass --resume to continue it, or choose another --out."
        )
    if args.global_batch_size % ctx.world_size:
        raise TrainingError(
            f"--global-batch-size {args.global_batch_size} does not divide by the {ctx.world_size} ranks."
        )
    config = _model_config(args, manifest, StemConfig)
    spec = _run_spec(args, manifest, config)
    resume_state = (
        read_resume_state(resume_from, spec) if resume_from is not None else None
    )  # mismatch: fail before loading data

    # -- data: the same rows on every rank
    say = tqdm.write if ctx.is_main else (lambda *_: None)
    bar_kwargs = dict(disable=not ctx.is_main, dynamic_ncols=True)
    training_set = assemble_training_set(
        manifest,
        num_aug_ratio=args.num_aug_ratio,
        target_transform=args.target_transform,
        seed=args.seed,
        progress=lambda slides: tqdm(slides, desc="loading training slides", unit="slide", **bar_kwargs),
    )
    order = BatchOrder(len(training_set), args.global_batch_size, args.seed)
    validating = args.val_every > 0 and bool(manifest.split("test"))
    held_out = (
        assemble_held_out(manifest, target_transform=args.target_transform) if validating and ctx.is_main else None
    )
    say(
        f"training set: {len(training_set)} rows from {training_set.n_spots} spots ({training_set.n_dropped} all-zero/NaN "
        f"dropped) x (1 + {args.num_aug_ratio} views); augmentation draw {training_set.augmentation_fingerprint}; "
        f"{order.steps_per_epoch} steps per epoch; {ctx.world_size} rank(s) on {ctx.device}"
    )
    if ctx.enabled:  # every rank says which rows it holds: the draws must agree
        print(
            f"rank {ctx.rank}/{ctx.world_size}: augmentation draw {training_set.augmentation_fingerprint}, {len(training_set)} rows",
            flush=True,
        )
    if args.val_every > 0 and not manifest.split("test"):
        say("no held-out slides in the prepared folder: validation is off (prepare with --held-out ID to get some)")

    # -- model, EMA, optimiser
    device = ctx.device
    torch.manual_seed(args.seed)
    model = StemModel(config).to(device)
    ema = deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step, running = 0, torch.zeros(5, dtype=torch.float64, device=device)  # loss, mse, vb, grad norm, steps
    if resume_state is not None:
        check_same_rows(resume_from, resume_state, training_set, order)
        step, running = restore(resume_from, resume_state, spec, model, ema, optimizer, device)
        say(f"resuming from {resume_from} at step {step}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    trained = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if ctx.enabled
        else model
    )
    diffusion = create_diffusion()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=_use_bf16(args.precision, device))
    conditions, targets, spot_of_row = _training_tensors(training_set, device)
    say(f"model: {count_parameters(model):,} parameters ({config.to_dict()})")

    if ctx.is_main:
        checkpoints.mkdir(parents=True, exist_ok=True)
        start_log(run_dir / LOG_FILE, keep_until=step)
        write_json_atomic(
            run_dir / RUN_FILE,
            {
                "args": plain_args(args),
                "config": config.to_dict(),
                "world_size": ctx.world_size,
                "training_rows": len(training_set),
                "training_spots": training_set.n_spots,
                "dropped_spots": training_set.n_dropped,
                "augmentation_fingerprint": training_set.augmentation_fingerprint,
                "steps_per_epoch": order.steps_per_epoch,
                "manifest": str(manifest.root / "manifest.json"),
            },
        )

    def save(step_now: int) -> None:
        if ctx.is_main:
            state = training_state(step_now, spec, optimizer, running, order, training_set)
            folder = save_step_checkpoint(
                checkpoints, step_now, state, config, manifest, model, ema, args, training_set, ctx
            )
            say(f"step {step_now}: saved {folder}")
        distributed.barrier(ctx)

    model.train()
    started = last_log_time = time.perf_counter()
    window_start = step
    postfix: dict[str, str] = {}
    with tqdm(total=args.max_steps, initial=step, desc="training", unit="step", **bar_kwargs) as bar:
        while step < args.max_steps:
            rows = torch.from_numpy(order.rank_batch(step, ctx.rank, ctx.world_size)).to(conditions.device)
            x = targets[spot_of_row[rows]].unsqueeze(1).to(device, non_blocking=True)
            y = conditions[rows].to(device, non_blocking=True)
            t, noise = _step_noise(
                args.seed,
                step,
                args.global_batch_size,
                len(manifest.genes),
                ctx.rank,
                ctx.world_size,
                diffusion.n_steps,
            )
            with autocast:
                losses = diffusion.training_losses(
                    trained, x, t.to(device), model_kwargs={"y": y}, noise=noise.to(device)
                )
            loss = losses["loss"].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), args.grad_clip if args.grad_clip else math.inf
            )
            optimizer.step()
            update_ema(ema, model, args.ema_decay)
            step += 1
            bar.update(1)
            running += torch.stack(
                [
                    loss.detach(),
                    losses["mse"].detach().mean(),
                    losses["vb"].detach().mean(),
                    grad_norm.detach(),
                    torch.ones((), device=device),
                ]
            ).double()

            last = step == args.max_steps
            if step % args.log_every == 0 or last:
                loss_mean, mse, vb, norm, count = distributed.mean_over_ranks(running.tolist(), ctx)
                now = time.perf_counter()
                record = {
                    "kind": "train",
                    "step": step,
                    "epoch": order.position(step - 1)[0],
                    "loss": loss_mean / count,
                    "mse": mse / count,
                    "vb": vb / count,
                    "grad_norm": norm / count,
                    "lr": args.lr,
                    "steps_per_s": (step - window_start) / max(now - last_log_time, 1e-9),
                    "elapsed_s": now - started,
                }
                if step % args.log_every == 0:
                    running.zero_()  # the last step of a run that stops off the grid keeps its window open for --resume
                else:
                    record["partial"] = True
                last_log_time, window_start = now, step
                if ctx.is_main:
                    append_log(run_dir / LOG_FILE, record)
                    postfix["loss"] = f"{record['loss']:.4f}"
                    bar.set_postfix(postfix)
                    say(
                        f"step {step}: loss {record['loss']:.5f} (mse {record['mse']:.5f}, vb {record['vb']:.5f}), {record['steps_per_s']:.1f} steps/s"
                    )
            if validating and (step % args.val_every == 0 or last):
                if ctx.is_main:
                    result = validate(ema, diffusion, held_out, args, device, step)
                    append_log(run_dir / LOG_FILE, result)
                    postfix["val_pcc"] = f"{result['val_pcc']:.3f}"
                    bar.set_postfix(postfix)
                    say(
                        f"step {step}: held-out loss {result['val_loss']:.5f}, mean PCC {result['val_pcc']:.4f} over {result['val_pcc_genes']} genes ({result['val_spots']} spots)"
                    )
                distributed.barrier(ctx)
            if step % args.ckpt_every == 0 or last:
                save(step)
    if ctx.is_main:
        final = save_final_checkpoint(
            run_dir / FINAL_CHECKPOINT, step, config, manifest, model, ema, args, training_set, ctx
        )
        say(f"done: {step} steps; final EMA checkpoint {final}")
    distributed.barrier(ctx)


def update_ema(ema: Any, model: Any, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · model, parameter by parameter (buffers copied)."""
    import torch

    with torch.no_grad():
        for ema_param, param in zip(ema.parameters(), model.parameters(), strict=True):
            ema_param.mul_(decay).add_(param.detach(), alpha=1.0 - decay)
        for ema_buffer, buffer in zip(ema.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)


def _step_noise(seed: int, step: int, global_batch: int, n_genes: int, rank: int, world_size: int, n_timesteps: int):
    """Timesteps and noise of this rank's share of the global batch of 0-based ``step``."""
    import torch

    generator = torch.Generator().manual_seed(_derived_seed(seed, STEP_STREAM, step))
    t = torch.randint(0, n_timesteps, (global_batch,), generator=generator)
    noise = torch.randn((global_batch, 1, n_genes), generator=generator)
    return t[rank::world_size], noise[rank::world_size]


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _use_bf16(precision: str, device: Any) -> bool:
    if precision == "bf16" and device.type != "cuda":
        raise TrainingError("--precision bf16 needs a CUDA device; use auto or fp32 on the CPU")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _training_tensors(training_set: Any, device: Any):
    """Conditions, targets and the row → spot map as tensors; on the GPU when they fit comfortably
    (else each step's rows are gathered on the CPU and copied over)."""
    import torch

    conditions = torch.from_numpy(training_set.conditions)
    targets = torch.from_numpy(training_set.targets)
    spot_of_row = torch.from_numpy(training_set.spot_of_row)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if conditions.nbytes + targets.nbytes < DEVICE_DATA_SHARE * free:
            return conditions.to(device), targets.to(device), spot_of_row.to(device)
    return conditions, targets, spot_of_row


def _model_config(args: argparse.Namespace, manifest: PreparedDataset, config_cls: Any) -> Any:
    overrides = {
        name: getattr(args, name) for name in ("hidden_size", "depth", "num_heads") if getattr(args, name) is not None
    }
    try:
        return config_cls.from_preset(
            args.preset, n_genes=len(manifest.genes), **{**overrides, "cond_dim": manifest.embedding_dim}
        )
    except ValueError as exc:
        raise TrainingError(f"invalid model size: {exc}") from exc


def _run_spec(args: argparse.Namespace, manifest: PreparedDataset, config: Any) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint it continues."""
    return {
        "config": config.to_dict(),
        "genes": list(manifest.genes),
        "embedding": manifest.embedding_spec().to_dict(),
        "train_slides": [slide.sample_id for slide in manifest.split("train")],
        **{name: getattr(args, name) for name in RESUME_MUST_MATCH},
    }


# ---------------------------------------------------------------------- validation
def validate(
    ema: Any, diffusion: Any, held_out: Any, args: argparse.Namespace, device: Any, step: int
) -> dict[str, Any]:
    """EMA weights on held-out spots: diffusion loss (fixed t and noise), and the mean per-gene PCC
    and MSE of the few-step DDIM samples' mean."""
    import torch

    from napari_stem.metrics import pearson_per_gene
    from napari_stem.stem.sampling import sample_expression

    n_total = len(held_out)
    chosen = np.unique(np.linspace(0, n_total - 1, min(args.val_spots, n_total)).round().astype(np.int64))
    y = torch.from_numpy(held_out.conditions[chosen])
    x = torch.from_numpy(held_out.targets[chosen]).unsqueeze(1)
    generator = torch.Generator().manual_seed(_derived_seed(args.seed, VALIDATION_STREAM))
    t = torch.randint(0, diffusion.n_steps, (len(chosen),), generator=generator)
    noise = torch.randn(x.shape, generator=generator)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=_use_bf16(args.precision, device))
    with torch.no_grad(), autocast:
        losses = diffusion.training_losses(
            ema, x.to(device), t.to(device), model_kwargs={"y": y.to(device)}, noise=noise.to(device)
        )
    prediction = sample_expression(
        ema,
        held_out.conditions[chosen],
        n_samples=args.val_samples,
        steps=args.val_sample_steps,
        device=device,
        seed=args.seed,
    )
    pcc = pearson_per_gene(held_out.targets[chosen], prediction.mean)
    finite = np.isfinite(pcc)
    return {
        "kind": "val",
        "step": step,
        "val_loss": float(losses["loss"].mean()),
        "val_mse": float(losses["mse"].mean()),
        "val_vb": float(losses["vb"].mean()),
        "val_pcc": float(pcc[finite].mean()) if finite.any() else float("nan"),
        "val_pcc_genes": int(finite.sum()),
        "val_spots": int(len(chosen)),
        "val_pred_mse": float(
            np.mean((held_out.targets[chosen] - prediction.mean) ** 2)
        ),  # of the sampled mean, target space
    }
