"""Library errors name the library's argument; the training layer names the config key.

The library (attention, memory, models, layers) raises `ConfigError(message,
argument=...)` with the argument as a model's constructor takes it, and never
mentions a config; `training.state.build_model` re-raises it naming
`config.model.<key>`. Also: each variant's kwarg defaults are declared once, in
its pure function's signature.
"""

import ast
import inspect
import pathlib
import pickle
import sys
import textwrap

import jax.numpy as jnp
import pytest
from flax import nnx

from configs.lm import byte_lm
from configs.lra import listops
from efficient_transformers import attention, memory, models
from efficient_transformers.attention import local, performer, registry
from efficient_transformers.errors import ConfigError
from efficient_transformers.models import stack
from efficient_transformers.training import state

LIBRARY = pathlib.Path(attention.__file__).parent.parent
LIBRARY_DIRS = ("attention", "mixers", "memory", "models", "layers")
SIZES = dict(in_features=8, num_heads=2, head_dim=4)
ENCODER = dict(
  num_classes=3,
  classifier_dim=8,
  vocab_size=11,
  max_length=16,
  num_layers=1,
  emb_dim=8,
  num_heads=2,
  qkv_dim=8,
  mlp_dim=16,
)
DECODER = dict(
  num_layers=1, emb_dim=8, num_heads=2, qkv_dim=8, mlp_dim=16, segment_length=8, memory="none"
)


def _attention(name, **kwargs):
  return attention.make(name, **SIZES, rngs=nnx.Rngs(0), **kwargs)


def _qkv(length=8):
  x = jnp.ones((1, length, 2, 4))
  return x, x, x


# (what the user calls, the argument named, what the message spells).
DIRECT = {
  "performer kernel": (
    lambda: _attention("performer", kernel="foo"),
    "attention_kwargs.kernel",
    "kernel='foo'",
  ),
  "performer pure function": (
    lambda: performer.performer_attention(*_qkv(), jnp.ones((4, 4)), kernel="foo"),
    "attention_kwargs.kernel",
    "kernel='foo'",
  ),
  "local block_size": (
    lambda: _attention("local", block_size=0),
    "attention_kwargs.block_size",
    "block_size=0",
  ),
  "local block_size > length": (
    lambda: local.local_attention(*_qkv(8), block_size=16),
    "attention_kwargs.block_size",
    "block_size=16",
  ),
  "sparse pattern": (
    lambda: _attention("sparse", pattern="diagonal"),
    "attention_kwargs.pattern",
    "pattern='diagonal'",
  ),
  "longformer global_positions": (
    lambda: _attention("longformer", global_positions=(-1,)),
    "attention_kwargs.global_positions",
    "global_positions=(-1,)",
  ),
  "synthesizer form": (
    lambda: _attention("synthesizer", synthesizer="conv"),
    "attention_kwargs.synthesizer",
    "synthesizer='conv'",
  ),
  "bigbird num_window_blocks": (
    lambda: _attention("bigbird", num_window_blocks=2),
    "attention_kwargs.num_window_blocks",
    "num_window_blocks=2",
  ),
  "sinkhorn temperature": (
    lambda: _attention("sinkhorn", temperature=0.0),
    "attention_kwargs.temperature",
    "temperature=0.0",
  ),
  "unknown kwarg": (
    lambda: _attention("linear", num_features=4),
    "attention_kwargs.num_features",
    "['num_features']",
  ),
  "unknown attention": (lambda: _attention("nope"), "attention_name", "'nope'"),
  "not causal": (lambda: _attention("bigbird", causal=True), "attention_name", "causal=True"),
  "position": (lambda: _attention("synthesizer", position="rope"), "positional", "'rope'"),
  "memory mem_len": (
    lambda: memory.make("transformer_xl", num_layers=1, features=8, mem_len=-1),
    "mem_len",
    "mem_len=-1",
  ),
  "memory compression": (
    lambda: memory.make(
      "compressive",
      num_layers=1,
      features=8,
      mem_len=4,
      cmem_len=4,
      compression_rate=2,
      compression="median",
      rngs=nnx.Rngs(0),
    ),
    "compression",
    "compression='median'",
  ),
  "unknown memory": (
    lambda: models.Stack(
      num_layers=1, features=8, num_heads=2, head_dim=4, mlp_dim=8, memory="lstm", rngs=nnx.Rngs(0)
    ),
    "memory",
    "'lstm'",
  ),
  "share_layers": (
    lambda: stack.layer_group_size(4, share_layers=3),
    "share_layers",
    "share_layers=3",
  ),
  "scan with reversible": (
    lambda: stack.layer_group_size(4, reversible=True, scan_layers=True),
    "scan_layers",
    "scan_layers=True",
  ),
  "model positional": (
    lambda: models.EncoderClassifier(**ENCODER, positional="bogus", rngs=nnx.Rngs(0)),
    "positional",
    "'bogus'",
  ),
  "model qkv_dim": (
    lambda: models.EncoderClassifier(**dict(ENCODER, qkv_dim=9), rngs=nnx.Rngs(0)),
    "qkv_dim",
    "qkv_dim=9",
  ),
  "model attention kwarg": (
    lambda: models.EncoderClassifier(
      **ENCODER, attention_name="performer", attention_kwargs={"kernel": "foo"}, rngs=nnx.Rngs(0)
    ),
    "attention_kwargs.kernel",
    "kernel='foo'",
  ),
  "decoder positional": (
    lambda: models.DecoderLM(
      **dict(DECODER, memory="transformer_xl", mem_len=4), positional="learned", rngs=nnx.Rngs(0)
    ),
    "positional",
    "positional='learned'",
  ),
  "decoder mem_len": (
    lambda: models.DecoderLM(
      **dict(DECODER, memory="transformer_xl", mem_len=-1), rngs=nnx.Rngs(0)
    ),
    "mem_len",
    "mem_len=-1",
  ),
}


