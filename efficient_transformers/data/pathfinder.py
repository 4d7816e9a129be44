r"""LRA Pathfinder and Path-X: the original release's PNGs and metadata, read into tokens.

The release (`lra_release.gz`, folder `lra_release/pathfinder{32,64,128,256}`)
lays out each resolution and difficulty as

  <data_dir>/pathfinder<N>/<curv_baseline | curv_contour_length_9 | curv_contour_length_14>/
      imgs/<batch>/<file>.png      grayscale N x N
      metadata/<batch>.npy         TEXT, despite the name: one line per image

with difficulties easy, intermediate and hard in that order. A metadata line is
space-separated: column 0 the image subdirectory (`imgs/0`), column 1 the file
name, column 3 the label 0/1 (the full row has 11 columns: subpath, filename,
image index, label, continuity, contour length, distractor length, paddle
length, paddle thickness, margin, number of contrasts; only the first four are
required here). LRA used pathfinder32 hard for Pathfinder and pathfinder128 hard
for Path-X.

Tokens: pixel value p becomes token p + 1 (0 is padding), row-major, so a
sequence has N * N tokens; vocabulary 257, 2 classes.

Example order and split: metadata files sorted numerically by batch, their
lines in file order. The 80/10/10 train/validation/test split is a seeded
permutation of that order (`config.data.split_seed`): the first 80% of the
permuted examples train, the next 10% validate, the rest test. This is the kind
of split LRA made, not the same membership: LRA built a TFDS (Beam) dataset,
which stores examples in the order of a hash of their keys, and took the
contiguous slices `hard[:80%]`, `[80%:90%]` and `[90%:]` of it, i.e. a fixed
pseudo-random split that cannot be reproduced without TFDS and Beam. A
permutation rather than contiguous batches keeps any drift between the
generator's batches out of the comparison of the splits.

Empty image files are skipped, as LRA's input pipeline did (it filtered
zero-length images); the release has one, pathfinder32/curv_baseline/imgs/0/
sample_172.png. The split is made before they are dropped, so which examples
go where does not depend on file contents. Any other unreadable PNG is an
error naming the image and its metadata line.

Decoding ~200K PNGs takes a while, so it runs in `config.data.num_workers`
processes and, with `config.data.cache`, the decoded pixels of all examples are
saved once next to the data (`decoded_pixels.npy`, uint8, memory-mapped when
read, and `decoded_index.npz`) and reused while the metadata files are
unchanged. Delete those two files after replacing images under unchanged
metadata.
"""

import concurrent.futures
import hashlib
import itertools
import logging
import multiprocessing
import os
import zipfile

import ml_collections
import numpy as np
from PIL import Image

from efficient_transformers.data import base
from efficient_transformers.errors import ConfigError, DataError

_log = logging.getLogger(__name__)

RESOLUTIONS = (32, 64, 128, 256)
# Difficulty -> the release's folder name (contour length 6, 9 and 14).
DIFFICULTIES = {
  "easy": "curv_baseline",
  "intermediate": "curv_contour_length_9",
  "hard": "curv_contour_length_14",
}
PAD_ID = 0
VOCAB_SIZE = 257  # Padding plus the 256 pixel values.
NUM_CLASSES = 2
TRAIN_FRACTION, VALIDATION_FRACTION = 0.8, 0.1  # The test split takes the rest.
RELEASE_URL = "https://storage.googleapis.com/long-range-arena/lra_release.gz"
LRA_REPO_URL = "https://github.com/google-research/long-range-arena"
# Implicit generation (smoke configs) is allowed up to this many images; the
# full 200K-image set is generated only by running the generator's command.
MAX_AUTO_GENERATE = 20_000
# The decoded-image cache, next to the data: uint8 pixels, then an index of
# (present, metadata digest).
CACHE_PIXELS, CACHE_INDEX = "decoded_pixels.npy", "decoded_index.npz"
_CACHE_VERSION = 1  # Part of the cache key: bump when the decoding changes.
# What the generator (pathfinder_generator.py) records in the folders it makes.
_GENERATOR_MANIFEST = ".pathfinder_generator.json"
_CHUNK = 1_000  # Images per worker task.
_MIN_POOL_IMAGES = 8_000  # Below this, starting worker processes costs more than it saves.


