r"""Pathfinder: a seeded contour-integration image generator in the release layout.

Images follow Linsley et al. (2018), "Learning long-range spatial dependencies
with horizontal gated recurrent units": curved paths made of short straight
"paddles", each turning from the last by at most `CONTINUITY_DEGREES`; two
round markers; distractor paths. Every image holds two "main" paths of the
difficulty's contour length (6, 9 or 14 paddles). A positive (label 1) marks
both ends of the first main path; a negative (label 0) marks one end of each,
so the two classes have the same pixel statistics and differ only in whether
the markers are joined. Shorter distractors (contour length // 3 paddles,
about `DISTRACTOR_PADDLES` paddles in all) add clutter.

Connectivity is exact on pixels. A path is rasterized from samples at most
half a pixel apart, each rounded to its pixel and stamped with the paddle's
brush, so the pixels of one path (its markers included) form one
8-connected set. Unlike the original, paddles are drawn without a gap: any
gap of a pixel or more would split a path into 8-connected pieces, and
"the markers are connected" would no longer be a property of the image
(the turns between paddles still show where one ends). Different paths
never come within `margin` pixels (Chebyshev) of each other. Each path is
first drawn as a shape, its turns redrawn while it comes too close to itself,
then rasterized and placed at a uniformly chosen integer offset among those
where none of its pixels falls in the forbidden mask (the paths already
placed, dilated by `margin`); a shape that fits nowhere is replaced by a new
one. Main paths go first; in a crowded image a distractor may be left out.
So, with threshold > 0 and 8-connectivity, the two markers are in one
connected component exactly when the label is 1. (Growing paths paddle by
paddle on the canvas, rejecting colliding paddles, took several times more
steps at 32 px, where 14-paddle paths keep running into the border.)

Image i (counting from 0 over the whole set) is drawn from
`np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))`, and
its label is i % 2, so the files are byte-identical for any number of
worker processes. Output (the layout of the LRA release):

  OUT/pathfinder{N}/{curv_baseline,curv_contour_length_9,curv_contour_length_14}/
    imgs/<batch>/sample_<k>.png   8-bit grayscale N x N PNG, k = index within the batch
    metadata/<batch>.npy          text, one line per image, space separated:
      imgs/<batch> sample_<k>.png k label continuity contour_length distractor_length
      paddle_length paddle_thickness margin number_of_contrasts
    (continuity in degrees; paddle length, thickness and margin in pixels, see GEOMETRY)
  plus `.pathfinder_generator.json`, the settings a resumed run must match.

A batch's images are written to a hidden temporary directory and its metadata
last, each renamed into place when complete, so a batch exists exactly when
its metadata file does; a rerun skips complete batches and redraws the rest.
A run killed at any point (even with SIGKILL) takes its worker processes with
it; the next run in the same directory removes the temporary files it left
(`.<batch>.tmp-HOST-PID`) and writes the same bytes as an uninterrupted run.

Cost (hard, PNG writing included): about 3 CPU-ms an image at 32 px and 7 at
128 px, so a release-size set of 200,000 takes about 10 CPU-minutes at 32 px
and 25 at 128 px, divided among the worker processes.

  python -m efficient_transformers.data.pathfinder_generator --out_dir=data/lra/pathfinder \
    --resolution=32 --difficulty=hard --num_images=200000 --seed=0
"""

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
import time
import zlib

import numpy as np

from efficient_transformers import interruptions, paths
from efficient_transformers.errors import ConfigError, DataError, UserError

_log = logging.getLogger(__name__)

