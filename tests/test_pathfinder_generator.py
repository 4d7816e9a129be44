"""Pathfinder generator: connectivity of the rendered pixels, path rules, files, seeds, CLI.

Connectivity is judged on the image alone (scipy.ndimage.label, threshold > 0,
8-connectivity), not on the generator's own bookkeeping; PNG files are decoded
with Pillow, not with the generator's encoder.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage as ndi
from PIL import Image

from efficient_transformers import interruptions
from efficient_transformers.data import pathfinder_generator as pg
from efficient_transformers.errors import ConfigError, DataError

EIGHT = np.ones((3, 3), bool)


def components(image: np.ndarray) -> np.ndarray:
  labels, _ = ndi.label(image > 0, structure=EIGHT)
  return labels


def marker_components(image: np.ndarray, centers: np.ndarray) -> tuple[int, int]:
  labels = components(image)
  a, b = (int(labels[r, c]) for r, c in centers)
  assert a > 0 and b > 0, "a marker center is not drawn"
  return a, b


def geodesic_steps(image: np.ndarray, source, target) -> int:
  """8-connected steps from source to target inside the drawn pixels."""
  drawn = image > 0
  reached = np.zeros_like(drawn)
  reached[tuple(source)] = True
  for steps in range(drawn.size):
    if reached[tuple(target)]:
      return steps
    grown = ndi.binary_dilation(reached, structure=EIGHT) & drawn
    assert (grown != reached).any(), "target not reachable"
    reached = grown
  raise AssertionError("unreachable")


def dead_pid() -> int:
  """The pid of a process of this host that has ended and been reaped."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def read_tree(root: str) -> dict[str, bytes]:
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


@pytest.mark.parametrize(
  "resolution,difficulty,count",
  [(32, "easy", 40), (32, "intermediate", 24), (32, "hard", 40), (64, "hard", 6), (128, "hard", 4)],
)
def test_markers_connected_exactly_in_positives(resolution, difficulty, count):
  for i in range(count):
    label = i % 2
    image, centers = pg.draw_image(pg.image_rng(7, i), resolution, difficulty, label)
    assert image.shape == (resolution, resolution) and image.dtype == np.uint8
    assert set(np.unique(image).tolist()) == {0, 255}
    a, b = marker_components(image, centers)
    assert (a == b) == bool(label), f"image {i}: label {label}, components {a} and {b}"
    # The second main path and the distractors are separate components.
    assert components(image).max() >= 3


@pytest.mark.parametrize("difficulty", ["easy", "intermediate", "hard"])
def test_paths_follow_the_difficulty_rules(difficulty):
  length, d_length = pg.contour_length(difficulty), pg.distractor_length(difficulty)
  assert length == {"easy": 6, "intermediate": 9, "hard": 14}[difficulty]
  g = pg.GEOMETRY[32]
  for i in range(10):
    scene = pg.draw_scene(pg.image_rng(3, i), 32, difficulty, i % 2)
    assert [len(p) - 1 for p in scene.paths[:2]] == [length, length]
    assert len(scene.paths) > 2 and all(len(p) - 1 == d_length for p in scene.paths[2:])
    for path in scene.paths:
      steps = np.diff(path, axis=0)
      np.testing.assert_allclose(np.hypot(*steps.T), g.paddle_length, rtol=1e-9)
      angles = np.arctan2(steps[:, 0], steps[:, 1])
      turns = (np.diff(angles) + math.pi) % (2 * math.pi) - math.pi
      assert np.abs(turns).max() <= math.radians(pg.CONTINUITY_DEGREES) + 1e-9
      assert (path > -0.5).all() and (path < 31.5).all()
    ends = [scene.paths[0][0], scene.paths[0][-1]] if i % 2 else [p[0] for p in scene.paths[:2]]
    np.testing.assert_array_equal(scene.marker_centers, np.rint(ends))


@pytest.mark.parametrize("difficulty", ["easy", "intermediate", "hard"])
def test_pixel_path_length_matches_contour_length(difficulty):
  # From the pixels alone: the 8-connected route between the markers of a
  # positive is about as long as the contour (arc / sqrt 2 <= steps <= arc).
  arc = pg.contour_length(difficulty) * pg.GEOMETRY[32].paddle_length
  for i in range(1, 17, 2):
    image, centers = pg.draw_image(pg.image_rng(11, i), 32, difficulty, 1)
    steps = geodesic_steps(image, centers[0], centers[1])
    assert arc / math.sqrt(2) - 2 <= steps <= arc + 2, (i, steps, arc)


def test_same_seed_same_image_other_seed_other_image():
  a = [pg.draw_image(pg.image_rng(0, i), 32, "hard", i % 2) for i in range(6)]
  b = [pg.draw_image(pg.image_rng(0, i), 32, "hard", i % 2) for i in range(6)]
  c = [pg.draw_image(pg.image_rng(1, i), 32, "hard", i % 2) for i in range(6)]
  for (ia, ma), (ib, mb), (ic, _) in zip(a, b, c, strict=True):
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(ma, mb)
    assert (ia != ic).any()