def check_params(resolution: int, difficulty: str) -> None:
  """Raises ConfigError unless `resolution` and `difficulty` are LRA's."""
  if resolution not in RESOLUTIONS:
    raise ConfigError(
      f"Pathfinder resolution={resolution!r} is not one of LRA's; valid: "
      f"{', '.join(map(str, RESOLUTIONS))}."
    )
  if difficulty not in DIFFICULTIES:
    raise ConfigError(
      f"Pathfinder difficulty={difficulty!r} is unknown; valid: {', '.join(DIFFICULTIES)}."
    )


def dataset_dir(data_dir: str, resolution: int, difficulty: str) -> str:
  """The release's folder of one resolution and difficulty: `DIR/pathfinder32/curv_baseline`."""
  check_params(resolution, difficulty)
  return os.path.join(data_dir, f"pathfinder{resolution}", DIFFICULTIES[difficulty])


def generator_command(
  data_dir: str,
  *,
  resolution: int,
  difficulty: str,
  num_images: int,
  seed: int = 0,
  num_workers: int = 1,
) -> str:
  """The shell command that generates a set in the release layout under `data_dir`."""
  return (
    f"python -m efficient_transformers.data.pathfinder_generator --out_dir={data_dir} "
    f"--resolution={resolution} --difficulty={difficulty} --num_images={num_images} "
    f"--seed={seed} --num_workers={num_workers}"
  )


def default_num_workers() -> int:
  """Decoding processes when `config.data.num_workers` is 0: the usable CPUs, at most 8."""
  return min(8, len(os.sched_getaffinity(0)))


# ---------------------------------------------------------------- Metadata.


class Metadata:
  """The examples of one dataset folder, in metadata order.

  Attributes:
    directory: the dataset folder.
    files: metadata file paths, sorted numerically by batch.
    image_paths: per example, the PNG's path.
    labels: int32 [num_examples], 0 or 1.
    file_index: int32 [num_examples], the example's entry in `files`.
    line: int32 [num_examples], its 1-based line in that file.
    digest: a hash of the metadata files' names and contents.
  """

  def __init__(self, directory: str):
    self.directory = directory
    meta_dir = os.path.join(directory, "metadata")
    if not os.path.isdir(meta_dir):
      raise DataError(
        f"Pathfinder folder {directory} has no metadata/ subfolder ({meta_dir} is missing); "
        "it should hold metadata/<batch>.npy files as in the LRA release."
      )
    names = sorted((n for n in os.listdir(meta_dir) if n.endswith(".npy")), key=_batch_key)
    if not names:
      raise DataError(f"No metadata files (<batch>.npy) in {meta_dir}.")
    self.files = [os.path.join(meta_dir, n) for n in names]
    digest = hashlib.sha256(f"pathfinder-cache-v{_CACHE_VERSION}".encode())
    paths, labels, file_index, lines = [], [], [], []
    for i, path in enumerate(self.files):
      with open(path, "rb") as f:
        data = f.read()
      digest.update(f"\0{os.path.basename(path)}\0{len(data)}\0".encode() + data)
      for line_no, subdir, name, label in _parse_metadata(path, data):
        paths.append(os.path.join(directory, subdir, name))
        labels.append(label)
        file_index.append(i)
        lines.append(line_no)
    if not paths:
      raise DataError(f"The metadata files in {meta_dir} list no images.")
    self.image_paths = paths
    self.labels = np.asarray(labels, np.int32)
    self.file_index = np.asarray(file_index, np.int32)
    self.line = np.asarray(lines, np.int32)
    self.digest = digest.hexdigest()

  def __len__(self) -> int:
    return len(self.image_paths)

  def where(self, example: int) -> str:
    """'<metadata file>, line <n>': where an example is listed."""
    return f"{self.files[self.file_index[example]]}, line {self.line[example]}"


