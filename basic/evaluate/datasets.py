"""Evaluation examples from prepared TFDS data sets (tf.data on the CPU, nothing downloaded).

A task (basic/evaluate/tasks.py) names a TFDS data set, its split and its feature keys. Feature
keys are '/'-joined paths into nested features, as TFDS nests them: 'image', 'label',
'captions/text' (a Sequence of {'text': Text} features read as one string vector).

Each host reads its own contiguous share of the split (`tfds.even_splits`); images are decoded
and preprocessed for evaluation (preprocess.eval_image: shorter side resized to the config's
image size, centre crop, uint8). A record whose image does not decode is skipped with a logged
warning (the evaluators report how many images they scored).
"""
import os
from typing import Any, Optional

from basic.data import preprocess
from basic.data import sources
from basic.data import tf_setup


def field_name(task_name: str, field: str) -> str:
  """The dotted config field of a task, for error messages."""
  return f'config.eval.tasks.{task_name}.{field}'


def _tfds():
  tf_setup.configure_tensorflow()   # Before any TF op: CPU only, few threads.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def builder(task, task_name: str):
  """The prepared TFDS builder of a task (tfds_name, data_dir); downloads nothing.

  Raises:
    ValueError naming config.eval.tasks.NAME.tfds_name if the data set is unknown or not
    prepared in the task's data_dir.
  """
  return sources.load_tfds_builder(task.tfds_name, task.data_dir,
                                   field=field_name(task_name, 'tfds_name'),
                                   dir_field=field_name(task_name, 'data_dir'))


def feature(tfds_builder, key: str, field: str):
  """The TFDS feature at a '/'-joined path (through FeaturesDicts and Sequences).

  Raises:
    ValueError naming `field` and listing the features there are.
  """
  tfds = _tfds()
  node = tfds_builder.info.features
  for part in key.split('/'):
    while isinstance(node, tfds.features.Sequence):
      node = node.feature
    if not isinstance(node, tfds.features.FeaturesDict) or part not in node.keys():
      raise ValueError(f'{field}={key!r}: no such feature in TFDS '
                       f'{tfds_builder.info.full_name}; features: {_paths(tfds_builder)}.')
    node = node[part]
  return node


def _paths(tfds_builder) -> str:
  """'image (Image), label (ClassLabel), captions/text (Text), ...' for error messages."""
  tfds = _tfds()
  out = []

  def walk(prefix, node):
    while isinstance(node, tfds.features.Sequence):
      node = node.feature
    if isinstance(node, tfds.features.FeaturesDict):
      for key in node.keys():
        walk(f'{prefix}{key}/', node[key])
    else:
      out.append(f'{prefix[:-1]} ({type(node).__name__})')
  walk('', tfds_builder.info.features)
  return ', '.join(out)


def check_image(tfds_builder, task, task_name: str):
  """Raises ValueError naming image_key unless it is an Image feature."""
  tfds = _tfds()
  field = field_name(task_name, 'image_key')
  node = feature(tfds_builder, task.image_key, field)
  if not isinstance(node, tfds.features.Image):
    raise ValueError(f'{field}={task.image_key!r}: a {type(node).__name__} feature, not an '
                     f'Image; features: {_paths(tfds_builder)}.')


def class_label(tfds_builder, task, task_name: str):
  """The ClassLabel feature at label_key. Raises ValueError naming label_key otherwise."""
  tfds = _tfds()
  field = field_name(task_name, 'label_key')
  node = feature(tfds_builder, task.label_key, field)
  if not isinstance(node, tfds.features.ClassLabel):
    raise ValueError(f'{field}={task.label_key!r}: a {type(node).__name__} feature, not a '
                     f'ClassLabel; features: {_paths(tfds_builder)}.')
  return node


def check_text(tfds_builder, key: str, field: str):
  """Raises ValueError naming `field` unless `key` is a Text feature (or a sequence of them)."""
  tfds = _tfds()
  node = feature(tfds_builder, key, field)
  while isinstance(node, tfds.features.Sequence):
    node = node.feature
  if not isinstance(node, tfds.features.Text):
    raise ValueError(f'{field}={key!r}: a {type(node).__name__} feature, not Text; features: '
                     f'{_paths(tfds_builder)}.')


def host_split(tfds_builder, task, task_name: str, process_index: int = 0,
               process_count: int = 1) -> tuple[Any, list[int]]:
  """-> (this host's split, the number of examples of every host's split).

  The task's split (its first max_examples examples if max_examples > 0) is cut into
  process_count contiguous, near-even ranges.
  """
  tfds = _tfds()
  split = task.split
  if task.max_examples:
    split = f'{split}[:{task.max_examples}]'
  try:
    splits = tfds.even_splits(split, n=process_count, drop_remainder=False)
    counts = [int(tfds_builder.info.splits[s].num_examples) for s in splits]
  except (KeyError, ValueError, AssertionError) as e:
    raise ValueError(f'{field_name(task_name, "split")}={task.split!r}: not a split of TFDS '
                     f'{tfds_builder.info.full_name} (splits: '
                     f'{sorted(tfds_builder.info.splits)}): {e}') from e
  return splits[process_index], counts


def _get(example: dict, key: str):
  node = example
  for part in key.split('/'):
    node = node[part]
  return node


def _skip_decoding(key: str) -> dict:
  """decoders argument of as_dataset that leaves the image at `key` encoded."""
  tfds = _tfds()
  decoders: Any = tfds.decode.SkipDecoding()
  for part in reversed(key.split('/')):
    decoders = {part: decoders}
  return decoders


def examples(tfds_builder, split, image_key: str, image_size: int, *,
             extra: Optional[dict[str, str]] = None, resize_method: str = 'bilinear',
             antialias: bool = True, threads: int = 0):
  """A tf.data.Dataset of {'image': uint8 [S, S, 3], **{name: feature at extra[name]}}.

  Args:
    tfds_builder: a prepared builder (see `builder`).
    split: the (host) split to read, in file order.
    image_key: '/'-path of the encoded image; decoded to RGB (grey and RGBA images too).
    image_size: S (config.data.image_size).
    extra: output name -> '/'-path of other features to pass along as stored (a label int64 [],
      a caption string [], captions string [n]).
    resize_method, antialias: config.data.resize_method / antialias.
    threads: tf.data worker threads (0 = all cores).
  """
  tf = tf_setup.configure_tensorflow()
  extra = dict(extra or {})
  ds = tfds_builder.as_dataset(split=split, shuffle_files=False,
                               decoders=_skip_decoding(image_key))

  def prepare(example):
    image = preprocess.eval_image(preprocess.decode(_get(example, image_key)), image_size,
                                  method=resize_method, antialias=antialias)
    return {'image': image, **{name: _get(example, key) for name, key in extra.items()}}

  ds = ds.map(tf.autograph.experimental.do_not_convert(prepare),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors(log_warning=True)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = threads or os.cpu_count()
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)
