"""Write a reference-equivalence fixture by running the reference Stem code itself.

The fixture is what ``tests/reference_fixture.py`` reads: a trainer-layout checkpoint
(``{"model", "ema", "opt"}`` state dicts, named by its step like the reference trainer's),
``config.json`` with the reference ``Stem(...)`` constructor arguments, and ``cases.npz``: fixed
inputs and the reference's own outputs (EMA forward, ``q_sample``, ``p_mean_variance``,
``training_losses``, DDIM 50 and 25 steps with eta = 0, the 50-step timestep map).

No reference code lives in this repository: ``--reference-src`` names a folder holding the
reference's ``Stem/`` package (``models.py`` and ``diffusion/``), e.g. exported from
github.com/SichenZhu/Stem with ``git archive HEAD Stem | tar -x -C /tmp/stem_ref``. It needs
torch, numpy and timm.

Every weight is perturbed after the reference's zero-initialisation (the EMA and raw weights
independently) so that every output depends on every layer.

    python scripts/make_reference_fixture.py --reference-src /tmp/stem_ref \
        --out tests/data/stem_reference_g24 --genes 24 --cond-dim 48 --seed 7
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

#: The reference default size (stem_train.py's defaults with 200 genes and a UNI+CONCH condition),
#: whose parameter count the fixture records.
DEFAULT_SIZE = {"input_size": 200, "hidden_size": 384, "depth": 12, "num_heads": 6, "label_size": 1536}
N_CASES = 8
WEIGHT_NOISE_STD = 0.05


def _import_reference(reference_src: Path):
    """The reference's ``Stem`` constructor and ``create_diffusion``, imported from its own files."""
    root = reference_src.resolve()
    if not (root / "Stem" / "models.py").is_file() and (root / "models.py").is_file():
        root = root.parent  # given the Stem/ folder itself
    if not (root / "Stem" / "models.py").is_file() or not (root / "Stem" / "diffusion").is_dir():
        raise SystemExit(f"{reference_src} holds no reference Stem/models.py and Stem/diffusion/")
    sys.path.insert(0, str(root))
    from Stem.diffusion import create_diffusion
    from Stem.models import Stem

    return Stem, create_diffusion


def _perturbed_state(model, generator) -> dict:
    import torch

    return {
        name: (tensor + WEIGHT_NOISE_STD * torch.randn(tensor.shape, generator=generator)).contiguous()
        for name, tensor in model.state_dict().items()
    }


def _inputs(n_genes: int, cond_dim: int, seed: int) -> dict:
    """The fixed inputs: targets in the log2(1 + counts) range, timesteps (both ends included), conditions, noise."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    x0 = 8 * torch.rand(N_CASES, 1, n_genes, generator=generator)
    t = torch.randint(0, 1000, (N_CASES,), generator=generator)
    t[0], t[-1] = 0, 999  # the decoder NLL term at t = 0, and the noisiest step
    y = torch.randn(N_CASES, cond_dim, generator=generator)
    noise = torch.randn(N_CASES, 1, n_genes, generator=generator)
    x_T = torch.randn(N_CASES, 1, n_genes, generator=generator)
    return {"x0": x0, "t": t, "y": y, "noise": noise, "xT": x_T}


def reference_outputs(Stem, create_diffusion, constructor_args: dict, ema_state: dict, inputs: dict) -> dict:
    """What the reference computes from ``inputs`` with the EMA weights, keyed as in cases.npz."""
    import torch

    model = Stem(**constructor_args)
    model.load_state_dict(ema_state)
    model.eval()
    x0, t, y, noise, x_T = (inputs[k] for k in ("x0", "t", "y", "noise", "xT"))
    kwargs = {"y": y}
    full = create_diffusion(timestep_respacing="")
    outputs = {}
    with torch.no_grad():
        outputs["ema_forward"] = model(x0, t, y)
        x_t = full.q_sample(x0, t, noise=noise)
        outputs["q_sample"] = x_t
        out = full.p_mean_variance(model, x_t, t, clip_denoised=False, model_kwargs=kwargs)
        for name in ("mean", "variance", "log_variance", "pred_xstart"):
            outputs[f"p_mean_variance_{name}"] = out[name]
        losses = full.training_losses(model, x0, t, model_kwargs=kwargs, noise=noise)
        for name in ("loss", "mse", "vb"):
            outputs[f"training_losses_{name}"] = losses[name]
        for steps in (50, 25):  # respaced as the reference's stem_sample.py does: create_diffusion(str(steps))
            spaced = create_diffusion(str(steps))
            outputs[f"ddim{steps}_eta0"] = spaced.ddim_sample_loop(
                model, x_T.shape, noise=x_T.clone(), clip_denoised=False, model_kwargs=kwargs, eta=0.0
            )
            if steps == 50:
                outputs["timestep_map_50"] = torch.tensor(spaced.timestep_map, dtype=torch.int64)
    return outputs


def _as_arrays(tensors: dict) -> dict[str, np.ndarray]:
    return {
        name: value.numpy().astype(np.int64 if name in ("t", "timestep_map_50") else np.float32)
        for name, value in tensors.items()
    }


def make_fixture(
    reference_src: Path,
    out: Path,
    *,
    genes: int,
    cond_dim: int,
    hidden: int,
    depth: int,
    heads: int,
    mlp_ratio: float,
    seed: int,
    step: int,
) -> None:
    import torch

    Stem, create_diffusion = _import_reference(reference_src)
    constructor_args = {
        "input_size": genes,
        "hidden_size": hidden,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": mlp_ratio,
        "label_size": cond_dim,
        "learn_sigma": True,
    }
    torch.manual_seed(seed)
    model = Stem(**constructor_args)
    generator = torch.Generator().manual_seed(seed)
    ema_state = _perturbed_state(copy.deepcopy(model), generator)
    model_state = _perturbed_state(model, generator)

    default_count = sum(p.numel() for p in Stem(**DEFAULT_SIZE).parameters())
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_name = f"{step:07d}.pt"  # the reference trainer's naming
    torch.save({"model": model_state, "ema": ema_state, "opt": {}}, out / checkpoint_name)
    config = {
        "reference_constructor_args": constructor_args,
        "checkpoint": f"{checkpoint_name} (reference trainer layout: model/ema/opt state dicts)",
        "default_config_param_count_G200_H384_D12_heads6_label1536": default_count,
        "seed": seed,
        "written_by": "scripts/make_reference_fixture.py running the reference Stem code (github.com/SichenZhu/Stem)",
    }
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    inputs = _inputs(genes, cond_dim, seed)
    outputs = reference_outputs(Stem, create_diffusion, constructor_args, ema_state, inputs)
    np.savez(out / "cases.npz", **_as_arrays({**inputs, **outputs}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-src", type=Path, required=True, help="folder holding the reference's Stem/")
    parser.add_argument("--out", type=Path, required=True, help="fixture folder to write")
    parser.add_argument("--genes", type=int, default=24)
    parser.add_argument("--cond-dim", type=int, default=48, help="condition (label) width")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--mlp-ratio", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--step", type=int, default=250, help="training step the checkpoint is named after")
    args = parser.parse_args(argv)
    make_fixture(
        args.reference_src,
        args.out,
        genes=args.genes,
        cond_dim=args.cond_dim,
        hidden=args.hidden,
        depth=args.depth,
        heads=args.heads,
        mlp_ratio=args.mlp_ratio,
        seed=args.seed,
        step=args.step,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
