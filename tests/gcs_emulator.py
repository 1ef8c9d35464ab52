"""Starts gcp-storage-emulator on 127.0.0.1 for tests, with the one fix tensorstore needs.

  python tests/gcs_emulator.py PORT BUCKET

gcp-storage-emulator answers object downloads without the `x-goog-generation` header that real
GCS sends. tensorstore's OCDBT driver (orbax's default checkpoint format) re-reads its manifest
when it commits several batches of arrays and parses the generation from that header; without
it, a save of a real train state fails with "Malformed StorageGeneration". This launcher adds
the header (the object's own generation) and starts the emulator in memory.
"""
import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
  except Exception:  # pylint: disable=broad-except  (not found: the status says so already)
    return
  response['x-goog-generation'] = str(obj['generation'])
  response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))


def main(port: int, bucket: str):
  objects.download = _download_with_generation
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is _download:
        handlers[method] = _download_with_generation
  emulator = server.create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket)
  emulator.run()


if __name__ == '__main__':
  main(int(sys.argv[1]), sys.argv[2])