RESOLUTIONS = (32, 64, 128, 256)
# Difficulty -> (release directory, contour length in paddles).
DIFFICULTIES = {
  "easy": ("curv_baseline", 6),
  "intermediate": ("curv_contour_length_9", 9),
  "hard": ("curv_contour_length_14", 14),
}
CONTINUITY_DEGREES = 30  # Largest turn between consecutive paddles of a path.
DISTRACTOR_PADDLES = 24  # About this many distractor paddles per image, at every difficulty.
NUM_CONTRASTS = 1  # Every path is drawn at full intensity (255).
_VERSION = 1  # Part of the seed's meaning: bump it when the drawing changes.
# Search limits, also part of the seed's meaning.
_FULL_SEARCH = 1 << 21  # Placements x pixels up to which every placement is checked.
_FIRST_BATCH = 32  # Random placements tried first.
_PLACEMENT_BATCH = 256  # Where a full search is too costly: random placements per batch ...
_PLACEMENT_BATCHES = 8  # ... and batches before giving up on the path.
_MAIN_TRIES = 20  # New shapes for a main path before the image is started over.
_DISTRACTOR_TRIES = 3  # New shapes for a distractor before it is left out.
_MANIFEST = ".pathfinder_generator.json"
_BATCH_TEMPS = r"\.\d+"  # Bases of the temporary `.<batch>.tmp-HOST-PID` in imgs/ and metadata/.


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Sizes in pixels at one resolution (all scale with it, from 32 px)."""

  paddle_length: int
  paddle_thickness: int  # Odd: a disk brush of radius (thickness - 1) / 2.
  margin: int  # Blank pixels (Chebyshev) kept between different paths.
  marker_radius: float


GEOMETRY = {
  32: Geometry(paddle_length=2, paddle_thickness=1, margin=1, marker_radius=1.5),
  64: Geometry(paddle_length=4, paddle_thickness=1, margin=2, marker_radius=2.5),
  128: Geometry(paddle_length=8, paddle_thickness=3, margin=3, marker_radius=4.5),
  256: Geometry(paddle_length=16, paddle_thickness=5, margin=6, marker_radius=8.5),
}


@dataclasses.dataclass(frozen=True)
class Scene:
  """One drawn image and how it was built.

  Attributes:
    image: uint8 [N, N], 0 background, 255 paths and markers.
    marker_centers: int [2, 2] (row, column) of the two markers' center pixels.
    paths: float [num_paddles + 1, 2] vertices (row, column) of each path; the
      two main paths come first.
    label: 1 when both markers lie on paths[0], 0 when they lie on paths[0]
      and paths[1].
  """

  image: np.ndarray
  marker_centers: np.ndarray
  paths: list[np.ndarray]
  label: int


@dataclasses.dataclass(frozen=True)
class GenerationStats:
  """What a `generate` call did."""

  root: str  # OUT/pathfinder{N}/<difficulty dir>.
  num_batches_written: int
  num_batches_skipped: int  # Complete batches found from an earlier run.
  seconds: float


def _check_choice(resolution: int, difficulty: str) -> None:
  if resolution not in RESOLUTIONS:
    raise ConfigError(
      f"Unknown Pathfinder resolution {resolution!r}; valid resolutions: "
      f"{', '.join(map(str, RESOLUTIONS))}."
    )
  if difficulty not in DIFFICULTIES:
    raise ConfigError(
      f"Unknown Pathfinder difficulty {difficulty!r}; valid difficulties: "
      f"{', '.join(DIFFICULTIES)}."
    )


def contour_length(difficulty: str) -> int:
  """Paddles in each main path at `difficulty` (easy 6, intermediate 9, hard 14)."""
  _check_choice(RESOLUTIONS[0], difficulty)
  return DIFFICULTIES[difficulty][1]


def distractor_length(difficulty: str) -> int:
  """Paddles in each distractor path: a third of the contour length (at least 2)."""
  return max(2, contour_length(difficulty) // 3)


def image_rng(seed: int, index: int) -> np.random.Generator:
  """The generator that image `index` of a set made with `seed` is drawn from."""
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


@functools.cache
def _disk(radius: float) -> np.ndarray:
  """int [K, 2] offsets of the pixels within `radius` (plus rounding slack) of a center."""
  r = int(math.floor(radius + 0.5))
  dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
  inside = dy**2 + dx**2 <= radius**2 + 0.5
  return np.stack([dy[inside], dx[inside]], axis=1)


class _Canvas:
  """The image being drawn, and the pixels a new path may not touch.

  `forbidden` has a border of `margin` pixels on each side, so that placed
  paths can be dilated with flat offsets without wrapping around a row.
  """

  def __init__(self, resolution: int, geometry: Geometry):
    self.n = resolution
    self.g = geometry
    m = geometry.margin
    self.w = resolution + 2 * m  # Row length of `forbidden`.
    self.image = np.zeros((resolution, resolution), np.uint8)
    self.forbidden = np.zeros(self.w * self.w, bool)
    dy, dx = np.mgrid[-m : m + 1, -m : m + 1]
    self.grow = (dy * self.w + dx).ravel()  # A square: Chebyshev distance <= margin.
    self.brush = _disk((geometry.paddle_thickness - 1) / 2)
    self.marker = _disk(geometry.marker_radius)
    # A paddle is sampled every half pixel, so its rounded samples are 8-connected.
    self.k = 2 * geometry.paddle_length
    self.fraction = np.arange(self.k) / self.k
    # Centerline points farther apart than `self_arc` along a path must stay
    # farther than `self_gap` apart in the plane.
    self.self_gap = geometry.paddle_thickness + geometry.margin
    self.self_arc = 3 * self.self_gap

  def samples(self, vertices: np.ndarray) -> np.ndarray:
    """float [..., num_paddles * k + 1, 2] points half a pixel apart along paths."""
    start, delta = vertices[..., :-1, :], np.diff(vertices, axis=-2)
    pts = start[..., None, :] + delta[..., None, :] * self.fraction[:, None]
    pts = pts.reshape(*vertices.shape[:-2], -1, 2)
    return np.concatenate([pts, vertices[..., -1:, :]], axis=-2)

  def place(
    self, rng: np.random.Generator, pixels: np.ndarray
  ) -> tuple[np.ndarray, np.ndarray] | None:
    """A uniform placement of a shape where it touches nothing.

    Args:
      rng: the image's generator.
      pixels: int [P, 2] the shape's pixels (repeats allowed), in any frame.

    Returns:
      (the flat indices into `forbidden` of its distinct pixels once placed,
      the integer (row, column) shift applied), or None when the shape fits
      nowhere (or, on large canvases, no fitting place was found).
    """
    n, w, m = self.n, self.w, self.g.margin
    lo = pixels.min(0)
    rel = pixels - lo
    rows, cols = n - int(rel[:, 0].max()), n - int(rel[:, 1].max())
    if rows < 1 or cols < 1:
      return None
    offsets = np.unique(rel[:, 0] * w + rel[:, 1])  # From the shape's top-left corner.
    # Rejection sampling (the first clear one of uniform placements) is cheap
    # on a free canvas; where it fails, all placements are checked if that is
    # affordable, else more are sampled. Each way, the place is uniform over
    # the clear ones.
    full = rows * cols * offsets.size <= _FULL_SEARCH
    for batch in range(1 if full else _PLACEMENT_BATCHES):
      size = _FIRST_BATCH if batch == 0 else _PLACEMENT_BATCH
      r = rng.integers(0, rows, size)
      corners = (r + m) * w + rng.integers(0, cols, size) + m
      clear = np.flatnonzero(~self.forbidden[corners[:, None] + offsets].any(1))
      if clear.size:
        corner = int(corners[clear[0]])
        break
    else:
      if not full:
        return None
      corners = ((np.arange(rows)[:, None] + m) * w + np.arange(cols) + m).ravel()
      clear = np.flatnonzero(~self.forbidden[corners[:, None] + offsets].any(1))
      if clear.size == 0:
        return None
      corner = int(corners[clear[rng.integers(clear.size)]])
    return corner + offsets, np.array(divmod(corner, w)) - m - lo

  def commit(self, flat: np.ndarray) -> None:
    """Draws a placed path (flat indices into `forbidden`); forbids its surround."""
    self.forbidden[(flat[:, None] + self.grow).ravel()] = True
    m = self.g.margin
    self.image[flat // self.w - m, flat % self.w - m] = 255

  def rasterize(self, vertices: np.ndarray, markers: tuple[int, ...]) -> np.ndarray:
    """int [count, P, 2] pixels of paths with float [count, n + 1, 2] vertices.

    Markers are drawn at the given vertex indices of each path.
    """
    count = vertices.shape[0]
    points = np.rint(self.samples(vertices)).astype(np.int64)
    pixels = [(points[:, :, None, :] + self.brush).reshape(count, -1, 2)]
    for i in markers:
      center = np.rint(vertices[:, i]).astype(np.int64)
      pixels.append(center[:, None, :] + self.marker)
    return np.concatenate(pixels, axis=1)


def _draw_shapes(
  rng: np.random.Generator, canvas: _Canvas, count: int, num_paddles: int
) -> np.ndarray:
  """float [count, num_paddles + 1, 2] vertices of self-avoiding paths from the origin.

  Directions: the first uniform, each next one the last plus a uniform turn
  within the continuity bound. A path that comes back too close to itself is
  redrawn.
  """
  g = canvas.g
  max_turn = math.radians(CONTINUITY_DEGREES)
  spacing = max(1, canvas.self_gap // 3)  # Self-avoidance on points `spacing` px apart.
  stride = canvas.k // g.paddle_length * spacing
  out = np.empty((count, num_paddles + 1, 2))
  todo = np.arange(count)
  while todo.size:
    turns = rng.uniform(-max_turn, max_turn, (todo.size, num_paddles))
    turns[:, 0] = rng.uniform(0.0, 2 * math.pi, todo.size)
    theta = np.cumsum(turns, axis=1)
    steps = g.paddle_length * np.stack([np.sin(theta), np.cos(theta)], axis=-1)
    vertices = np.concatenate([np.zeros((todo.size, 1, 2)), np.cumsum(steps, axis=1)], axis=1)
    points = canvas.samples(vertices)[:, ::stride]
    d2 = ((points[:, :, None, :] - points[:, None, :, :]) ** 2).sum(-1)
    along = np.arange(points.shape[1]) * spacing  # Pixels along the path.
    far = along[:, None] - along[None, :] > canvas.self_arc
    ok = ~((d2 < canvas.self_gap**2) & far).any((1, 2))
    out[todo[ok]] = vertices[ok]
    todo = todo[~ok]
  return out


def _place_paths(
  rng: np.random.Generator,
  canvas: _Canvas,
  count: int,
  num_paddles: int,
  markers: tuple[int, ...],
  tries: int,
) -> list[tuple[np.ndarray, np.ndarray] | None]:
  """Draws paths (markers at the given vertex indices) and places each where it fits.

  A path that fits nowhere is replaced by a new one, up to `tries` times.

  Returns:
    Per path, None or (float [num_paddles + 1, 2] vertices as drawn, int [2]
    shift that placed them): its pixels are those of the drawn vertices,
    shifted.
  """
  placed: list[tuple[np.ndarray, np.ndarray] | None] = [None] * count
  todo = list(range(count))
  for _ in range(tries):
    if not todo:
      break
    vertices = _draw_shapes(rng, canvas, len(todo), num_paddles)
    pixels = canvas.rasterize(vertices, markers)
    failed = []
    for j, i in enumerate(todo):
      result = canvas.place(rng, pixels[j])
      if result is None:
        failed.append(i)
      else:
        canvas.commit(result[0])
        placed[i] = (vertices[j], result[1])
    todo = failed
  return placed


def draw_scene(rng: np.random.Generator, resolution: int, difficulty: str, label: int) -> Scene:
  """Draws one image: two main paths, markers, distractors.

  The first main path is placed first, with its markers, then the second,
  then the distractors; each path is uniform over the places it fits.

  Args:
    rng: the image's generator (see `image_rng`).
    resolution: image side N, one of RESOLUTIONS.
    difficulty: one of DIFFICULTIES.
    label: 1 (markers at the two ends of one path) or 0 (on two different paths).

  Returns:
    The drawn `Scene`.
  """
  _check_choice(resolution, difficulty)
  if label not in (0, 1):
    raise ConfigError(f"Pathfinder label must be 0 or 1, got {label!r}.")
  length, d_length = contour_length(difficulty), distractor_length(difficulty)
  for _ in range(100):  # Starts over when a main path fits nowhere (rare).
    canvas = _Canvas(resolution, GEOMETRY[resolution])
    # Positive: both markers on path a. Negative: one at the start of each.
    markers_a, markers_b = ((0, length), ()) if label else ((0,), (0,))
    (a,) = _place_paths(rng, canvas, 1, length, markers_a, _MAIN_TRIES)
    if a is None:
      continue
    (b,) = _place_paths(rng, canvas, 1, length, markers_b, _MAIN_TRIES)
    if b is not None:
      break
  else:
    raise RuntimeError(f"Pathfinder geometry {GEOMETRY[resolution]} leaves no room for two paths.")
  count = math.ceil(DISTRACTOR_PADDLES / d_length)
  distractors = _place_paths(rng, canvas, count, d_length, (), _DISTRACTOR_TRIES)
  placed = [a, b] + [p for p in distractors if p is not None]
  # Marker centers as drawn: the rounded vertex, then shifted (exact, unlike
  # rounding the shifted float vertex).
  ends = [(a, 0), (a, length)] if label else [(a, 0), (b, 0)]
  centers = np.stack([np.rint(v[i]).astype(np.int64) + shift for (v, shift), i in ends])
  return Scene(canvas.image, centers, [v + shift for v, shift in placed], int(label))


def draw_image(
  rng: np.random.Generator, resolution: int, difficulty: str, label: int
) -> tuple[np.ndarray, np.ndarray]:
  """Draws one image; see `draw_scene`.

  Returns:
    (uint8 [N, N] image, int [2, 2] (row, column) marker centers).
  """
  scene = draw_scene(rng, resolution, difficulty, label)
  return scene.image, scene.marker_centers


def png_bytes(image: np.ndarray) -> bytes:
  """Encodes a uint8 [H, W] image as an 8-bit grayscale PNG (deterministic bytes)."""
  h, w = image.shape

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  raw = np.concatenate([np.zeros((h, 1), np.uint8), image.astype(np.uint8)], axis=1)  # Filter 0.
  return (
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
    + chunk(b"IEND", b"")
  )


def difficulty_root(out_dir: str, resolution: int, difficulty: str) -> str:
  """`out_dir/pathfinder{N}/<difficulty dir>`, where imgs/ and metadata/ go."""
  _check_choice(resolution, difficulty)
  return os.path.join(out_dir, f"pathfinder{resolution}", DIFFICULTIES[difficulty][0])


def _write_batch(
  root: str, batch: int, first: int, count: int, seed: int, resolution: int, difficulty: str
) -> int:
  """Draws and writes images first..first+count-1 as batch `batch`; returns `count`."""
  g = GEOMETRY[resolution]
  tmp = interruptions.temp_path(f".{batch}")  # This worker's pid: it dies with the parent.
  img_tmp = os.path.join(root, "imgs", tmp)
  meta_tmp = os.path.join(root, "metadata", tmp)
  shutil.rmtree(img_tmp, ignore_errors=True)
  os.makedirs(img_tmp)
  lines = []
  for k in range(count):
    i = first + k
    label = i % 2
    image, _ = draw_image(image_rng(seed, i), resolution, difficulty, label)
    with open(os.path.join(img_tmp, f"sample_{k}.png"), "wb") as f:
      f.write(png_bytes(image))
    lines.append(
      f"imgs/{batch} sample_{k}.png {k} {label} {CONTINUITY_DEGREES} "
      f"{contour_length(difficulty)} {distractor_length(difficulty)} {g.paddle_length} "
      f"{g.paddle_thickness} {g.margin} {NUM_CONTRASTS}\n"
    )
  with open(meta_tmp, "w", encoding="ascii") as f:
    f.writelines(lines)
  img_dir = os.path.join(root, "imgs", str(batch))
  shutil.rmtree(img_dir, ignore_errors=True)  # Left by a run stopped between the renames.
  os.replace(img_tmp, img_dir)
  os.replace(meta_tmp, os.path.join(root, "metadata", f"{batch}.npy"))  # Last: marks completion.
  return count


def _check_manifest(root: str, manifest: dict) -> None:
  """Records the run's parameters in root, or checks them against an earlier run's."""
  path = os.path.join(root, _MANIFEST)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      try:
        old = json.load(f)
      except ValueError:
        old = None
    if old != manifest:
      if isinstance(old, dict):
        diff = [
          f"{k} {old.get(k)!r} there, {v!r} now" for k, v in manifest.items() if old.get(k) != v
        ]
        what = "; ".join(diff)
      else:
        what = f"{path} is unreadable"
      raise DataError(
        f"{root} holds Pathfinder images made with other settings ({what}; recorded in {path}). "
        "Rerun with the same settings to resume, or use another --out_dir, or delete "
        f"{root} to start over."
      )
    return
  tmp = interruptions.temp_path(path)
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, sort_keys=True)
  os.replace(tmp, path)


def _remove_interrupted(root: str) -> None:
  """Removes the temporary files and folders of runs in `root` that were killed."""
  interruptions.remove_stale_temps(root, re.escape(_MANIFEST))
  for sub in ("imgs", "metadata"):
    interruptions.remove_stale_temps(os.path.join(root, sub), _BATCH_TEMPS)


def generate(
  out_dir: str,
  *,
  resolution: int,
  difficulty: str,
  num_images: int,
  seed: int = 0,
  num_workers: int | None = None,
  images_per_batch: int = 1000,
) -> GenerationStats:
  """Generates a Pathfinder set in the release layout, resuming an interrupted run.

  Worker processes are spawned: as Python requires, call this from under
  `if __name__ == "__main__":` in a script (where spawn cannot start, the
  batches are drawn in this process).

  Args:
    out_dir: the directory that gets `pathfinder{N}/<difficulty dir>/`; it may
      be relative, start with `~` or pass through symlinks.
    resolution: image side N, one of RESOLUTIONS.
    difficulty: one of DIFFICULTIES (easy, intermediate, hard).
    num_images: images in the set, half of each label.
    seed: non-negative integer; the files are a function of (seed, settings).
    num_workers: processes drawing batches (default: the CPUs this process
      may use, at most 16); does not change the output.
    images_per_batch: images per `imgs/<batch>` directory and metadata file.

  Returns:
    Statistics of the run.
  """
  _check_choice(resolution, difficulty)
  for name, value, low in (
    ("num_images", num_images, 0),
    ("seed", seed, 0),
    ("images_per_batch", images_per_batch, 1),
    ("num_workers", 1 if num_workers is None else num_workers, 1),
  ):
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
      raise ConfigError(f"Pathfinder {name} must be an integer >= {low}, got {value!r}.")
  out_dir = paths.local_dir(out_dir, what="out_dir")
  t0 = time.perf_counter()
  root = difficulty_root(out_dir, resolution, difficulty)
  for sub in ("imgs", "metadata"):
    paths.make_dir(os.path.join(root, sub))
  _remove_interrupted(root)
  manifest = dict(
    version=_VERSION,
    seed=int(seed),
    num_images=int(num_images),
    images_per_batch=int(images_per_batch),
    resolution=resolution,
    difficulty=difficulty,
  )
  _check_manifest(root, manifest)
  batches = [
    (b, first, min(images_per_batch, num_images - first))
    for b, first in enumerate(range(0, num_images, images_per_batch))
  ]
  todo = [t for t in batches if not os.path.exists(os.path.join(root, "metadata", f"{t[0]}.npy"))]
  skipped = len(batches) - len(todo)
  if skipped:
    _log.info("%s: %d complete batches found; drawing the other %d.", root, skipped, len(todo))
  num_workers = min(num_workers or min(len(os.sched_getaffinity(0)), 16), max(len(todo), 1))
  args = [(root, b, first, count, seed, resolution, difficulty) for b, first, count in todo]
  done = 0
  if num_workers > 1:
    try:
      with interruptions.worker_pool(num_workers) as pool:
        futures = [pool.submit(_write_batch, *a) for a in args]
        for future in concurrent.futures.as_completed(futures):
          done += future.result()
          _log.info("%s: %d / %d images drawn.", root, done, num_images)
      args = []
    except concurrent.futures.process.BrokenProcessPool as e:
      # E.g. a __main__ that spawn cannot re-import. Batches depend only on
      # their index and complete ones are skipped, so carrying on is exact.
      _log.warning("Pathfinder worker processes failed (%s); drawing in this process.", e)
      args = [a for a in args if not os.path.exists(os.path.join(root, "metadata", f"{a[1]}.npy"))]
  for a in args:
    done += _write_batch(*a)
    _log.info("%s: %d / %d images drawn.", root, done, num_images)
  # Again: workers of a run killed just before this one started may have been
  # still alive then. (Not every .tmp-: a concurrent run's are in use.)
  _remove_interrupted(root)
  stats = GenerationStats(root, len(todo), skipped, time.perf_counter() - t0)
  _log.info("Generated Pathfinder (seed %d, %d workers): %s", seed, num_workers, stats)
  return stats


def main(argv: list[str] | None = None) -> int:
  """The command line; returns the exit status (2 for a bad flag value)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out_dir", required=True, help="Gets pathfinder{N}/<difficulty dir>/.")
  parser.add_argument("--resolution", type=int, default=32, help=f"One of {RESOLUTIONS}.")
  parser.add_argument("--difficulty", default="hard", help=f"One of {', '.join(DIFFICULTIES)}.")
  parser.add_argument("--num_images", type=int, default=200_000, help="The release's size.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_workers", type=int, default=None, help="Default: all CPUs.")
  parser.add_argument("--images_per_batch", type=int, default=1000)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  try:
    generate(
      paths.local_dir(args.out_dir, what="--out_dir"),
      resolution=args.resolution,
      difficulty=args.difficulty,
      num_images=args.num_images,
      seed=args.seed,
      num_workers=args.num_workers,
      images_per_batch=args.images_per_batch,
    )
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  # Run the importable module's main so spawned workers unpickle one copy of it.
  from efficient_transformers.data import pathfinder_generator

  sys.exit(pathfinder_generator.main())
