"""The compiled-HLO profile (`python -m efficient_transformers.benchmarks.hlo_profile`): its
HLO readers on hand-written module text, its FLOP formulas against hand counts, two rows
compiled at L=256, and its bad flags."""

import csv
import json
import os
import subprocess
import sys

import pytest

from efficient_transformers.benchmarks import hlo_profile
from tests.helpers import REPO, cli_env

TRANSPOSE_BYTES = 4 * 64 * 64 * 192 * 4  # f32[1,4,64,64,192]: 4 bytes an element

# A transpose alone, as XLA prints one outside any fusion.
TRANSPOSE = """HloModule transpose, entry_computation_layout={(f32[1,4,64,64,192]{4,3,2,1,0})->f32[1,4,64,64,192]{4,3,2,1,0}}

ENTRY %main (p: f32[1,4,64,192,64]) -> f32[1,4,64,64,192] {
  %p = f32[1,4,64,192,64]{4,3,2,1,0} parameter(0)
  ROOT %t = f32[1,4,64,64,192]{4,3,2,1,0} transpose(%p), dimensions={0,1,2,4,3}
}
"""  # noqa: E501

# A loop of 3 trips around a dot fusion (with a transpose fused into the dot) and a copy;
# after it, a fusion that only pads and concatenates, a convert and a top-level transpose.
MODULE = """HloModule snippet, entry_computation_layout={(f32[1,4,64,192,64]{4,3,2,1,0}, f32[4,64,64]{2,1,0})->(f32[1,4,64,64,192]{4,3,2,1,0}, bf16[4,64,192]{2,1,0})}

%fused_dot (param_0: f32[4,64,64], param_1: f32[4,64,64]) -> f32[4,64,64] {
  %param_0 = f32[4,64,64]{2,1,0} parameter(0)
  %param_1 = f32[4,64,64]{2,1,0} parameter(1)
  %transpose.1 = f32[4,64,64]{2,1,0} transpose(%param_1), dimensions={0,2,1}
  ROOT %dot.1 = f32[4,64,64]{2,1,0} dot(%param_0, %transpose.1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}, metadata={op_name="jit(f)/dot_general(bqd,bkd->bqk)"}
}

%body (arg: (s32[], f32[4,64,64])) -> (s32[], f32[4,64,64]) {
  %arg = (s32[], f32[4,64,64]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %x = f32[4,64,64]{2,1,0} get-tuple-element(%arg), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %y = f32[4,64,64]{2,1,0} fusion(%x, %x), kind=kOutput, calls=%fused_dot
  %y.copy = f32[4,64,64]{2,1,0} copy(%y)
  ROOT %tuple.1 = (s32[], f32[4,64,64]{2,1,0}) tuple(%next, %y.copy)
}

%cond (arg.1: (s32[], f32[4,64,64])) -> pred[] {
  %arg.1 = (s32[], f32[4,64,64]{2,1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%arg.1), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%i.1, %three), direction=LT
}

%fused_concat (param_0.1: f32[4,64,64]) -> f32[4,64,192] {
  %param_0.1 = f32[4,64,64]{2,1,0} parameter(0)
  %zero.1 = f32[] constant(0)
  %pad.1 = f32[4,64,64]{2,1,0} pad(%param_0.1, %zero.1), padding=0_0x0_0x0_0
  ROOT %concatenate.1 = f32[4,64,192]{2,1,0} concatenate(%param_0.1, %pad.1, %param_0.1), dimensions={2}
}

ENTRY %main (p: f32[1,4,64,192,64], x0: f32[4,64,64]) -> (f32[1,4,64,64,192], bf16[4,64,192]) {
  %p = f32[1,4,64,192,64]{4,3,2,1,0} parameter(0)
  %x0 = f32[4,64,64]{2,1,0} parameter(1)
  %t = f32[1,4,64,64,192]{4,3,2,1,0} transpose(%p), dimensions={0,1,2,4,3}
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,64,64]{2,1,0}) tuple(%zero, %x0)
  %loop = (s32[], f32[4,64,64]{2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_induction_variable":{"tuple_index":"0"},"known_trip_count":{"n":"3"}}
  %out = f32[4,64,64]{2,1,0} get-tuple-element(%loop), index=1
  %c = f32[4,64,192]{2,1,0} fusion(%out), kind=kLoop, calls=%fused_concat
  %cv = bf16[4,64,192]{2,1,0} convert(%c)
  ROOT %r = (f32[1,4,64,64,192]{4,3,2,1,0}, bf16[4,64,192]{2,1,0}) tuple(%t, %cv)
}
"""  # noqa: E501

