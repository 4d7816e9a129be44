"""A Google Cloud Storage API server on localhost, for gs:// workdirs in tests.

`gcp-storage-emulator` serves the JSON API that gcsfs (behind etils.epath) and
TensorStore (behind Orbax) speak; the variables below point both at it, so a
test takes the same code path as a pod writing to a bucket.

Two things real GCS does and the emulator (2026.7) does not, without which
TensorStore's OCDBT checkpoints fail against it ("Malformed StorageGeneration"):
media downloads carry the object's generation in an `x-goog-generation`
header, and writes and deletes honour `ifGenerationMatch` preconditions (412
otherwise). Run as `python -m tests.gcs_emulator`, this module adds both to
the emulator's handlers before serving; nothing else of the emulator changes.
"""

import os
import socket
import subprocess
import sys
import time

BUCKET = "et-test-bucket"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """Starts the server (in memory, one bucket); `env` points clients at it."""

  def __init__(self, log_path):
    self.port = _free_port()
    url = f"http://localhost:{self.port}"
    self.env = {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage.
      "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore's gcs driver.
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # TensorStore: no credential lookup.
    }
    # To a file: a pipe nobody reads would fill up and stall the server.
    self._log = open(log_path, "w")  # noqa: SIM115
    self._proc = subprocess.Popen(
      [sys.executable, "-m", "tests.gcs_emulator", str(self.port)],
      cwd=REPO,
      stdout=self._log,
      stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
      try:
        socket.create_connection(("localhost", self.port), timeout=1).close()
        return
      except OSError:
        assert self._proc.poll() is None, open(log_path).read()[-2000:]
        time.sleep(0.1)
    raise RuntimeError(f"The GCS emulator did not start; see {log_path}.")

  def apply(self) -> dict:
    """Sets the variables in this process too; returns the previous values."""
    previous = {k: os.environ.get(k) for k in self.env}
    os.environ.update(self.env)
    return previous

  def stop(self):
    self._proc.terminate()
    try:
      self._proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self._proc.kill()
    self._log.close()


def _precondition_failed(request, response, storage) -> bool:
  """Answers 412 if the request's ifGenerationMatch does not hold, as GCS does."""
  from http import HTTPStatus

  wanted = request.query.get("ifGenerationMatch")
  if not wanted:
    return False
  try:
    current = storage.get_file_obj(request.params["bucket_name"], _object_name(request))
    generation = current["generation"]
  except Exception:  # noqa: BLE001 - the emulator's NotFound.
    generation = "0"
  if str(wanted[0]) == str(generation):
    return False
  response.status = HTTPStatus.PRECONDITION_FAILED
  response.json({"error": {"code": 412, "message": "conditionNotMet"}})
  return True


def _object_name(request) -> str:
  if "object_id" in request.params:
    return request.params["object_id"]
  return request.query.get("name", [""])[0]


def _serve(port: int) -> None:
  from gcp_storage_emulator.handlers import objects

  download, insert, delete = objects.download, objects.insert, objects.delete

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001 - not found: the handler answered 404.
      return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

  def insert_with_preconditions(request, response, storage, *args, **kwargs):
    if not _precondition_failed(request, response, storage):
      return insert(request, response, storage, *args, **kwargs)

  def delete_with_preconditions(request, response, storage, *args, **kwargs):
    if not _precondition_failed(request, response, storage):
      return delete(request, response, storage, *args, **kwargs)

  # Before the server module builds its routing table from these names.
  objects.download = download_with_generation
  objects.insert = insert_with_preconditions
  objects.delete = delete_with_preconditions
  from gcp_storage_emulator.__main__ import main

  main(["start", "--host=localhost", f"--port={port}", "--in-memory", f"--default-bucket={BUCKET}"])


if __name__ == "__main__":
  _serve(int(sys.argv[1]))