@pytest.mark.parametrize("case", DIRECT)
def test_a_direct_call_names_the_library_argument_and_no_config(case):
  call, argument, spelled = DIRECT[case]
  with pytest.raises(ConfigError) as error:
    call()
  message = str(error.value)
  assert error.value.argument == argument
  assert spelled in message
  assert message.endswith(f"(argument: {argument})")
  assert "config." not in message
  assert "\n" not in message


def _listops(attention_name="softmax", **attention_kwargs):
  config = listops.get_config(f"smoke,attention={attention_name}")
  config.model.attention_kwargs.update(attention_kwargs)
  return config


def _build(config):
  """As `state.make_setup` builds it: under nnx.eval_shape, so errors cross that trace."""
  return nnx.eval_shape(
    lambda: state.build_model(config.model, vocab_size=20, num_classes=10, rngs=nnx.Rngs(0))
  )


def _with(config, **model):
  for key, value in model.items():
    config.model[key] = value
  return config


# (config with the bad value, the config key the message must end with).
THROUGH_CONFIG = {
  "performer kernel": (lambda: _listops("performer", kernel="foo"), "attention_kwargs.kernel"),
  "local block_size": (lambda: _listops("local", block_size=0), "attention_kwargs.block_size"),
  "sparse pattern": (lambda: _listops("sparse", pattern="diagonal"), "attention_kwargs.pattern"),
  "longformer global_positions": (
    lambda: _listops("longformer", global_positions=(-1,)),
    "attention_kwargs.global_positions",
  ),
  "synthesizer form": (
    lambda: _listops("synthesizer", synthesizer="conv"),
    "attention_kwargs.synthesizer",
  ),
  # attention_name is config key `attention`.
  "unknown attention": (lambda: _with(_listops(), attention="nope"), "attention"),
  "share_layers": (lambda: _with(_listops(), share_layers="half"), "share_layers"),
  "positional": (lambda: _with(_listops(), positional="bogus"), "positional"),
  "qkv_dim": (lambda: _with(_listops(), qkv_dim=30), "qkv_dim"),
  "decoder mem_len": (lambda: _with(byte_lm.get_config("smoke"), mem_len=-1), "mem_len"),
  "decoder compression": (
    lambda: _with(byte_lm.get_config("smoke,memory=compressive"), compression="median"),
    "compression",
  ),
}


@pytest.mark.parametrize("case", THROUGH_CONFIG)
def test_through_a_config_the_message_names_the_config_key(case):
  make_config, key = THROUGH_CONFIG[case]
  config = make_config()
  with pytest.raises(ConfigError) as error:
    _build(config)
  message = str(error.value)
  assert message.endswith(f"(set by config.model.{key})"), message
  assert "(argument:" not in message
  assert error.value.__cause__ is None and error.value.__suppress_context__


def test_an_unknown_attention_in_a_config_arg_names_the_config():
  with pytest.raises(
    ConfigError, match=r"'nope'.*set by config.model.attention, or the config arg"
  ):
    listops.get_config("smoke,attention=nope")


def test_config_errors_without_an_argument_pass_through_unchanged():
  config = _with(_listops(), kind="nope")
  with pytest.raises(ConfigError, match=r"^config.model.kind='nope' is unknown; valid: "):
    _build(config)
  error = ConfigError("plain")
  assert (str(error), error.argument, error.message) == ("plain", None, "plain")


