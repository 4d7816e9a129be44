"""Imports point down only: attention and layers <- memory <- models <- training, data <- training.

Read from the source with `ast` (every import, including those inside
functions), so the test needs no import side effects and names the offending
file and line.
"""

import ast
import functools
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "efficient_transformers"

# What each subpackage may import besides itself. The shared utilities (errors,
# paths, interruptions) sit below everything; benchmarks sit on top.
UTILITIES = {"errors", "paths", "interruptions"}
ALLOWED = {
  "errors": set(),
  "paths": {"errors"},
  "interruptions": {"errors"},
  "layers": UTILITIES,
  "attention": UTILITIES | {"layers"},
  "mixers": UTILITIES | {"layers"},
  "memory": UTILITIES | {"layers", "attention"},
  "models": UTILITIES | {"layers", "attention", "mixers", "memory"},
  "data": UTILITIES,
  "training": UTILITIES | {"layers", "attention", "mixers", "memory", "models", "data"},
  "benchmarks": UTILITIES
  | {"layers", "attention", "mixers", "memory", "models", "data", "training"},
  "visualize": UTILITIES
  | {"layers", "attention", "mixers", "memory", "models", "data", "training"},
}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path) -> list[tuple[str, int]]:
  """(imported efficient_transformers module, line) for every import in `path`."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module.startswith("efficient_transformers"):
        for alias in node.names:
          candidate = f"{node.module}.{alias.name}"
          relative = candidate.split(".")[1:]
          is_module = (ROOT.joinpath(*relative).with_suffix(".py")).exists() or ROOT.joinpath(
            *relative
          ).is_dir()
          found.append((candidate if is_module else node.module, node.lineno))
    elif isinstance(node, ast.Import):
      found += [(a.name, node.lineno) for a in node.names if a.name.startswith("efficient_")]
  return found


def package_of(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def upward_imports(edges: dict[str, list[tuple[str, int]]]) -> list[str]:
  """'module:line imports target' for every import that `ALLOWED` forbids."""
  bad = []
  for module, targets in sorted(edges.items()):
    source = package_of(module)
    for target, line in targets:
      dest = package_of(target)
      if dest in ("", source):
        continue
      if dest not in ALLOWED.get(source, set()):
        bad.append(f"{module}:{line} imports {target}")
  return bad


def cycles(edges: dict[str, list[tuple[str, int]]], package: str) -> list[list[str]]:
  """Import cycles among the modules of `package` (self-imports ignored)."""
  graph = {
    m: {t for t, _ in ts if package_of(t) == package and t != m}
    for m, ts in edges.items()
    if package_of(m) == package
  }
  found, state = [], {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        found.append(stack[stack.index(nxt) :] + [nxt])
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  return found


@functools.cache
def package_edges():
  return {module_name(p): imports(p) for p in ROOT.rglob("*.py")}


def test_no_import_points_upward():
  edges = package_edges()
  assert set(map(package_of, edges)) - {""} <= set(ALLOWED), "a new subpackage needs a level"
  assert upward_imports(edges) == []


@pytest.mark.parametrize("package", ["data", "memory", "models", "layers"])
def test_no_import_cycles(package):
  assert cycles(package_edges(), package) == []


def test_the_checks_catch_what_they_look_for():
  edges = {
    "efficient_transformers.layers.norm": [("efficient_transformers.models.stack", 3)],
    "efficient_transformers.data.a": [("efficient_transformers.data.b", 1)],
    "efficient_transformers.data.b": [("efficient_transformers.data.a", 2)],
  }
  assert upward_imports(edges) == [
    "efficient_transformers.layers.norm:3 imports efficient_transformers.models.stack"
  ]
  assert cycles(edges, "data") == [
    [
      "efficient_transformers.data.a",
      "efficient_transformers.data.b",
      "efficient_transformers.data.a",
    ]
  ]
  # And the real tree has the imports the check reads (it is not reading nothing).
  stack_imports = dict(package_edges())["efficient_transformers.models.stack"]
  assert any(t == "efficient_transformers.models.mixing" for t, _ in stack_imports)
  mixing_imports = dict(package_edges())["efficient_transformers.models.mixing"]
  assert any(t == "efficient_transformers.attention" for t, _ in mixing_imports)
