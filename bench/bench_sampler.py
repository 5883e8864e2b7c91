"""Sampler throughput (and, with --quality, accuracy vs steps): ours against the reference.

Throughput is in spot-steps per second: one network evaluation of one sample of one spot at one
diffusion step (the reference's unit of work: n_spots x K samples x steps). Both sides run the
reference default architecture (200 genes, cond 1536, hidden 384, depth 12, 6 heads) with the
same weights, the same rows per batch and the same ancestral sampler, in the same process:

- reference: a straight re-statement of Stem/models.py on timm's Attention and Mlp, fp32, under
  torch.no_grad() as stem_sample.py runs it, calling model(x, t, y) every step (the condition MLP
  included). timm 1.0.7 under torch 2.3 took its fused (SDPA) attention path; "explicit" forces
  timm's softmax(q k^T) v path.
- ours: napari_stem.stem.sampling.iter_sample (inference_mode, SDPA, condition MLP once per batch,
  per-spot noise streams) in fp32, and with bf16 autocast.

    python bench/bench_sampler.py                      # CPU (+ CUDA when available)
    python bench/bench_sampler.py --spots 16 --samples 8 --steps 4
    python bench/bench_sampler.py --quality            # demo model, held-out slide, every sampler
    python bench/bench_sampler.py --quality --checkpoint CKPT_DIR --prepared PREP_DIR
    python bench/bench_sampler.py --quick              # the same table on a random toy model
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from napari_stem.stem.checkpoint import load_checkpoint
from napari_stem.stem.diffusion import create_diffusion
from napari_stem.stem.model import StemConfig, StemModel
from napari_stem.stem.reference_import import ours_to_reference
from napari_stem.stem.sampling import sample_expression

# -- reference re-statement (Stem/models.py: DiT with a gene-token embedder) -----------------


class _RefGeneJointEmbedding(nn.Module):
    def __init__(self, n_genes, hidden):
        super().__init__()
        self.gene_name_ebd = nn.Parameter(torch.zeros(n_genes, hidden))
        self.gene_count_ebd = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x):
        return torch.add(self.gene_count_ebd(x.squeeze(1).unsqueeze(2)), self.gene_name_ebd)


class _RefBlock(nn.Module):
    def __init__(self, hidden, heads, mlp_ratio, fused_attention):
        from timm.models.vision_transformer import Attention, Mlp

        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True)
        self.attn.fused_attn = fused_attention
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(_ref_modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(_ref_modulate(self.norm2(x), shift_mlp, scale_mlp))


def _ref_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _RefFinal(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, 2)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return torch.permute(self.linear(_ref_modulate(self.norm_final(x), shift, scale)), (0, 2, 1))


class ReferenceStem(nn.Module):
    def __init__(self, config: StemConfig, fused_attention: bool):
        from napari_stem.stem.model import TimestepEmbedder

        super().__init__()
        hidden = config.hidden_size
        self.gene_joint_embed = _RefGeneJointEmbedding(config.n_genes, hidden)
        self.time_embed = TimestepEmbedder(hidden)  # identical code in the reference
        self.label_embed = nn.Sequential(
            nn.Linear(config.cond_dim, config.cond_dim), nn.SiLU(), nn.Linear(config.cond_dim, hidden)
        )
        self.blocks = nn.ModuleList(
            _RefBlock(hidden, config.num_heads, config.mlp_ratio, fused_attention) for _ in range(config.depth)
        )
        self.final_layer = _RefFinal(hidden)

    def forward(self, x, t, y):
        x = self.gene_joint_embed(x)
        c = self.time_embed(t) + self.label_embed(y)
        for block in self.blocks:
            x = block(x, c)
        return self.final_layer(x, c)


def reference_sample(ref_model, embeddings, n_samples, steps, device):
    """stem_sample.py's loop: spot-major rows, torch.randn noise, ancestral, no clipping."""
    diffusion = create_diffusion(str(steps))
    y = embeddings.to(device).repeat_interleave(n_samples, dim=0)
    with torch.no_grad():
        x_T = torch.randn(y.shape[0], 1, ref_model.gene_joint_embed.gene_name_ebd.shape[0], device=device)
        return diffusion.sample_loop(ref_model, x_T, sampler="ancestral", model_kwargs={"y": y})


