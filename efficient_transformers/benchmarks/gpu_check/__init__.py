r"""The first-GPU-session check: cuDNN correctness, exact-attention TFLOP/s, training speed.

One command, one call of at most 10 minutes on one NVIDIA H200:

    python -m efficient_transformers.benchmarks.gpu_check --out=DIR

Parts, in the order they run, each with a time budget (seconds; `--budgets`):

  correctness  60   `dot_product(implementation="cudnn")`, `"xla"` and
                    `memory_efficient` in bfloat16 against `softmax` (bf16 and
                    f32), values and gradients w.r.t. q, k, v, for each mask the
                    data pipelines make: none, right padding, causal, both.
  tflops       120  forward+backward TFLOP/s of softmax, dot_product[xla],
                    dot_product[cudnn], memory_efficient at L = 1K..16K, causal
                    and not, as a fraction of the device's bf16 peak.
  listops      120  200 steps of full-size ListOps (4 layers, 512 wide, batch 32,
                    length 2000) in bf16 with softmax and dot_product, through
                    the project's own train step: steps/s and MFU.
  attention    200  `benchmarks/attention.py` (LRA Text model, batch 32) in bf16
                    for every variant at L = 1K..8K.

A part stops starting new cells when its budget is spent and says so; nothing
starts after `--time_limit_s` (570 s from the start of `main`). Every cell that
OOMs, that cuDNN does not support or that fails is recorded with why, and the
next one runs. After each part DIR holds `gpu_check.md` (also printed at the
end), one CSV per part (`correctness.csv`, `tflops.csv`, `listops.csv`,
`attention.csv`, plus `attention.md`/`.png`) and `environment.txt`; every CSV
row names the device, platform, jax version, device count and date
(`sections.json` keeps the parts' results). `--parts=tflops,attention` runs a
subset; into a DIR of an earlier run, that run's other parts stay in the
report. `--reduced` runs every part at toy sizes (CPU: ~40 s on 2 cores; the CI
test runs it).

Exit code: 0 all requested parts ran and the correctness check passed (or was
not requested); 1 the correctness check failed (a case out of tolerance, or
cuDNN failing on a GPU that supports it); 3 it passed but another part crashed
or none of its cells ran; 2 a bad flag (one line `error: ...`).

On the GPU machine (Python 3.12, jax with CUDA, flax, optax, orbax, etils,
matplotlib, but no grain, ml-collections or tensorflow-datasets): parts
correctness, tflops and attention import only what that image has; part
listops trains through `training.state`, `data.tasks` and `data.pipeline`,
which import ml_collections and grain, so their wheels travel with the working
tree (without them that part records "No module named ..." and the rest runs).
Here, once, from the repository root (gpu_wheels.txt beside this file lists the
wheels and why; 17 wheels, 10.2 MiB, of which gpu_check needs the first four,
4.3 MiB; the rest serve the TFDS-backed LRA tasks):

    grep -v '^#' efficient_transformers/benchmarks/gpu_wheels.txt | xargs -n1 \
      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl
    python3 -m pip wheel --no-deps --no-binary=:all: -w .whl promise==2.3  # sdist only
    grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude

then on the GPU machine, in the repository root (the run tool's command, with
carry [".whl"]; no `pip install -e .`: `-m` puts the working directory on the
path, and PYTHONPATH names it too):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. \
      && python3 -m efficient_transformers.benchmarks.gpu_check --out=$OUT/gpu_check

A second call reruns what failed or was cut, e.g. `--parts=attention
--attention_lengths=8192` (the run tool's $OUT starts empty each call, so that
report holds the rerun parts only; a machine that went cold needs the install
again).
"""

from efficient_transformers.benchmarks.gpu_check.cli import main, report_markdown, write_csv
from efficient_transformers.benchmarks.gpu_check.common import (
  BUDGETS_S,
  FULL,
  PARTS,
  REDUCED,
  Budget,
  Sizes,
  device_info,
  peak_tflops,
)
from efficient_transformers.benchmarks.gpu_check.exact import (
  attention_flops,
  compare,
  exact_implementations,
  run_correctness,
  run_tflops,
)
from efficient_transformers.benchmarks.gpu_check.training import (
  listops_model_flops,
  run_attention,
  run_listops,
)

__all__ = [
  "BUDGETS_S", "FULL", "PARTS", "REDUCED", "Budget", "Sizes", "attention_flops", "compare",
  "device_info", "exact_implementations", "listops_model_flops", "main", "peak_tflops",
  "report_markdown", "run_attention", "run_correctness", "run_listops", "run_tflops", "write_csv",
]  # fmt: skip
