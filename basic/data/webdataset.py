"""Data source 'webdataset': tar shards as img2dataset (and webdataset) write them.

  --config.data.source=webdataset --config.data.webdataset_pattern='shards/{00000..00999}.tar'

config.data fields (DEFAULTS):
  webdataset_pattern: the shards: globs and brace lists (`shard-{000000..000099}.tar`,
    `{a,b}.tar`), several separated by commas outside braces, local or gs:// (tf.io.gfile).
  webdataset_image_ext: ';'-separated member extensions of the image, the first present in a
    sample wins (default 'jpg;png;webp'); decoded by TensorFlow (JPEG, PNG, WebP, GIF, BMP).
  webdataset_text_ext: ';'-separated member extensions of the caption (default 'txt').
  webdataset_json_caption: a key of the sample's `.json` member holding the caption, used when
    no caption member is present ('' = none; with webdataset_text_ext='' the caption always comes
    from the json).
  resampled: draw shards with replacement (see below) instead of reading epochs.
  seed, shuffle_buffer, cycle_length, cache: as for the TFRecord source (basic/data/sources.py).

Samples. A tar member `dir/000123.seg.png` has the key `dir/000123` and the extension `seg.png`
(everything after the first dot of the base name, lower-cased), as in webdataset; consecutive
members with the same key form one sample. Each sample becomes a tf.train.Example in
img2dataset's TFRecord schema ('jpg': the image bytes, 'txt': the caption, 'key'), so everything
downstream (decoding, augmentation, dropping bad samples, drop counts, resume) is the record
sources' code. A sample with no image member, an image that does not decode, or no non-empty
caption is dropped and counted in `data/dropped`; members of other extensions are ignored; a
member with no extension is skipped. Tar members are read by a small Python reader (ustar, pax
and GNU long names) feeding tf.data through `Dataset.from_generator`, a chunk of samples at a
time; a shard that is truncated or has a corrupt header ends there (logged), its samples before
that point read.

Per-host sharding (as TFRecord files): shards are dealt to hosts round-robin when there are at
least as many as hosts (shard p, p + P, ... for host p of P); otherwise every host reads every
shard in the same order and keeps every P-th sample. Epochs: each epoch reads this host's shards
in an order permuted by (seed, epoch), `cycle_length` at a time (one sample from each in turn),
then shuffles samples in a buffer seeded by (seed, epoch, host).

Resampled (`resampled=True`, OpenCLIP's --dataset-resampled): no epochs and no host sharding.
Host p's stream is blocks b = 0, 1, ...; block b is `cycle_length` shards drawn uniformly with
replacement from all shards by (seed, host, b), interleaved and shuffled as an epoch is. The
stream is a pure function of (seed, host), so it is reproducible and resumable.

Position. A host's position counts the samples of its stream (bad ones included). Resuming at
position n reads the samples before it without decoding them; the samples per epoch (or per
block) are first counted from the tar headers (the reader seeks past member data).

Configuration errors fail before training (`check`), naming the config.data field: a pattern
part that matches nothing or a listed shard that does not exist; no member of the image
extensions, or no caption, in the first samples of the shards.

Speed (BENCHMARKS.md, "Webdataset input"): the reader makes ~10,000 records/s on a busy core, a
few percent of the cost of decoding at 224 px, so the pipeline runs at the TFRecord path's rate.
"""
import dataclasses
import json
import os
import re
from typing import BinaryIO, Iterator, Optional

from absl import logging
import numpy as np

from basic.data import sources
from basic.data import tf_setup

DEFAULTS = {
    'webdataset_pattern': '',
    'webdataset_image_ext': 'jpg;png;webp',
    'webdataset_text_ext': 'txt',
    'webdataset_json_caption': '',
    'resampled': False,
    **sources.RECORD_DEFAULTS,
}
IMAGE_KEY, TEXT_KEY = 'jpg', 'txt'   # Features of the records made from samples.
_CHUNK = 64           # Samples per element of a shard's generator (tf.data overhead per element).
_CHECK_SAMPLES = 32   # Samples read before training to check the extensions.
_READ_BUFFER = 1 << 20
# Stream id of the resampled shard draws (sources.py's file order and shuffle streams are
# shared; it uses 1 to 4, the pipeline 5).
_RESAMPLE = 6
_BLOCK = 512
_REGULAR = (b'0', b'\0', b'7')