SQUARE = """HloModule square

ENTRY %main (q: f32[1,4,256,64], k: f32[1,4,256,64]) -> f32[1,4,256,256] {
  %q = f32[1,4,256,64]{3,2,1,0} parameter(0)
  %k = f32[1,4,256,64]{3,2,1,0} parameter(1)
  ROOT %s = f32[1,4,256,256]{3,2,1,0} dot(%q, %k), lhs_batch_dims={0,1}, lhs_contracting_dims={3}, rhs_batch_dims={0,1}, rhs_contracting_dims={3}
}
"""  # noqa: E501

# A GPU module: names without %, a cuBLAS gemm custom-call returning (out, workspace).
GEMM = """HloModule gemm

ENTRY e {
  p1 = f32[16,32]{1,0} parameter(0)
  p2 = f32[32,8]{1,0} parameter(1)
  gemm = (f32[16,8]{1,0}, s8[1028]{0}) custom-call(p1, p2), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  other = f32[16,32]{1,0} custom-call(p1), custom_call_target="MyKernel"
  ROOT out = f32[16,8]{1,0} get-tuple-element(gemm), index=0
}
"""  # noqa: E501


def test_op_census_counts_every_op_of_a_hand_written_module():
  census = hlo_profile.op_census(MODULE)
  assert census == {
    **dict.fromkeys(hlo_profile.CENSUS_OPS, 0),
    "dot": 1,
    "transpose": 2,  # the entry's and the one fused into the dot
    "copy": 1,
    "concatenate": 1,
    "pad": 1,
    "convert": 1,
    "while": 1,
    "fusion": 2,
  }
  runs, fused, unknown = hlo_profile.executions(MODULE)
  assert (runs["main"], runs["body"], runs["fused_dot"], runs["fused_concat"]) == (1, 3, 3, 1)
  assert fused == {"fused_dot", "fused_concat"} and unknown == 0


def test_layout_and_concatenate_bytes_count_what_is_materialized_per_step():
  assert hlo_profile.moved_bytes(TRANSPOSE) == {"layout": TRANSPOSE_BYTES, "concatenate": 0}
  assert hlo_profile.shape_bytes("bf16[4,64,192]{2,1,0}") == 4 * 64 * 192 * 2
  assert hlo_profile.shape_bytes("(pred[3], s32[2])") == 3 + 8
  # The entry's transpose, plus the loop's copy 3 times; the transpose fused into the dot
  # moves nothing of its own. The pad-and-concatenate fusion writes f32[4,64,192] once.
  assert hlo_profile.moved_bytes(MODULE) == {
    "layout": TRANSPOSE_BYTES + 3 * 4 * 64 * 64 * 4,
    "concatenate": 4 * 64 * 192 * 4,
  }
  # A [4,64,64] x [4,64,64] batched dot contracting 64, run 3 times.
  assert hlo_profile.dot_flops(MODULE) == 3 * 2 * 4 * 64 * 64 * 64
  assert hlo_profile.largest_array(MODULE) == (TRANSPOSE_BYTES, "f32[1,4,64,64,192]")
  # A gemm custom-call counts as a dot; another custom-call does not.
  assert hlo_profile.dot_flops(GEMM) == 2 * 16 * 8 * 32
  assert hlo_profile.op_census(GEMM)["custom-call"] == 2


def test_square_arrays_need_two_axes_of_at_least_the_length():
  assert hlo_profile.square_arrays(SQUARE, 256) == ["f32[1,4,256,256]"]
  assert hlo_profile.square_arrays(SQUARE, 257) == []  # q and k have one such axis only
  assert hlo_profile.square_arrays(MODULE, 64) != []  # [4,64,64] at L=64
  assert hlo_profile.square_arrays(MODULE, 65) == []  # only the 192 axis is >= 65