def _batch_key(name: str) -> tuple:
  stem = name[: -len(".npy")]
  return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def _parse_metadata(path: str, data: bytes):
  """Yields (line number, image subdirectory, file name, label) per non-blank line."""
  if data.startswith(b"\x93NUMPY"):
    raise DataError(
      f"{path} is a binary numpy array; the LRA release's metadata/*.npy files are text lines "
      "(subpath, filename, index, label, ...), which this reader expects."
    )
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path} is not a text metadata file ({e}).") from None
  for line_no, line in enumerate(text.splitlines(), 1):
    columns = line.split()
    if not columns:
      continue
    if len(columns) < 4:
      raise DataError(
        f"{path}, line {line_no}: expected at least 4 space-separated columns (image "
        f"subdirectory, file name, image index, label), got {len(columns)}: {line!r}."
      )
    if columns[3] not in ("0", "1"):
      raise DataError(
        f"{path}, line {line_no}: the label (column 4) must be 0 or 1, got {columns[3]!r}."
      )
    yield line_no, columns[0], columns[1], int(columns[3])


# ---------------------------------------------------------------- Images.


def _decode_chunk(paths: list[str], resolution: int) -> tuple[np.ndarray, np.ndarray, tuple | None]:
  """Decodes PNGs to uint8 [len(paths), resolution**2].

  Returns (pixels, present, error): `present` is False for empty files
  (skipped), and `error` is None or (index into paths, what is wrong) for
  the first bad image, at which decoding stops.
  """
  pixels = np.zeros((len(paths), resolution * resolution), np.uint8)
  present = np.ones(len(paths), bool)
  for i, path in enumerate(paths):
    try:
      with Image.open(path, formats=("PNG",)) as image:  # No other format probing: faster.
        if image.size != (resolution, resolution):
          w, h = image.size
          return pixels, present, (i, f"is {w}x{h} pixels, expected {resolution}x{resolution}")
        if image.mode != "L":
          image = image.convert("L")  # Release images are already grayscale ('L').
        pixels[i] = np.frombuffer(image.tobytes(), np.uint8)
    except FileNotFoundError:
      return pixels, present, (i, "does not exist")
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for a bad file.
      try:
        empty = os.path.getsize(path) == 0
      except OSError:
        empty = False
      if not empty:
        return pixels, present, (i, f"is not a readable PNG image ({type(e).__name__}: {e})")
      present[i] = False
  return pixels, present, None


def _decoded_chunks(paths: list[str], resolution: int, num_workers: int):
  """Yields `_decode_chunk` results for consecutive chunks of `paths`, in order."""
  chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
  done = 0
  if num_workers > 1 and len(paths) >= _MIN_POOL_IMAGES:
    # spawn, not fork: the parent may hold JAX's threads, which fork breaks.
    context = multiprocessing.get_context("spawn")
    try:
      with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        try:
          for result in pool.map(_decode_chunk, chunks, itertools.repeat(resolution)):
            done += 1
            yield result
        finally:
          pool.shutdown(cancel_futures=True)  # E.g. after a bad image: stop the rest.
      return
    except concurrent.futures.process.BrokenProcessPool as e:
      # E.g. a __main__ that spawn cannot re-import (code piped to stdin).
      _log.warning("Pathfinder decoding processes failed (%s); decoding in this process.", e)
  for chunk in chunks[done:]:
    yield _decode_chunk(chunk, resolution)