def test_png_bytes_decode_with_pillow(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, (5, 7), dtype=np.uint8)
  path = tmp_path / "x.png"
  path.write_bytes(pg.png_bytes(image))
  with Image.open(path) as im:
    assert im.mode == "L" and im.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(im), image)


def read_metadata(root: str) -> list[list[str]]:
  rows = []
  for name in sorted(os.listdir(os.path.join(root, "metadata")), key=lambda n: int(n[:-4])):
    assert name.endswith(".npy")
    with open(os.path.join(root, "metadata", name), encoding="ascii") as f:
      rows += [line.split(" ") for line in f.read().splitlines()]
  return rows


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("pf") / "one_worker")
  stats = pg.generate(
    out, resolution=32, difficulty="hard", num_images=25, seed=5, num_workers=1,
    images_per_batch=10,
  )  # fmt: skip
  return out, stats


def test_files_in_release_layout(generated):
  out, stats = generated
  root = os.path.join(out, "pathfinder32", "curv_contour_length_14")
  assert stats.root == root and stats.num_batches_written == 3 and stats.num_batches_skipped == 0
  assert sorted(os.listdir(os.path.join(root, "imgs"))) == ["0", "1", "2"]
  rows = read_metadata(root)
  assert len(rows) == 25 and all(len(row) == 11 for row in rows)
  labels = [int(row[3]) for row in rows]
  assert abs(sum(labels) - 25 / 2) <= 0.5  # 12 positives, 13 negatives.
  for i, row in enumerate(rows):
    batch, k = divmod(i, 10)
    assert row[0] == f"imgs/{batch}" and row[1] == f"sample_{k}.png" and row[2] == str(k)
    assert int(row[3]) == i % 2
    assert row[4:] == ["30", "14", "4", "2", "1", "1", "1"]  # Continuity ... contrasts.
    with Image.open(os.path.join(root, row[0], row[1])) as im:
      assert im.mode == "L" and im.size == (32, 32)
      image = np.asarray(im)
    expected, centers = pg.draw_image(pg.image_rng(5, i), 32, "hard", i % 2)
    np.testing.assert_array_equal(image, expected)
    a, b = marker_components(image, centers)
    assert (a == b) == (row[3] == "1")


def test_two_workers_write_identical_files_other_seed_differs(generated, tmp_path):
  out, _ = generated
  args = dict(resolution=32, difficulty="hard", num_images=25, images_per_batch=10)
  pg.generate(str(tmp_path / "two"), seed=5, num_workers=2, **args)
  pg.generate(str(tmp_path / "other"), seed=6, num_workers=1, **args)
  one, two, other = (read_tree(d) for d in (out, str(tmp_path / "two"), str(tmp_path / "other")))
  assert len(one) == 25 + 3 + 1  # Images, metadata, the settings record.
  assert one == two
  images = [k for k in one if k.endswith(".png")]
  assert sum(one[k] != other[k] for k in images) >= 20


def test_interrupted_run_resumes(generated, tmp_path):
  out, _ = generated
  args = dict(resolution=32, difficulty="hard", num_images=25, seed=5, images_per_batch=10)
  target = str(tmp_path / "resumed")
  pg.generate(target, num_workers=1, **args)
  root = os.path.join(target, "pathfinder32", "curv_contour_length_14")
  # As if killed while writing batch 1: no metadata, a partial batch and the
  # temporary files of dead processes (in the new and the old form).
  os.remove(os.path.join(root, "metadata", "1.npy"))
  os.remove(os.path.join(root, "imgs", "1", "sample_3.png"))
  dead, host = dead_pid(), interruptions._HOST
  os.makedirs(os.path.join(root, "imgs", f".1.tmp-{host}-{dead}"))
  os.makedirs(os.path.join(root, "imgs", f".2.tmp-{dead}"))
  open(os.path.join(root, "metadata", f".1.tmp-{host}-{dead}"), "w").close()
  open(os.path.join(root, f".pathfinder_generator.json.tmp-{host}-{dead}"), "w").close()
  # Those of a live process (or of another host) may be in use: they stay.
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  in_use = [f".4.tmp-{host}-{live.pid}", f".4.tmp-otherhost-{dead}"]
  for name in in_use:
    os.makedirs(os.path.join(root, "imgs", name))
  try:
    stats = pg.generate(target, num_workers=1, **args)
  finally:
    live.kill()
    live.wait()
  assert (stats.num_batches_written, stats.num_batches_skipped) == (1, 2)
  for name in in_use:
    os.rmdir(os.path.join(root, "imgs", name))  # Fails if it was removed.
  assert read_tree(target) == read_tree(out)
  with pytest.raises(DataError, match=r"seed 5 there, 6 now.*another --out_dir"):
    pg.generate(target, num_workers=1, **{**args, "seed": 6})