def test_algorithmic_flops_match_hand_counts():
  L, d, H = 1024, 64, 4
  forward, backward = hlo_profile.algorithmic_flops(
    "softmax", batch=1, length=L, heads=H, head_dim=d
  )
  matmul = 2 * L * L * d * H  # Q K^T or P V, all heads
  assert (forward, backward) == (2 * matmul, 4 * matmul)
  # Local, block 64, 1 neighbor each side: 3 blocks of keys per query; causal 2.
  forward, backward = hlo_profile.algorithmic_flops("local", batch=2, length=L, heads=H, head_dim=d)
  matmul = 2 * L * (3 * 64) * d * H * 2
  assert (forward, backward) == (2 * matmul, 4 * matmul)
  forward, _ = hlo_profile.algorithmic_flops("local_causal", batch=1, length=L, heads=H, head_dim=d)
  assert forward == 2 * (2 * L * (2 * 64) * d * H)
  # Every row has a formula and a function that resolves.
  for row, (name, _) in hlo_profile.ROWS.items():
    assert callable(hlo_profile.attention_fn(name)) and name in hlo_profile.FLOP_FORMULAS, row


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
  """The softmax and local rows compiled at L=256, as main writes them."""
  out = tmp_path_factory.mktemp("hlo_profile")
  status = hlo_profile.main(
    ["--rows=softmax,local", "--lengths=256", f"--out={out}", "--hlo_lengths=256"]
  )
  assert status == 0
  with open(out / "hlo_profile.json") as f:
    return out, {r["row"]: r for r in json.load(f)}


def test_compiled_softmax_is_near_its_algorithm_and_only_it_has_an_l_by_l_array(compiled):
  out, rows = compiled
  softmax, local = rows["softmax"], rows["local"]
  assert 0.5 < softmax["xla_flops"] / softmax["alg_flops"] < 2, softmax
  assert 0.5 < softmax["dot_vs_alg"] < 2 and 0.5 < local["dot_vs_alg"] < 2
  assert softmax["square_array"] is not None and not softmax["square_unexpected"]
  assert local["square_array"] is None and not local["square_unexpected"]
  assert softmax["dot"] >= 4 and softmax["temp_bytes"] >= 4 * 256 * 256 * 4  # one [H, L, L]
  assert local["temp_bytes"] < softmax["temp_bytes"]
  with open(out / "hlo_profile.csv") as f:
    assert [r["row"] for r in csv.DictReader(f)] == ["softmax", "local"]
  table = (out / "hlo_profile.md").read_text()
  assert "| softmax | 256 |" in table and "Op census" in table and "jax " in table
  assert (out / "hlo" / "softmax.txt").read_text().startswith("HloModule")


def test_dry_run_traces_every_row_and_writes_nothing(tmp_path, capsys):
  out = tmp_path / "out"
  assert hlo_profile.main(["--dry_run", "--lengths=256", f"--out={out}"]) == 0
  assert "Dry run: 13 row(s) x 1 length(s) trace" in capsys.readouterr().out
  assert os.listdir(out) == []


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--rows=softmax,bogus", "error: --rows: unknown bogus; valid: softmax,"),
    ("--lengths=256,0", "error: --lengths='256,0': give positive integers"),
    ("--dtype=int8", "error: --dtype='int8': use float32"),
    ("--lengths=32", "block_size=64"),  # local's block is longer than the sequence
  ],
)
def test_bad_flags_are_one_line_and_write_nothing(tmp_path, capsys, flag, message):
  out = tmp_path / "out"
  assert hlo_profile.main([flag, f"--out={out}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
  assert os.listdir(out) == []


def test_the_command_exits_2_on_a_bad_row(tmp_path):
  done = subprocess.run(
    [sys.executable, "-m", "efficient_transformers.benchmarks.hlo_profile", "--rows=bogus",
     f"--out={tmp_path / 'out'}"],
    cwd=REPO, env={**cli_env(1), "PYTHONPATH": REPO}, capture_output=True, text=True,
    timeout=300,
  )  # fmt: skip
  assert done.returncode == 2 and done.stderr.startswith("error: --rows: unknown bogus"), done
  assert done.stderr.count("\n") == 1 and os.listdir(tmp_path / "out") == []
