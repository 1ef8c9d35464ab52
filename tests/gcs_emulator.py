"""Starts gcp-storage-emulator on 127.0.0.1 for tests, with the fixes the tests need.

  python tests/gcs_emulator.py PORT BUCKET [--preconditions]

gcp-storage-emulator answers object downloads without the `x-goog-generation` header that real
GCS sends. tensorstore's OCDBT driver (orbax's default checkpoint format) re-reads its manifest
when it commits several batches of arrays and parses the generation from that header; without
it, a save of a real train state fails with "Malformed StorageGeneration". This launcher adds
the header (the object's own generation) and starts the emulator in memory.

The emulator also ignores generation preconditions: every upload overwrites and every delete
deletes. With `--preconditions` it honours `ifGenerationMatch` on object uploads (media,
multipart, resumable) and deletes as GCS does: 0 = only if no live object of that name exists,
g > 0 = only if the live object's generation is g; otherwise 412 Precondition Failed and nothing
changes. The workdir lock (basic/workdir_lock.py) relies on exactly this on gs://.
`serve(...)` runs it in a subprocess for in-process tests.
"""
import contextlib
import os
import socket
import subprocess
import sys
import time

_TESTS = os.path.dirname(os.path.abspath(__file__))


def _precondition_failed(request, storage) -> bool:
  """Whether the request's `ifGenerationMatch` (if any) does not hold for its object."""
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  want = request.query.get('ifGenerationMatch')
  if not want:
    return False
  want = want[0]
  name = request.params.get('object_id')
  if name is None:   # An upload: the name is a query parameter or in the JSON metadata part.
    name = (request.query.get('name') or [None])[0]
    if name is None:
      kind = (request.query.get('uploadType') or [''])[0]
      data = request.data or {}
      name = data.get('meta', {}).get('name') if kind == 'multipart' else data.get('name')
  try:
    live = str(storage.get_file_obj(request.params['bucket_name'], name)['generation'])
  except NotFound:
    live = None
  return (live is not None) if want == '0' else (live != want)


def _with_preconditions(handler):
  def checked(request, response, storage, *args, **kwargs):
    if _precondition_failed(request, storage):
      from http import HTTPStatus  # pylint: disable=g-import-not-at-top
      response.status = HTTPStatus.PRECONDITION_FAILED
      response.json({'error': {'code': 412, 'message': 'At least one of the pre-conditions you '
                               'specified did not hold.', 'errors': [{
                                   'reason': 'conditionNotMet'}]}})
      return None
    return handler(request, response, storage, *args, **kwargs)
  return checked


def _replace(module, name, new):
  """Points module.name and every route of the emulator's HANDLERS at `new`."""
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  old = getattr(module, name)
  setattr(module, name, new)
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is old:
        handlers[method] = new


def main(port: int, bucket: str, preconditions: bool = False):
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    except Exception:  # pylint: disable=broad-except  (not found: the status says so already)
      return
    response['x-goog-generation'] = str(obj['generation'])
    response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))

  _replace(objects, 'download', download_with_generation)
  if preconditions:
    _replace(objects, 'insert', _with_preconditions(objects.insert))
    _replace(objects, 'delete', _with_preconditions(objects.delete))
  emulator = server.create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket)
  emulator.run()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def serve(bucket: str, *, preconditions: bool = False, timeout: float = 30):
  """Runs the emulator in a subprocess; yields its URL ('http://127.0.0.1:PORT')."""
  port = free_port()
  proc = subprocess.Popen(
      [sys.executable, os.path.join(_TESTS, 'gcs_emulator.py'), str(port), bucket] +
      (['--preconditions'] if preconditions else []),
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + timeout
    while True:
      try:
        socket.create_connection(('127.0.0.1', port), timeout=0.5).close()
        break
      except OSError:
        if time.time() > deadline or proc.poll() is not None:
          raise RuntimeError('the GCS emulator did not start')
        time.sleep(0.1)
    yield f'http://127.0.0.1:{port}'
  finally:
    proc.terminate()
    proc.wait(timeout=10)


if __name__ == '__main__':
  main(int(sys.argv[1]), sys.argv[2], '--preconditions' in sys.argv[3:])