@pytest.mark.parametrize("resolution", [64, 128])
def test_other_resolutions_have_their_size(resolution, tmp_path):
  pg.generate(str(tmp_path), resolution=resolution, difficulty="easy", num_images=2, num_workers=1)
  root = os.path.join(str(tmp_path), f"pathfinder{resolution}", "curv_baseline")
  rows = read_metadata(root)
  assert [row[3] for row in rows] == ["0", "1"]
  for row in rows:
    with Image.open(os.path.join(root, row[0], row[1])) as im:
      assert im.mode == "L" and im.size == (resolution, resolution)
  g = pg.GEOMETRY[resolution]
  assert rows[0][4:] == ["30", "6", "2", str(g.paddle_length), str(g.paddle_thickness)] + [
    str(g.margin),
    "1",
  ]


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(resolution=48), "valid resolutions: 32, 64, 128, 256"),
    (dict(difficulty="medium"), "valid difficulties: easy, intermediate, hard"),
    (dict(num_images=-1), "num_images must be an integer >= 0"),
    (dict(images_per_batch=0), "images_per_batch must be an integer >= 1"),
  ],
)
def test_bad_settings_raise_config_error(kwargs, message, tmp_path):
  args = {**dict(resolution=32, difficulty="hard", num_images=2, num_workers=1), **kwargs}
  with pytest.raises(ConfigError, match=message):
    pg.generate(str(tmp_path), **args)
  with pytest.raises(ConfigError, match="valid"):
    pg.draw_image(np.random.default_rng(0), 33, "hard", 0)


@pytest.mark.parametrize(
  "flag,message",
  [
    ("--resolution=48", "valid resolutions: 32, 64, 128, 256"),
    ("--difficulty=medium", "valid difficulties: easy, intermediate, hard"),
  ],
)
def test_cli_bad_value_is_one_error_line(flag, message, tmp_path, capsys):
  assert pg.main([f"--out_dir={tmp_path}", flag]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1
  assert not os.listdir(tmp_path)


def test_cli_as_a_module(tmp_path):
  base = [sys.executable, "-m", "efficient_transformers.data.pathfinder_generator"]
  ok = subprocess.run(
    base + [f"--out_dir={tmp_path}", "--num_images=4", "--num_workers=1", "--difficulty=easy"],
    capture_output=True, text=True, check=False,
  )  # fmt: skip
  assert ok.returncode == 0, ok.stderr
  assert len(os.listdir(tmp_path / "pathfinder32" / "curv_baseline" / "imgs" / "0")) == 4
  bad = subprocess.run(
    base + [f"--out_dir={tmp_path}", "--resolution=48"], capture_output=True, text=True, check=False
  )
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
    "error: Unknown Pathfinder resolution 48; valid resolutions: 32, 64, 128, 256."
  ]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "flag, lands_in",
  [
    ("--out_dir=rel/dir/", "rel/dir"),  # Relative to the working directory, trailing slash.
    ("--out_dir={tmp}/abs", "abs"),
    ("--out_dir=~/link/", "real"),  # ~ and a symlink to a directory.
  ],
)
def test_cli_out_dir_as_users_write_it(flag, lands_in, tmp_path):
  (tmp_path / "real").mkdir()
  (tmp_path / "link").symlink_to(tmp_path / "real")
  done = subprocess.run(
    [sys.executable, "-m", "efficient_transformers.data.pathfinder_generator",
     flag.format(tmp=tmp_path), "--num_images=2", "--num_workers=1", "--difficulty=easy"],
    cwd=tmp_path, env=dict(os.environ, HOME=str(tmp_path), PYTHONPATH=REPO),
    capture_output=True, text=True, check=False,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr
  imgs = tmp_path / lands_in / "pathfinder32" / "curv_baseline" / "imgs" / "0"
  assert sorted(os.listdir(imgs)) == ["sample_0.png", "sample_1.png"]


@pytest.mark.parametrize(
  "out_dir, message",
  [
    ("{tmp}/a_file", "error: --out_dir={tmp}/a_file is a file, not a directory"),
    (
      "{tmp}/a_file/sub/",
      "error: {tmp}/a_file/sub/pathfinder32/curv_baseline/imgs is inside a file",
    ),
    ("gs://bucket/pf", "error: --out_dir='gs://bucket/pf': this path must be on a local"),
  ],
)
def test_cli_bad_out_dir_is_one_error_line(out_dir, message, tmp_path, capsys):
  (tmp_path / "a_file").write_text("")
  out_dir, message = out_dir.format(tmp=tmp_path), message.format(tmp=tmp_path)
  assert pg.main([f"--out_dir={out_dir}", "--num_images=2", "--difficulty=easy"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(message) and err.count("\n") == 1, err
  with pytest.raises(DataError, match="is a file, not a directory"):
    pg.generate(str(tmp_path / "a_file"), resolution=32, difficulty="easy", num_images=2)