# -- throughput -----------------------------------------------------------------------------


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process); CPU time resists other load on the machine."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def throughput(args, device: torch.device) -> None:
    config = StemConfig(
        n_genes=args.genes, cond_dim=args.cond_dim, hidden_size=args.hidden, depth=args.depth, num_heads=args.heads
    )
    torch.manual_seed(0)
    ours = StemModel(config)
    with torch.no_grad():  # fill the zero-initialised layers so every path does real work
        for p in ours.parameters():
            if not p.any():
                p.normal_(std=0.02)
    ours.eval().to(device)
    n_spots = args.spots or (4 if device.type == "cpu" else 256)
    embeddings = torch.randn(n_spots, args.cond_dim)
    rows = n_spots * args.samples
    spot_steps = rows * args.steps

    # One process, one allocator: napari_stem's glibc thresholds (napari_stem.allocator) would be
    # set by our first sampling call anyway, so set them up front and every variant shares them.
    from napari_stem.allocator import keep_tensor_buffers_in_heap

    tuned = keep_tensor_buffers_in_heap()
    print(f"glibc malloc thresholds for tensor buffers: {'set for all variants' if tuned else 'left as they are'}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as stem_sample.py sets
        torch.backends.cudnn.allow_tf32 = True
    variants = {}
    for fused in (True, False):
        ref = ReferenceStem(config, fused_attention=fused).to(device).eval()
        ref.load_state_dict(ours_to_reference(ours.state_dict()))
        name = f"reference fp32 ({'timm fused SDPA' if fused else 'timm explicit softmax'})"
        variants[name] = lambda steps, ref=ref: reference_sample(ref, embeddings, args.samples, steps, device)
    x = torch.randn(4, 1, args.genes, device=device)
    t, y = torch.tensor([0, 10, 500, 999], device=device), torch.randn(4, args.cond_dim, device=device)
    with torch.no_grad():
        diff = (ref(x, t, y) - ours(x, t, y)).abs().max().item()
    print(f"same function check: max |reference - ours| forward = {diff:.2e}")
    for precision in ["fp32", "bf16"] if device.type == "cpu" else ["bf16", "fp32"]:
        variants[f"ours {precision}"] = lambda steps, precision=precision: sample_expression(
            ours,
            embeddings,
            n_samples=args.samples,
            steps=steps,
            sampler="ancestral",
            batch_size=n_spots,
            device=device,
            precision=precision,
        )
    for run in variants.values():
        run(2)  # warm-up
    # Interleaved repeats, best of each: fair under a shared, noisy machine.
    wall_rate, cpu_rate = dict.fromkeys(variants, 0.0), dict.fromkeys(variants, 0.0)
    for _ in range(args.repeats):
        for name, run in variants.items():
            wall_s, cpu_s = _timed(lambda run=run: run(args.steps))
            wall_rate[name] = max(wall_rate[name], spot_steps / wall_s)
            cpu_rate[name] = max(cpu_rate[name], spot_steps / cpu_s)

    print(
        f"\n{device.type.upper()} ({torch.get_num_threads()} threads"
        if device.type == "cpu"
        else f"\nCUDA ({torch.cuda.get_device_name(device)}",
        end="",
    )
    print(
        f"), {args.genes} genes, cond {args.cond_dim}, H{args.hidden} D{args.depth} heads {args.heads}, "
        f"{n_spots} spots x {args.samples} samples = {rows} rows/forward, {args.steps} steps, "
        f"best of {args.repeats}"
    )
    explicit, fused = "reference fp32 (timm explicit softmax)", "reference fp32 (timm fused SDPA)"
    print(
        f"  {'':40s} {'spot-steps/s':>12s} {'vs explicit':>11s} {'vs fused':>9s}"
        + (f" | {'per CPU-s':>9s} {'vs explicit':>11s} {'vs fused':>9s}" if device.type == "cpu" else "")
    )
    for name in variants:
        line = (
            f"  {name:40s} {wall_rate[name]:12.1f} {wall_rate[name] / wall_rate[explicit]:10.2f}x"
            f" {wall_rate[name] / wall_rate[fused]:8.2f}x"
        )
        if device.type == "cpu":
            line += (
                f" | {cpu_rate[name]:9.1f} {cpu_rate[name] / cpu_rate[explicit]:10.2f}x"
                f" {cpu_rate[name] / cpu_rate[fused]:8.2f}x"
            )
        print(line)


# -- quality vs network evaluations ---------------------------------------------------------

#: (label, sampler, options): every sampler against the 1000-step ancestral chain.
QUALITY_VARIANTS = (
    ("ancestral", "ancestral", {}),
    ("ancestral, no clip", "ancestral", {"clip_x0": False}),
    ("ddim", "ddim", {}),
    ("ddim, no clip", "ddim", {"clip_x0": False}),
    ("dpm++2m", "dpm++2m", {}),
    ("dpm++2m, no clip", "dpm++2m", {"clip_x0": False}),
    ("dpm++2m-sde", "dpm++2m-sde", {}),
    ("dpm++2m-sde, learned var", "dpm++2m-sde", {"solver_options": {"variance": "learned"}}),
    ("ancestral-matched", "ancestral-matched", {}),
    ("ancestral-matched, 2nd order", "ancestral-matched", {"solver_options": {"second_order": True}}),
    ("ancestral-matched, no clip", "ancestral-matched", {"clip_x0": False}),
    ("ancestral-matched, bare range", "ancestral-matched", {"clip_margin": 0.0}),
    ("ancestral-matched, quadratic spacing", "ancestral-matched", {"spacing": "quadratic"}),
    ("ancestral-matched, logsnr spacing", "ancestral-matched", {"spacing": "logsnr"}),
    ("dpm++2m, time spacing", "dpm++2m", {"spacing": "time"}),
)
QUALITY_EVALS = (2, 3, 4, 6, 10, 25, 50)


def read_embeddings(path: Path, key: str | None) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path)
    import h5py

    with h5py.File(path, "r") as f:
        if key is None:  # napari-stem / HEST-Bench caches call it "embeddings"; else the first 2-D one
            key = (
                "embeddings"
                if "embeddings" in f
                else next(k for k, v in f.items() if isinstance(v, h5py.Dataset) and v.ndim == 2)
            )
        return f[key][()]