class TarError(ValueError):
  """A tar shard that cannot be read further (truncated, corrupt header)."""


def extensions(text: str) -> tuple[str, ...]:
  """'jpg;.PNG; webp' -> ('jpg', 'png', 'webp')."""
  return tuple(e.strip().lstrip('.').lower() for e in text.split(';') if e.strip())


# --- Shard lists. ---------------------------------------------------------------------------------


def _split_top(pattern: str) -> list[str]:
  """Splits at commas outside braces."""
  parts, depth, start = [], 0, 0
  for i, c in enumerate(pattern):
    depth += (c == '{') - (c == '}')
    if c == ',' and depth == 0:
      parts.append(pattern[start:i])
      start = i + 1
  parts.append(pattern[start:])
  return [p.strip() for p in parts if p.strip()]


def expand_braces(pattern: str) -> list[str]:
  """'a{0..2}b{x,y}' -> a0bx a0by a1bx ...; numeric ranges keep zero padding ('{008..010}')."""
  match = re.search(r'\{([^{}]*)\}', pattern)
  if not match:
    return [pattern]
  head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
  numbers = re.fullmatch(r'(\d+)\.\.(\d+)', body)
  if numbers:
    a, b = numbers.groups()
    width = max(len(a), len(b)) if a.startswith('0') or b.startswith('0') else 0
    step = 1 if int(b) >= int(a) else -1
    options = [f'{i:0{width}d}' for i in range(int(a), int(b) + step, step)]
  else:
    options = body.split(',')
  return [p for option in options for p in expand_braces(head + option + tail)]


def shard_files(pattern: str) -> list[str]:
  """The sorted shards of config.data.webdataset_pattern (globs, brace lists, commas).

  Raises:
    ValueError naming config.data.webdataset_pattern if it is empty, a glob matches nothing or
    a listed shard does not exist.
  """
  tf = tf_setup.configure_tensorflow()
  field = f'config.data.webdataset_pattern={pattern!r}'
  parts = _split_top(pattern)
  if not parts:
    raise ValueError(f'{field}: empty; set it to the tar shards: a glob or a brace list '
                     "('shards/{00000..00099}.tar'), local or gs://.")
  files, literal = set(), []
  for part in parts:
    for name in expand_braces(part):
      if not re.search(r'[*?\[]', name):
        literal.append(name)
        continue
      try:
        matched = [f for f in tf.io.gfile.glob(name) if not tf.io.gfile.isdir(f)]
      except tf.errors.OpError as e:
        raise ValueError(f'{field}: cannot list {name!r}: {e.message}') from e
      if not matched:
        raise ValueError(f'{field}: {name!r} matches no files.')
      files.update(matched)
  by_dir = {}
  for name in literal:
    by_dir.setdefault(os.path.dirname(name), []).append(name)
  for directory, names in by_dir.items():   # One listing per folder, not one request per shard.
    try:
      present = set(tf.io.gfile.listdir(directory or '.'))
    except tf.errors.OpError:
      present = set()
    missing = [n for n in names if os.path.basename(n) not in present]
    if missing:
      raise ValueError(f'{field}: {len(missing)} of the {len(names)} listed shards in '
                       f'{directory or "."!r} do not exist, e.g. {missing[0]!r}.')
    files.update(names)
  return sorted(files)


# --- Tar members and samples. ---------------------------------------------------------------------


def _number(field: bytes) -> int:
  """A tar header's octal (or GNU base-256) number field."""
  if field[:1] and field[0] & 0x80:
    return int.from_bytes(field[1:], 'big')
  text = field.split(b'\0', 1)[0].strip()
  try:
    return int(text, 8) if text else 0
  except ValueError as e:
    raise TarError(f'bad number field {field!r}') from e