def test_config_error_keeps_its_argument_through_pickle():
  error = pickle.loads(pickle.dumps(ConfigError("bad value.", argument="num_heads")))
  assert (str(error), error.argument) == ("bad value. (argument: num_heads)", "num_heads")


def _library_files():
  for directory in LIBRARY_DIRS:
    yield from sorted((LIBRARY / directory).rglob("*.py"))


def _docstrings(tree) -> set[int]:
  """ids of the docstring nodes of a module and its classes and functions."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        out.add(id(body[0].value))
  return out


def test_no_library_string_mentions_a_config():
  """Messages (every string literal, f-string parts included) never say `config.`.

  Docstrings may: they speak to readers of the code (e.g. how the training
  layer's configs select a variant), not to the user of a failing call.
  """
  offenders = []
  for path in _library_files():
    tree = ast.parse(path.read_text())
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
      if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and "config." in node.value
        and id(node) not in docstrings
      ):
        offenders.append(f"{path.relative_to(LIBRARY)}:{node.lineno}: {node.value!r}")
  assert not offenders, "\n".join(offenders)


# ConfigErrors about a call's own argument, which no model constructor takes.
_NO_ARGUMENT = {("attention/bigbird.py", "_as_key")}  # layout_key of bigbird_attention


def test_every_library_config_error_names_an_argument():
  missing = []
  for path in _library_files():
    tree = ast.parse(path.read_text())
    for function in ast.walk(tree):
      if not isinstance(function, ast.FunctionDef):
        continue
      where = (str(path.relative_to(LIBRARY)), function.name)
      for node in ast.walk(function):
        if (
          isinstance(node, ast.Call)
          and getattr(node.func, "id", None) == "ConfigError"
          and not any(k.arg == "argument" for k in node.keywords)
          and where not in _NO_ARGUMENT
        ):
          missing.append(f"{where[0]}:{node.lineno} in {where[1]}")
  assert not missing, "ConfigError without argument=:\n" + "\n".join(missing)


# Pure functions beyond `<name>_attention` whose defaults a module takes.
_MORE_FUNCTIONS = {"performer": ("draw_random_features",)}


def _pure_functions(name: str) -> list:
  module = sys.modules[registry.get_class(name).__module__]
  names = (f"{name}_attention", *_MORE_FUNCTIONS.get(name, ()))
  return [getattr(module, n) for n in names]


def _shared_kwargs(name: str) -> dict[str, object]:
  """The module's variant kwargs that a pure function also takes with a default: name -> it."""
  shared = {}
  for function in _pure_functions(name):
    for key, param in inspect.signature(function).parameters.items():
      if key in registry.variant_kwargs(name) and param.default is not param.empty:
        shared.setdefault(key, param.default)
  return shared


def test_each_variant_takes_its_defaults_from_its_pure_function():
  checked = 0
  for name in attention.available():
    declared = registry.variant_kwargs(name)
    for key, default in _shared_kwargs(name).items():
      assert declared[key].default is default, (name, key, declared[key].default, default)
      checked += 1
  assert checked >= 25  # Every structured variant's sizes; a vacuous pass would fail.


def test_no_module_restates_a_shared_default_as_a_literal():
  """A literal default in the module beside the function's would let them drift apart."""
  for name in attention.available():
    cls = registry.get_class(name)
    shared = _shared_kwargs(name)
    if not shared:
      continue
    init = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__))).body[0]
    defaults = dict(zip((a.arg for a in init.args.kwonlyargs), init.args.kw_defaults, strict=True))
    for key in shared:
      node = defaults[key]
      try:
        ast.literal_eval(node)
      except ValueError:
        continue  # An expression such as _DEFAULTS.block_size: taken from the function.
      pytest.fail(
        f"{cls.__name__}.__init__ restates {key}={ast.unparse(node)}; take it from "
        "the pure function (attention.base.defaults_of)"
      )


def test_make_still_builds_every_variant_with_its_defaults():
  for name in attention.available():
    assert isinstance(_attention(name), registry.get_class(name))


def test_an_error_raised_while_the_step_is_traced_names_the_config_key():
  # Linformer's projections are built for max_length rows; a longer input is refused when
  # the step is traced, not when the model is built: the compile maps it too.
  from efficient_transformers.data import tasks
  from efficient_transformers.training import train_lib

  config = _listops()
  config.model.attention = "linformer"
  config.model.attention_kwargs = {"max_length": 16, "k": 8}
  spec = tasks.describe(config)
  setup = train_lib._build(config, spec)
  with pytest.raises(ConfigError) as error:
    train_lib._compile_train_step(config, spec, setup)
  message = str(error.value)
  assert "exceeds max_length=16" in message
  assert message.endswith("(set by config.model.attention_kwargs.max_length)"), message