def mean_gene_pcc(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r per gene across spots, averaged over genes that vary in both."""
    a, b = a - a.mean(0), b - b.mean(0)
    denom = np.sqrt((a**2).sum(0) * (b**2).sum(0))
    valid = denom > 0
    return float(((a * b).sum(0)[valid] / denom[valid]).mean())


def quality_data(args):
    """(checkpoint, held-out embeddings, truth, training range, where): the demo model and its
    held-out slides unless --checkpoint/--prepared name others; --quick: a random toy model."""
    if args.quick:
        return _toy_quality_data()
    from stem_train.data import assemble_held_out, assemble_training_set
    from stem_train.manifest import PreparedDataset

    if args.checkpoint and args.prepared:
        checkpoint_dir, prepared = Path(args.checkpoint), Path(args.prepared)
    else:
        from stem_train.demo import ensure_demo_model

        paths = ensure_demo_model(device=args.device)
        checkpoint_dir, prepared = paths.checkpoint, paths.prepared
    checkpoint = load_checkpoint(checkpoint_dir)
    manifest = PreparedDataset.load(prepared)
    held_out = assemble_held_out(manifest, target_transform=checkpoint.target_transform)
    target_range = checkpoint.target_range
    if target_range is None:  # an older checkpoint: the same range, from its training slides
        targets = assemble_training_set(manifest, num_aug_ratio=0, target_transform=checkpoint.target_transform).targets
        target_range = {"min": targets.min(0).tolist(), "max": targets.max(0).tolist()}
    where = f"{checkpoint.path}, held-out {','.join(held_out.sample_ids)}"
    spots = slice(None, args.spots)
    return checkpoint, held_out.conditions[spots], held_out.targets[spots], target_range, where


def _toy_quality_data():
    """A random small model whose 'truth' is its own 1000-step draw: smoke-tests the table fast."""
    config = StemConfig(n_genes=6, cond_dim=8, hidden_size=32, depth=1, num_heads=4)
    torch.manual_seed(0)
    model = StemModel(config)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02)
    embeddings = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    truth = sample_expression(
        model.eval(), embeddings, n_samples=1, steps=50, sampler="ancestral", seed=99, device="cpu"
    ).mean
    return model, embeddings, truth, {"min": truth.min(0) - 0.5, "max": truth.max(0) + 0.5}, "random toy model"


def quality_row(truth, samples, reference_mean, target_range) -> dict:
    from napari_stem.metrics import (
        crps_samples,
        pearson_per_gene,
        pit_values,
        rank_interval_coverage,
    )

    mean = samples.mean(axis=1)
    pcc = pearson_per_gene(truth, mean)
    pit = pit_values(truth, samples)
    low, high = (np.asarray(target_range[k], dtype=np.float64) for k in ("min", "max"))
    return {
        "pcc": float(np.nanmean(pcc)),
        "pcc_1000": mean_gene_pcc(mean, reference_mean),
        "cov50": rank_interval_coverage(pit, 0.5),
        "cov90": rank_interval_coverage(pit, 0.9),
        "crps": float(crps_samples(truth, samples).mean()),
        "outside": float(((samples < low) | (samples > high)).mean()),
        "far": float(((samples < low - 1) | (samples > high + 1)).mean()),
    }


def quality(args) -> None:
    checkpoint, embeddings, truth, target_range, where = quality_data(args)
    evals = tuple(int(n) for n in args.evals.split(",")) if args.evals else QUALITY_EVALS if not args.quick else (2, 4)
    reference_steps = 1000 if not args.quick else 50  # --quick: a smoke test of the table, not a measurement
    by_label = {v[0]: v for v in QUALITY_VARIANTS}
    variants = QUALITY_VARIANTS if args.variants is None else [by_label[label] for label in args.variants.split(";")]
    common = {
        "n_samples": args.samples,
        "batch_size": args.batch_size,
        "device": args.device,
        "seed": 0,
        "keep_samples": True,
        "target_range": target_range,
        "precision": args.precisions.split(",")[0],
    }
    print(
        f"{where}: {len(embeddings)} spots x {args.samples} samples, {truth.shape[1]} genes; same seed and "
        f"start noise everywhere; reference: the 1000-step ancestral chain (unclipped, the paper's)"
    )
    start = time.perf_counter()
    cache = Path(args.reference_cache) if args.reference_cache else None
    if cache is not None and cache.exists():
        ref_samples = np.load(cache)
        print(f"{reference_steps}-step ancestral samples read from {cache}\n")
    else:
        ref_samples = sample_expression(
            checkpoint, embeddings, steps=reference_steps, sampler="ancestral", **{**common, "clip_x0": False}
        ).samples
        print(f"{reference_steps}-step ancestral took {time.perf_counter() - start:.1f} s\n")
        if cache is not None:
            np.save(cache, ref_samples)
    ref_mean = ref_samples.mean(axis=1)
    base = quality_row(truth, ref_samples, ref_mean, target_range)
    header = (
        "| sampler | evals/sample | PCC vs truth | × 1000-step | PCC vs 1000-step means | 50 % cov. | 90 % cov. "
        "| CRPS | vs 1000-step | outside range | > 1 beyond | s |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")

    def line(label, n, row, seconds):
        print(
            f"| {label} | {n} | {row['pcc']:.4f} | {row['pcc'] / base['pcc']:.3f} | {row['pcc_1000']:.4f} "
            f"| {row['cov50']:.3f} | {row['cov90']:.3f} | {row['crps']:.4f} | {row['crps'] / base['crps'] - 1:+.1%} "
            f"| {row['outside']:.3%} | {row['far']:.3%} | {seconds:.1f} |",
            flush=True,
        )

    line("ancestral (the reference)", reference_steps, base, 0.0)
    for label, sampler, options in variants:
        for n in evals:
            start = time.perf_counter()
            run = sample_expression(
                checkpoint, embeddings, steps=n, sampler=sampler, **{**common, "seed": args.seed, **options}
            )
            row = quality_row(truth, run.samples, ref_mean, target_range)
            line(label, n, row, time.perf_counter() - start)
            if args.meets:
                ok = (
                    n <= 4
                    and row["pcc"] >= 0.98 * base["pcc"]
                    and abs(row["cov50"] - base["cov50"]) <= 0.03
                    and abs(row["cov90"] - base["cov90"]) <= 0.03
                    and row["crps"] <= 1.03 * base["crps"]
                    and row["far"] == 0
                )
                if ok:
                    print(f"  ^ meets the 4-evaluation target: {label} at {n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--spots", type=int, default=None, help="spots per batch (default 4 on CPU, 256 on CUDA; --quality: all)"
    )
    parser.add_argument("--samples", type=int, default=4, help="samples per spot")
    parser.add_argument("--steps", type=int, default=3, help="timed sampler steps")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed runs; best is kept")
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--cond-dim", type=int, default=1536)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (CPU, then CUDA if present)")
    parser.add_argument(
        "--quality",
        action="store_true",
        help="every sampler at 2-50 network evaluations vs the 1000-step ancestral chain (markdown table)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="--quality on a random toy model, 2 and 4 evaluations (smoke test)"
    )
    parser.add_argument("--checkpoint", help="--quality: a checkpoint folder (default: the demo model)")
    parser.add_argument(
        "--prepared", help="--quality: the checkpoint's prepared folder (its held-out slides are the truth)"
    )
    parser.add_argument(
        "--variants", default=None, help="--quality: ';'-separated labels of QUALITY_VARIANTS to run (default: all)"
    )
    parser.add_argument(
        "--reference-cache",
        default=None,
        help="--quality: .npy to keep the 1000-step samples in and reuse (same model, spots, samples, seed)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="--quality: seed of the few-step runs (the 1000-step one: 0)"
    )
    parser.add_argument(
        "--evals", default=None, help="--quality: comma list of network evaluations (default: 2,3,4,6,10,25,50)"
    )
    parser.add_argument("--meets", action="store_true", help="--quality: flag rows meeting the 4-evaluation target")
    parser.add_argument("--batch-size", type=int, default=None, help="spots per batch (for --quality)")
    parser.add_argument("--precisions", default="fp32", help="--quality: the precision to sample in (fp32 or bf16)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quality or args.quick:
        if bool(args.checkpoint) != bool(args.prepared):
            parser.error("--quality takes --checkpoint and --prepared together (or neither: the demo model)")
        if args.samples == 4 and "--samples" not in " ".join(__import__("sys").argv):
            args.samples = 19  # exact 50 % and 90 % intervals
        quality(args)
        return
    devices = (
        [torch.device(args.device)]
        if args.device != "auto"
        else [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    )
    for device in devices:
        throughput(args, device)


if __name__ == "__main__":
    main()