def _pax(data: bytes) -> dict[str, str]:
  """The 'length key=value\\n' records of a pax extended header."""
  out, i = {}, 0
  while i < len(data):
    space = data.index(b' ', i)
    length = int(data[i:space])
    key, _, value = data[space + 1:i + length - 1].partition(b'=')
    out[key.decode('utf-8', 'replace')] = value.decode('utf-8', 'replace')
    i += length
  return out


def _read_exact(f: BinaryIO, n: int) -> bytes:
  data = f.read(n)
  return data if len(data) == n or not data else data + _read_rest(f, n - len(data))


def _read_rest(f: BinaryIO, n: int) -> bytes:
  parts = []
  while n > 0:
    chunk = f.read(n)
    if not chunk:
      break
    parts.append(chunk)
    n -= len(chunk)
  return b''.join(parts)


def _signed_checksum(header: bytes) -> int:
  return sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 8 * 32


def tar_members(f: BinaryIO, file_size: Optional[int] = None) -> Iterator[tuple[str, bytes]]:
  """(name, data) of the regular-file members of a tar stream, in order.

  Args:
    f: the tar file, at its start.
    file_size: None: read the data of every member; else the file's size in bytes: seek past
      member data (yielding b'' for it) and check against it that the data is complete, so that
      counting samples this way agrees with reading them.

  Raises:
    TarError at a truncated member or header, or a header whose checksum is wrong (the members
    before it have been yielded).
  """
  offset, name_override, pax = 0, None, {}
  while True:
    header = _read_exact(f, _BLOCK)
    if not header or header == bytes(_BLOCK):   # End of the archive.
      return
    if len(header) < _BLOCK:
      raise TarError(f'truncated header at byte {offset}')
    if _number(header[148:156]) != sum(header[:148]) + 8 * 32 + sum(header[156:]):
      if _number(header[148:156]) != _signed_checksum(header):   # Some old tar programs.
        raise TarError(f'bad header checksum at byte {offset}')
    kind = header[156:157]
    size = int(pax['size']) if 'size' in pax and kind in _REGULAR else _number(header[124:136])
    padded = -(-size // _BLOCK) * _BLOCK
    wanted = kind in (b'L', b'x') or (kind in _REGULAR and file_size is None)
    if wanted:
      data = _read_exact(f, size)
      if len(data) < size:
        raise TarError(f'truncated member at byte {offset}')
      _read_exact(f, padded - size)   # Padding (may be cut at the end of the file).
    else:
      data = b''
      if file_size is not None and offset + _BLOCK + size > file_size:
        raise TarError(f'truncated member at byte {offset}')
      f.seek(offset + _BLOCK + padded)
    offset += _BLOCK + padded
    if kind == b'L':     # GNU long name of the next member.
      name_override = data.split(b'\0', 1)[0].decode('utf-8', 'replace')
      continue
    if kind == b'x':     # pax extended header of the next member.
      pax = _pax(data)
      continue
    if kind in _REGULAR:
      name = header[:100].split(b'\0', 1)[0].decode('utf-8', 'replace')
      prefix = header[345:500].split(b'\0', 1)[0].decode('utf-8', 'replace')
      if header[257:263] == b'ustar\0' and prefix:
        name = f'{prefix}/{name}'
      yield name_override or pax.get('path') or name, data
    name_override, pax = None, {}   # Also after directories, links, global pax headers, ...


def split_name(name: str) -> tuple[str, str]:
  """'dir/000123.seg.png' -> ('dir/000123', 'seg.png'); ('', '') for a name without extension."""
  directory, _, base = name.rpartition('/')
  stem, dot, ext = base.partition('.')
  if not dot or not stem:
    return '', ''
  return (f'{directory}/{stem}' if directory else stem), ext.lower()


def tar_samples(f: BinaryIO, file_size: Optional[int] = None,
                on_error=None) -> Iterator[tuple[str, dict[str, bytes]]]:
  """(key, {extension: data}) of consecutive members sharing a key (the first of a repeated
  extension kept). A TarError ends the samples (the last, incomplete one included) and is passed
  to on_error (default: raised)."""
  key, members = None, {}
  try:
    for name, data in tar_members(f, file_size):
      k, ext = split_name(name)
      if not ext:
        continue
      if k != key:
        if key is not None:
          yield key, members
        key, members = k, {}
      members.setdefault(ext, data)
  except TarError as e:
    if on_error is None:
      raise
    on_error(e)
  if key is not None:
    yield key, members


@dataclasses.dataclass(frozen=True)
class Format:
  """Which members of a sample are its image and caption (config.data.webdataset_*)."""
  image_ext: tuple[str, ...]
  text_ext: tuple[str, ...]
  json_caption: str

  @classmethod
  def from_config(cls, data_config) -> 'Format':
    return cls(extensions(data_config.webdataset_image_ext),
               extensions(data_config.webdataset_text_ext), data_config.webdataset_json_caption)

  def image(self, members: dict[str, bytes]) -> Optional[bytes]:
    return next((members[e] for e in self.image_ext if e in members), None)

  def caption(self, members: dict[str, bytes]) -> Optional[bytes]:
    text = next((members[e] for e in self.text_ext if e in members), None)
    if text is None and self.json_caption and 'json' in members:
      try:
        value = json.loads(members['json']).get(self.json_caption)
      except (ValueError, AttributeError):   # Not JSON, or not an object.
        value = None
      if isinstance(value, str):
        text = value.encode('utf-8')
    return text


def _varint(n: int) -> bytes:
  out = bytearray()
  while n > 0x7f:
    out.append(n & 0x7f | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _feature_parts(key: bytes, value: bytes) -> list[bytes]:
  """The wire format of one features map entry {key: Feature(bytes_list=[value])}."""
  bytes_list = 1 + len(_varint(len(value))) + len(value)    # BytesList.value (field 1)
  feature = 1 + len(_varint(bytes_list)) + bytes_list       # Feature.bytes_list (field 1)
  entry = 1 + len(_varint(len(key))) + len(key) + 1 + len(_varint(feature)) + feature
  return [b'\n', _varint(entry), b'\n', _varint(len(key)), key, b'\x12', _varint(feature),
          b'\n', _varint(bytes_list), b'\n', _varint(len(value)), value]


def sample_record(key: str, members: dict[str, bytes], fmt: Format) -> bytes:
  """A serialized tf.train.Example of one sample: 'jpg' and 'txt' if present, and 'key'.

  Written directly in protobuf's wire format (Example.features = Features, whose map entries
  hold a Feature with a BytesList), one copy of the image bytes, ~3x faster than building the
  message; `tf.train.Example.FromString` reads it back (tests/test_webdataset.py).
  """
  parts = _feature_parts(b'key', key.encode('utf-8'))
  image, caption = fmt.image(members), fmt.caption(members)
  if image is not None:
    parts += _feature_parts(IMAGE_KEY.encode(), image)
  if caption is not None:
    parts += _feature_parts(TEXT_KEY.encode(), caption)
  features = sum(len(p) for p in parts)
  return b''.join([b'\n', _varint(features)] + parts)   # Example.features (field 1)


def _open(path: str) -> BinaryIO:
  if '://' not in path:
    return open(path, 'rb', buffering=_READ_BUFFER)
  tf = tf_setup.configure_tensorflow()
  return tf.io.gfile.GFile(path, 'rb')


def _size(path: str) -> int:
  if '://' not in path:
    return os.path.getsize(path)
  tf = tf_setup.configure_tensorflow()
  return tf.io.gfile.stat(path).length


def read_samples(path: str, *, count_only: bool = False) -> Iterator[tuple[str, dict]]:
  """The samples of one shard; a shard that cannot be read (further) ends with a warning."""
  def warn(e):
    logging.warning('Webdataset shard %s: %s; its samples after that point are skipped.', path, e)
  tf = tf_setup.configure_tensorflow()
  try:
    with _open(path) as f:
      yield from tar_samples(f, _size(path) if count_only else None, on_error=warn)
  except (OSError, tf.errors.OpError) as e:   # Unreadable file (local, gs://).
    warn(e)


def count_samples(path: str) -> int:
  """Samples in one shard, from its headers (member data is skipped, not read)."""
  return sum(1 for _ in read_samples(path, count_only=True))


def shard_records(path: bytes, fmt: Format) -> Iterator[np.ndarray]:
  """Serialized records (object [<= _CHUNK]) of one shard, _CHUNK at a time (the generator
  behind tf.data: one element per chunk, its overhead shared)."""
  chunk = []
  for key, members in read_samples(path.decode('utf-8')):
    chunk.append(sample_record(key, members, fmt))
    if len(chunk) == _CHUNK:
      yield np.array(chunk, dtype=object)
      chunk = []
  if chunk:
    yield np.array(chunk, dtype=object)


# --- This host's stream. --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HostShards:
  """One host's share of the shards (the `check` handle).

  Attributes:
    files: the shards this host reads (resampled: all shards, drawn from).
    shard_index, shard_count: keep samples shard_index, shard_index + shard_count, ... of the
      shards read in order (sharding by example); (0, 1) when the files are this host's alone.
    fmt: the members read as image and caption.
    resampled: draw shards with replacement (blocks of `cycle_length` draws) instead of epochs.
    name: a description for messages and logs.
  """
  files: tuple[str, ...]
  shard_index: int
  shard_count: int
  fmt: Format
  resampled: bool
  name: str
  image_key: str = IMAGE_KEY   # Features of the records (as sources.HostRecords).
  text_key: str = TEXT_KEY


def _check_format(files, fmt: Format, pattern: str):
  """The first samples must have an image member and a caption (else a config error)."""
  seen, images, captions, count = set(), 0, 0, 0
  for path in files:
    for _, members in read_samples(path):
      seen.update(members)
      images += fmt.image(members) is not None
      captions += fmt.caption(members) is not None
      count += 1
      if count >= _CHECK_SAMPLES:
        break
    if count >= _CHECK_SAMPLES:
      break
  where = f'the first {count} samples of {files[0]} ({pattern}); extensions: {sorted(seen)}'
  if not count:
    raise ValueError(f'config.data.webdataset_pattern={pattern!r}: no samples in the '
                     f'{len(files)} matched shards (not tar files?).')
  if not images:
    raise ValueError(f'config.data.webdataset_image_ext={";".join(fmt.image_ext)!r}: no such '
                     f'member in {where}.')
  if not captions:
    field = ('webdataset_json_caption' if not fmt.text_ext else 'webdataset_text_ext')
    value = fmt.json_caption if not fmt.text_ext else ';'.join(fmt.text_ext)
    raise ValueError(f'config.data.{field}={value!r}: no caption in {where} (captions come '
                     f'from the members {list(fmt.text_ext)}'
                     + (f", then the .json key {fmt.json_caption!r}" if fmt.json_caption else '')
                     + ').')


def host_shards(data_config, process_index: int = 0, process_count: int = 1) -> HostShards:
  """This host's shards of config.data, the pattern and extensions checked.

  Raises:
    ValueError naming the config field at fault.
  """
  pattern = data_config.webdataset_pattern
  files = shard_files(pattern)
  fmt = Format.from_config(data_config)
  _check_format(files, fmt, pattern)
  name = f'{len(files)} webdataset shards matching {pattern}'
  if data_config.resampled:
    return HostShards(tuple(files), 0, 1, fmt, True, name + ' (resampled)')
  if len(files) >= process_count:
    host = HostShards(tuple(files[process_index::process_count]), 0, 1, fmt, False, name)
  else:
    host = HostShards(tuple(files), process_index, process_count, fmt, False, name)
    total = 0
    for path in files:   # Enough samples that this host gets one?
      total += count_samples(path)
      if total > process_index:
        break
    if total <= process_index:
      raise ValueError(f'config.data.webdataset_pattern={pattern!r}: process {process_index} '
                       f'of {process_count} gets no samples from the {len(files)} shards.')
  return host


def _shard_dataset(tf, path, fmt: Format):
  return tf.data.Dataset.from_generator(
      lambda p: shard_records(p, fmt), args=(path,),
      output_signature=tf.TensorSpec([None], tf.string)).unbatch()


def _read(host: HostShards, paths, cycle_length: int, num_files: int):
  """Records of the shards `paths` (string [num_files]), interleaved, host-sharded."""
  tf = tf_setup.configure_tensorflow()
  records = tf.data.Dataset.from_tensor_slices(paths).interleave(
      sources.plain(lambda path: _shard_dataset(tf, path, host.fmt)),
      cycle_length=max(1, min(cycle_length, num_files)), block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if host.shard_count > 1:
    records = records.shard(host.shard_count, host.shard_index)
  return records


def _draws(tf, host: HostShards, seed: int, block, cycle_length: int, shuffle_id: int):
  """Indices into host.files of the shards of resampled block `block` (int64 [cycle_length])."""
  return tf.random.stateless_uniform(
      [cycle_length], seed=sources.stream_seed(tf, seed, _RESAMPLE, block * 65536 + shuffle_id),
      minval=0, maxval=len(host.files), dtype=tf.int64)


def _blocks(host: HostShards, *, seed: int, shuffle_buffer: int, cycle_length: int, cache: bool,
            start: int, shuffle_id: int, num_blocks: Optional[int]):
  """Epochs (or resampled blocks) start, start + 1, ... of this host's records."""
  tf = tf_setup.configure_tensorflow()
  paths = tf.constant(list(host.files))
  num_files = len(host.files)
  fixed = None
  if cache and not host.resampled:
    fixed = _read(host, paths, cycle_length, num_files).cache()

  def one(index):
    if fixed is not None:
      records = fixed
    elif host.resampled:
      order = _draws(tf, host, seed, index, cycle_length, shuffle_id)
      records = _read(host, tf.gather(paths, order), cycle_length, cycle_length)
    else:   # Same order on every host for a given epoch: needed when sharding by example.
      order = tf.argsort(tf.random.stateless_uniform(
          [num_files], seed=sources.stream_seed(tf, seed, sources.FILE_ORDER, index)))
      records = _read(host, tf.gather(paths, order), cycle_length, num_files)
    return sources.shuffle_block(tf, records, seed=seed, shuffle_buffer=shuffle_buffer,
                                 counter=index, shuffle_id=shuffle_id)

  if num_blocks is None:
    indices = tf.data.Dataset.counter(start)
  else:
    indices = tf.data.Dataset.range(start, start + num_blocks)
  return indices.flat_map(sources.plain(one))


def _epoch_size(host: HostShards) -> int:
  """Samples per epoch of this host (from the tar headers)."""
  total = sum(count_samples(path) for path in host.files)
  return len(range(host.shard_index, total, host.shard_count))


def _locate(host: HostShards, data_config, position: int, shuffle_id: int) -> tuple[int, int]:
  """(epoch or block, its first position) of the block holding stream position `position`."""
  if not host.resampled:
    per_epoch = _epoch_size(host)
    if not per_epoch:
      raise ValueError(f'{host.name}: no samples for this host.')
    epoch = position // per_epoch
    return epoch, epoch * per_epoch
  tf = tf_setup.configure_tensorflow()
  counts, block, first = {}, 0, 0
  while True:
    draws = _draws(tf, host, data_config.seed, block, data_config.cycle_length,
                   shuffle_id).numpy()
    for i in draws:
      if i not in counts:
        counts[i] = count_samples(host.files[i])
    size = sum(counts[i] for i in draws)
    if first + size > position:
      return block, first
    if not any(counts.values()) and len(counts) == len(host.files):
      raise ValueError(f'{host.name}: the shards hold no samples.')
    block, first = block + 1, first + size


def record_stream(host: HostShards, data_config, *, start_position: int = 0,
                  shuffle_id: int = 0):
  """(position int64, serialized record) of this host's stream from `start_position` on.

  The stream (endless) is a pure function of (config.data, host): resuming at a position yields
  exactly the records that followed it.
  """
  start, first = 0, 0
  if start_position:
    start, first = _locate(host, data_config, start_position, shuffle_id)
    logging.info('Resuming the %s stream at sample %d: %s %d (from sample %d).', host.name,
                 start_position, 'block' if host.resampled else 'epoch', start, first)
  records = _blocks(host, seed=data_config.seed, shuffle_buffer=data_config.shuffle_buffer,
                    cycle_length=data_config.cycle_length, cache=data_config.cache,
                    start=start, shuffle_id=shuffle_id, num_blocks=None)
  return records.enumerate(start=first).skip(start_position - first)


# --- The source's entry points (basic.data.SOURCES). ----------------------------------------------


def validate(config):
  """Config-only checks of the webdataset fields; ConfigError naming the field."""
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  pattern = config_lib.check_str(config, 'data.webdataset_pattern')
  if not _split_top(pattern):
    config_lib.fail('data.webdataset_pattern', pattern,
                    "must be a glob or brace list of tar shards ('shards/{00000..00099}.tar') "
                    "when config.data.source='webdataset'.")
  for name in ('webdataset_image_ext', 'webdataset_text_ext', 'webdataset_json_caption'):
    config_lib.check_str(config, f'data.{name}')
  fmt = Format.from_config(config.data)
  if not fmt.image_ext:
    config_lib.fail('data.webdataset_image_ext', config.data.webdataset_image_ext,
                    "must name the image members' extensions, e.g. 'jpg;png;webp'.")
  if not fmt.text_ext and not fmt.json_caption:
    config_lib.fail('data.webdataset_text_ext', config.data.webdataset_text_ext,
                    "must name the caption members' extensions (e.g. 'txt') when "
                    "config.data.webdataset_json_caption is ''.")
  config_lib.check_bool(config, 'data.resampled')
  sources.validate_record_fields(config)


def check(config, *, process_index: int = 0, process_count: int = 1) -> HostShards:
  """This host's shards, the pattern and extensions checked (errors name config.data.*)."""
  host = host_shards(config.data, process_index, process_count)
  logging.info('Process %d of %d reads %d shard(s)%s of %s.', process_index, process_count,
               len(host.files), (f', keeping sample {host.shard_index} of every '
                                 f'{host.shard_count}') if host.shard_count > 1 else '', host.name)
  return host


def batches(config, host: HostShards, *, start_step: int, start_position: int,
            local_batch: int, process_index: int, process_count: int):
  """Host batches {'image', 'caption', 'position'}: this host's sample stream from
  `start_position`, decoded, bad samples dropped, as the record sources' (sources.py)."""
  del start_step   # The stream is indexed by position.
  tf = tf_setup.configure_tensorflow()
  records = record_stream(host, config.data, start_position=start_position,
                          shuffle_id=process_index)
  # The record sources' decoding: parse, pick the caption, decode + augment, flag bad records.
  # pylint: disable-next=protected-access
  decode = sources._decode_fn(config, host, process_index, process_count)
  ds = records.map(sources.plain(decode), num_parallel_calls=tf.data.AUTOTUNE,
                   deterministic=True)
  ds = ds.ignore_errors(log_warning=True)   # Undecodable images.
  ds = ds.filter(sources.plain(lambda ex: ex['ok']))
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.map(sources.plain(lambda b: {'image': b['image'], 'caption': b['caption'],
                                         'position': b['position'][-1] + 1}))


def captions(config, n: int) -> Iterator[str]:
  """Up to `n` non-empty captions of one epoch of all the shards (as process 0 of 1, shuffled
  as in training). No image is decoded."""
  tf = tf_setup.configure_tensorflow()
  data = config.data
  host = dataclasses.replace(check(config), resampled=False)
  records = _blocks(host, seed=data.seed, shuffle_buffer=data.shuffle_buffer,
                    cycle_length=data.cycle_length, cache=False, start=0, shuffle_id=0,
                    num_blocks=1)
  texts = records.map(
      sources.plain(lambda r: sources.clean_captions(sources.parse_captions(r, TEXT_KEY))),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = data.threads or os.cpu_count()
  options.threading.max_intra_op_parallelism = 1
  for text in texts.unbatch().take(n).with_options(options).as_numpy_iterator():
    yield text.decode('utf-8')