def decode_images(
  metadata: Metadata, examples: np.ndarray, resolution: int, *, num_workers: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """Decodes the PNGs of `examples` (indices into `metadata`).

  Args:
    metadata: the dataset's examples.
    examples: int [n] indices of the examples to decode.
    resolution: N; every image must be N x N.
    num_workers: decoding processes (1: this process only).

  Returns:
    (pixels uint8 [n, N * N] row-major, present bool [n]: False for empty files).

  Raises:
    DataError naming the image, its metadata file and line, for a missing,
    unreadable or wrongly sized image.
  """
  paths = [metadata.image_paths[i] for i in examples]
  pixels = np.zeros((len(paths), resolution * resolution), np.uint8)
  present = np.zeros(len(paths), bool)
  start = 0
  for chunk_pixels, chunk_present, error in _decoded_chunks(paths, resolution, num_workers):
    if error is not None:
      i, what = error
      example = examples[start + i]
      raise DataError(
        f"Pathfinder image {metadata.image_paths[example]} {what} (listed in "
        f"{metadata.where(example)}). Replace the file or remove its metadata line."
      )
    pixels[start : start + len(chunk_pixels)] = chunk_pixels
    present[start : start + len(chunk_present)] = chunk_present
    start += len(chunk_pixels)
  return pixels, present


def _cache_paths(directory: str) -> tuple[str, str]:
  return os.path.join(directory, CACHE_PIXELS), os.path.join(directory, CACHE_INDEX)


def _read_cache(metadata: Metadata, resolution: int) -> tuple[np.ndarray, np.ndarray] | None:
  """(pixels memory-mapped, present) of all examples if the cache matches the metadata."""
  pixels_path, index_path = _cache_paths(metadata.directory)
  try:
    with np.load(index_path, allow_pickle=False) as index:
      if str(index["digest"]) != metadata.digest:
        _log.info("Pathfinder: %s is stale (the metadata changed); decoding again.", index_path)
        return None
      present = index["present"]
    pixels = np.load(pixels_path, mmap_mode="r", allow_pickle=False)
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    _log.warning("Pathfinder: cannot read the cache in %s (%s); decoding again.", index_path, e)
    return None
  if pixels.shape != (len(metadata), resolution * resolution) or pixels.dtype != np.uint8:
    _log.warning("Pathfinder: %s has shape %s; decoding again.", pixels_path, pixels.shape)
    return None
  _log.info("Pathfinder: read decoded images from %s.", pixels_path)
  return pixels, present


def _write_cache(metadata: Metadata, pixels: np.ndarray, present: np.ndarray) -> None:
  """Saves the decoded images; the index (with the digest) last, so it never outruns them."""
  temps = []
  try:
    for path, save in zip(
      _cache_paths(metadata.directory),
      (
        lambda f: np.save(f, pixels),
        lambda f: np.savez(f, present=present, digest=np.array(metadata.digest)),
      ),
      strict=True,
    ):
      temps.append(f"{path}.tmp-{os.getpid()}")
      with open(temps[-1], "wb") as f:  # A file object: numpy appends no suffix.
        save(f)
      os.replace(temps[-1], path)
  except OSError as e:  # E.g. a read-only copy of the release: carry on without a cache.
    _log.warning(
      "Pathfinder: cannot write the decoded-image cache in %s (%s); set config.data.cache=False "
      "to decode only each split's images.",
      metadata.directory,
      e,
    )
  finally:
    for temp in temps:
      if os.path.exists(temp):
        os.remove(temp)


# ---------------------------------------------------------------- Splits and the task.


def split_indices(num_examples: int, seed: int) -> dict[str, np.ndarray]:
  """The 80/10/10 split of examples 0..num_examples-1 by a seeded permutation.

  Returns:
    'train' / 'validation' / 'test' -> sorted int64 example indices, disjoint,
    of sizes floor(0.8 n), floor(0.1 n) and the rest.
  """
  order = np.random.default_rng(seed).permutation(num_examples)
  n_train = int(num_examples * TRAIN_FRACTION)
  n_val = int(num_examples * VALIDATION_FRACTION)
  parts = np.split(order, [n_train, n_train + n_val])
  return {name: np.sort(part) for name, part in zip(base.SPLITS, parts, strict=True)}


def _missing_message(config: ml_collections.ConfigDict, directory: str, num_workers: int) -> str:
  data_dir, n, difficulty = config.data_dir, int(config.data.resolution), config.data.difficulty
  command = generator_command(
    data_dir,
    resolution=n,
    difficulty=difficulty,
    num_images=config.data.num_images,
    seed=config.data.generator_seed,
    num_workers=num_workers,
  )
  return (
    f"Pathfinder data missing: {directory} does not exist (config.data_dir={data_dir!r}, "
    f"resolution {n}, difficulty {difficulty!r} = folder {DIFFICULTIES[difficulty]}). "
    f"Get the LRA release lra_release.gz ({RELEASE_URL}, linked from {LRA_REPO_URL}), extract "
    f"it, and copy or symlink its folder lra_release/pathfinder{n} to "
    f"{os.path.join(data_dir, f'pathfinder{n}')} (or point --config.data_dir at the extracted "
    f"lra_release folder). Or generate a set in the same layout with: {command}"
  )


def _generate(config: ml_collections.ConfigDict, directory: str, num_workers: int) -> None:
  message = _missing_message(config, directory, num_workers)
  if config.data.num_images > MAX_AUTO_GENERATE:
    raise DataError(
      f"{message}  (Not generated automatically: config.data.num_images="
      f"{config.data.num_images} > {MAX_AUTO_GENERATE}; run the command.)"
    )
  try:
    from efficient_transformers.data import pathfinder_generator  # Only needed to generate.
  except ImportError as e:
    raise DataError(f"{message}  (The generator cannot be imported here: {e}.)") from e
  _log.info("Generating %d Pathfinder images in %s.", config.data.num_images, directory)
  pathfinder_generator.generate(
    config.data_dir,
    resolution=int(config.data.resolution),
    difficulty=config.data.difficulty,
    num_images=config.data.num_images,
    seed=config.data.generator_seed,
    num_workers=num_workers,
  )
  if not os.path.isdir(directory):  # pragma: no cover - a generator bug.
    raise DataError(f"The Pathfinder generator ran but did not create {directory}.")


def load_task(config: ml_collections.ConfigDict, *, generate: bool) -> base.TaskData:
  """Pathfinder (or Path-X) from `config.data_dir` in the LRA release layout.

  Reads the metadata at once (so a malformed line fails early) and each split's
  images on first access.

  Args:
    config: uses config.task, config.data_dir, config.model.max_length and
      config.data.{resolution, difficulty, split_seed, num_workers, cache,
      generate, num_images, generator_seed}.
    generate: whether missing data may be generated; it is, only if
      config.data.generate is also True and config.data.num_images is at most
      MAX_AUTO_GENERATE (smoke sets).

  Returns:
    TaskData whose splits hold {"inputs": int16 [n, N * N] pixel + 1,
    "targets": int32 [n] 0/1}.
  """
  resolution, difficulty = config.data.resolution, config.data.difficulty
  check_params(resolution, difficulty)
  length = resolution * resolution
  if config.model.max_length < length:
    raise ConfigError(
      f"config.model.max_length={config.model.max_length} is shorter than the {length} pixels "
      f"of a {resolution}x{resolution} image; set it to {length}."
    )
  num_workers = config.data.num_workers or default_num_workers()
  directory = dataset_dir(config.data_dir, resolution, difficulty)
  may_generate = generate and config.data.get("generate", False)
  if not os.path.isdir(directory):
    if not may_generate:
      raise DataError(_missing_message(config, directory, num_workers))
    _generate(config, directory, num_workers)
  elif may_generate and os.path.exists(os.path.join(directory, _GENERATOR_MANIFEST)):
    # Ours: the generator finishes an interrupted run (complete batches are kept)
    # and refuses other settings than the ones it recorded.
    _generate(config, directory, num_workers)
  metadata = Metadata(directory)
  splits = split_indices(len(metadata), config.data.split_seed)

  def read(split: str) -> dict[str, np.ndarray]:
    examples = splits[split]
    if config.data.cache:
      everything = _read_cache(metadata, resolution)
      if everything is None:
        everything = decode_images(
          metadata, np.arange(len(metadata)), resolution, num_workers=num_workers
        )
        _write_cache(metadata, *everything)
      pixels, present = (a[examples] for a in everything)
    else:
      pixels, present = decode_images(metadata, examples, resolution, num_workers=num_workers)
    if not present.all():
      skipped = [metadata.image_paths[i] for i in examples[~present]]
      _log.warning(
        "Pathfinder %s: skipped %d empty image file(s), as LRA did: %s",
        split,
        len(skipped),
        ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
      )
    inputs = np.zeros((int(present.sum()), config.model.max_length), np.int16)
    inputs[:, :length] = pixels[present]
    inputs[:, :length] += 1  # Pixel p is token p + 1; 0 stays padding.
    return {"inputs": inputs, "targets": metadata.labels[examples[present]]}

  return base.TaskData(
    name=config.task,
    vocab_size=VOCAB_SIZE,
    num_classes=NUM_CLASSES,
    splits=base.LazySplits(read),
  )
