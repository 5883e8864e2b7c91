#!/usr/bin/env bash
# The project's GPU check: run once on every lent GPU machine (about 8 minutes on one H100/H200)
# and copy its output into the README's "What runs where" table. It prints
#   1. sampler throughput: spot-steps/s of ours (fp32, bf16) against the reference restatement,
#      reference-size Stem (35.6 M parameters);
#   2. whole-slide embedding: bench_embed.py on a 20k x 20k slide, all spots, both sides on CUDA;
#   3. a projected whole Visium slide: 4,000 spots, a ViT-L (UNI-sized) encoder, reference-size
#      Stem, the default sampler's steps and samples.
# --quick runs the same three parts at toy sizes, on the CPU when there is no GPU, so CI can
# check that the script works (its numbers then mean nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
WORKDIR="${GPU_CHECK_WORKDIR:-$(mktemp -d)}"

if [ "${1:-}" = "--quick" ]; then
  SAMPLER=(--spots 2 --samples 2 --steps 2 --repeats 1 --genes 8 --cond-dim 16 --hidden 32 --depth 1 --heads 2)
  EMBED=(--size-px 2048 --max-spots 12 --workdir "$WORKDIR")
  PROJECT=(--whole-slide-spots 10)
else
  SAMPLER=(--spots 512 --samples 10 --steps 5 --repeats 3)
  EMBED=(--size-px 20000 --max-spots 0 --num-workers 12 --workdir "$WORKDIR")
  PROJECT=(--whole-slide-spots 4000)
fi

echo "== napari-stem GPU check ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
"$PYTHON" -c "import torch; cuda = torch.cuda.is_available(); print('torch', torch.__version__, '|', torch.cuda.get_device_name(0) if cuda else 'no CUDA device: CPU only')"
echo "== 1. sampler throughput (ours vs the reference restatement)"
"$PYTHON" bench/bench_sampler.py --device auto "${SAMPLER[@]}"
echo "== 2. whole-slide embedding (ours vs the reference preprocessing, same device)"
"$PYTHON" bench/bench_embed.py "${EMBED[@]}"
echo "== 3. projected whole Visium slide"
"$PYTHON" bench/bench_interactive.py --skip-region --skip-gene-switch --skip-worker "${PROJECT[@]}"
echo "== done"
