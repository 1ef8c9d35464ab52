"""Tokenizers: SentencePiece (training from captions, in-graph tokenisation with tensorflow-text)
and, for converted OpenAI / OpenCLIP weights, CLIP's byte-level BPE (basic/clip_bpe.py).

`config.tokenizer.kind` picks one (`KINDS`); `make_tokenizer(config.tokenizer, model_path,
length)` builds it. Both give fixed-length int32 ids [B, length] from `encode` (host) and
`tf_tokenize` (inside tf.data), and carry their model file's bytes (`serialized_model`), which
every checkpoint stores. The rest of this docstring is about SentencePiece.

Ids: 0 = <pad>, 1 = <unk>, 2 = <s> (BOS), 3 = </s> (EOS). A tokenised caption is
[BOS?] pieces... [EOS?] followed by pad (0) up to `length`; a caption that is too long is cut so
that the EOS (when used) is still its last token.

Train a model from a text file of captions, one per line:

  python -m basic.tokenizer train --input=captions.txt --vocab_size=256 --output=/tmp/spm.model

or from the captions of a config's data source (synthetic, tfds or tfrecord; the first
--sentences of them, default config.tokenizer.train_sentences; --vocab_size defaults to
config.model.text.vocab_size, --lowercase to config.tokenizer.lowercase):

  python -m basic.tokenizer train --config=configs/tiny.py --config.data.source=tfrecord \
      --config.data.tfrecord_pattern='data/*.tfrecord' --sentences=1000000 --output=spm.model
"""
import io
import os
import tempfile
from typing import Iterable, Sequence

from absl import app
from absl import flags
from absl import logging
from etils import epath
import numpy as np
import sentencepiece as spm

from basic.data import tf_setup

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

KINDS = ('sentencepiece', 'clip_bpe')
# The model file of each kind, as cached in a workdir ({workdir}/tokenizer/NAME).
MODEL_FILENAMES = {'sentencepiece': 'spm.model', 'clip_bpe': 'bpe_simple_vocab_16e6.txt.gz'}


def train(sentences: Iterable[str], vocab_size: int, output: str, *, lowercase: bool = True,
          model_type: str = 'bpe', character_coverage: float = 1.0, **trainer_kwargs) -> str:
  """Trains a SentencePiece model on `sentences` and writes it to `output` (a .model path).

  BPE is the default: on small, repetitive corpora (the synthetic captions) the unigram trainer
  stops well below the requested size, while BPE reaches it exactly. `hard_vocab_limit=False`
  lets a corpus that cannot support `vocab_size` pieces give a smaller vocabulary (logged as a
  warning) rather than fail; ids are then still < vocab_size.

  Args:
    sentences: the training text, one caption per item.
    vocab_size: number of pieces, including the 4 special ids.
    output: path of the .model file to write (parent directories are created; written
      atomically, so concurrent writers of the same model are harmless).
    lowercase: lowercase the sentences first (then tokenise with `lowercase=True` too).
    model_type: 'bpe' or 'unigram' (or 'char', 'word').
    character_coverage: fraction of characters covered by the vocabulary; the rest map to <unk>.
    **trainer_kwargs: further `spm.SentencePieceTrainer.train` options, overriding the above.

  Returns:
    `output`.
  """
  if lowercase:
    sentences = (s.lower() for s in sentences)
  options = dict(
      model_type=model_type, vocab_size=vocab_size, character_coverage=character_coverage,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, hard_vocab_limit=False,
      num_threads=tf_setup.DEFAULT_THREADS, minloglevel=2)
  options.update(trainer_kwargs)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **options)
  size = spm.SentencePieceProcessor(model_proto=model.getvalue()).vocab_size()
  if size != vocab_size:
    logging.warning('SentencePiece produced %d pieces, not the %d asked for: the corpus is too '
                    'small or repetitive to support more.', size, vocab_size)
  if '://' in str(output):  # An object store: one object write is atomic.
    epath.Path(output).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(output).write_bytes(model.getvalue())
    return output
  directory = os.path.dirname(os.path.abspath(output))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=directory, suffix='.tmp', delete=False) as f:
    f.write(model.getvalue())
  os.replace(f.name, output)
  return output


class Tokenizer:
  """A SentencePiece model applied in-graph (tensorflow-text) to fixed-length int32 ids.

  Attributes:
    length: L, the number of ids per caption.
    vocab_size: number of pieces of the model.
    pad_id, bos_id, eos_id: the special ids (0, 2, 3).
  """

  kind = 'sentencepiece'
  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID

  def __init__(self, model_path: str, length: int, *, lowercase: bool = True,
               add_bos: bool = False, add_eos: bool = True):
    if length <= int(add_bos) + int(add_eos):
      raise ValueError(f'length={length} leaves no room for text with add_bos={add_bos}, '
                       f'add_eos={add_eos}.')
    self._model = epath.Path(model_path).read_bytes()   # Local or gs://.
    self.model_path = model_path
    self.length = length
    self.lowercase = lowercase
    self.add_bos = add_bos
    self.add_eos = add_eos
    self._sp = spm.SentencePieceProcessor(model_proto=self._model)
    self.vocab_size = self._sp.vocab_size()
    self._tf_tokenizer = None  # Built lazily, so that merely loading a model needs no TF op.

  @classmethod
  def from_config(cls, tokenizer_config, model_path: str, length: int) -> 'Tokenizer':
    """From `config.tokenizer` (fields lowercase, add_bos, add_eos)."""
    return cls(model_path, length, lowercase=tokenizer_config.lowercase,
               add_bos=tokenizer_config.add_bos, add_eos=tokenizer_config.add_eos)

  @property
  def serialized_model(self) -> bytes:
    """The SentencePiece model file's bytes (saved with every checkpoint)."""
    return self._model

  def tf_tokenize(self, texts):
    """tf.Tensor string [B] -> tf.Tensor int32 [B, length]; usable inside tf.data / tf.function."""
    tf = tf_setup.configure_tensorflow()
    if self._tf_tokenizer is None:
      import tensorflow_text  # pylint: disable=g-import-not-at-top
      with tf.init_scope():  # Eager resource, even when first called while tracing a graph.
        self._tf_tokenizer = tensorflow_text.SentencepieceTokenizer(
            model=self._model, out_type=tf.int32, add_bos=False, add_eos=False)
    texts = tf.convert_to_tensor(texts, dtype=tf.string)
    if self.lowercase:
      texts = tf.strings.lower(texts, encoding='utf-8')
    ids = self._tf_tokenizer.tokenize(texts)                          # Ragged int32 [B, None].
    ids = ids[:, :self.length - int(self.add_bos) - int(self.add_eos)]
    column = lambda value: tf.RaggedTensor.from_tensor(
        tf.fill([tf.shape(texts)[0], 1], value), row_splits_dtype=ids.row_splits.dtype)
    parts = [ids]
    if self.add_bos:
      parts.insert(0, column(BOS_ID))
    if self.add_eos:
      parts.append(column(EOS_ID))
    if len(parts) > 1:
      ids = tf.concat(parts, axis=1)
    return ids.to_tensor(default_value=PAD_ID, shape=[None, self.length])

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """list of str [B] -> int32 [B, length] (eagerly, through `tf_tokenize`)."""
    return self.tf_tokenize(list(texts)).numpy()

  def decode(self, ids) -> list[str]:
    """int [B, L] -> B strings; pad, BOS, EOS and anything after the first EOS are dropped."""
    texts = []
    for row in np.atleast_2d(np.asarray(ids)).tolist():
      if EOS_ID in row:
        row = row[:row.index(EOS_ID)]
      texts.append(self._sp.decode([i for i in row if i not in (PAD_ID, BOS_ID)]))
    return texts


def make_tokenizer(tokenizer_config, model_path: str, length: int):
  """The tokenizer of `config.tokenizer` (its `kind`) with the model file at `model_path`.

  -> `Tokenizer` (kind 'sentencepiece') or
  `basic.clip_bpe.ClipBpeTokenizer` ('clip_bpe': always lowercases and adds SOT / EOT, as
  OpenCLIP; the fields lowercase, add_bos, add_eos do not apply).
  """
  kind = tokenizer_config.kind
  if kind == 'sentencepiece':
    return Tokenizer.from_config(tokenizer_config, model_path, length)
  if kind == 'clip_bpe':
    from basic import clip_bpe  # pylint: disable=g-import-not-at-top
    return clip_bpe.ClipBpeTokenizer(model_path, length)
  raise ValueError(f'config.tokenizer.kind={kind!r}: must be one of {list(KINDS)}.')


def ensure_tokenizer(config, workdir: str) -> str:
  """The path of the tokenizer model file for `config`, training (and caching) one if needed.

  1. If `config.tokenizer.model_path` is set, it is returned (it must exist; local or gs://).
  2. Else, if `config.init_from` names a checkpoint that carries a tokenizer of
     `config.tokenizer.kind`, that tokenizer (whose ids the checkpoint's embeddings were trained
     with) is written to {workdir}/tokenizer/{MODEL_FILENAMES[kind]} (or reused if there);
     unless `config.init_from_params` takes no text-tower parameter ('text/...') from it (LiT:
     a new text tower learns the ids of this run's own tokenizer, as in 3).
  3. Else, for SentencePiece, a model with `config.model.text.vocab_size` pieces is trained on
     the first `config.tokenizer.train_sentences` training captions of config.data's source
     (`basic.data.pipeline.caption_stream`) into {workdir}/tokenizer/spm.model (local or gs://),
     or reused if there. 'clip_bpe' is never trained: without a model it is a ConfigError.
  With several processes, process 0 writes the file while the others wait for it at a barrier,
  then all read it.
  """
  path = config.tokenizer.model_path
  kind = config.tokenizer.kind
  if path:
    if not epath.Path(path).exists():
      raise FileNotFoundError(f'config.tokenizer.model_path={path!r} does not exist.')
    return path
  import jax  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / 'tokenizer' / MODEL_FILENAMES[kind]
  init_from = config.init_from
  if init_from and jax.process_index() == 0 and not path.exists():
    if _takes_text_params(config):
      _copy_checkpoint_tokenizer(init_from, kind, path)
    else:
      logging.info('config.init_from_params=%r takes no text-tower parameter from %s: not using '
                   'its tokenizer.', tuple(config.init_from_params), init_from)
  if kind == 'sentencepiece' and jax.process_index() == 0:
    _train_or_reuse_cached(config, path)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('basic.tokenizer.ensure_tokenizer')
  if not path.exists():
    from basic import config_lib  # pylint: disable=g-import-not-at-top
    raise config_lib.ConfigError(
        f"config.tokenizer.model_path='': tokenizer.kind={kind!r} is not trained by a run; set "
        f'it to the BPE merges file (bpe_simple_vocab_16e6.txt.gz), or set config.init_from to '
        f'a checkpoint that carries a {kind} tokenizer.')
  return str(path)


def _takes_text_params(config) -> bool:
  """Whether config.init_from_params (() = all) matches a text-tower parameter ('text/...') of
  the model config describes (basic.models.scan.abstract_params: shapes only)."""
  patterns = tuple(config.get('init_from_params', ()))
  if not patterns:
    return True
  import jax  # pylint: disable=g-import-not-at-top
  from basic import sharding  # pylint: disable=g-import-not-at-top
  from basic.models import posemb, scan  # pylint: disable=g-import-not-at-top
  names = [sharding.path_str(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(scan.abstract_params(config))]
  return any(n.startswith('text/') and posemb.matches(n, patterns) for n in names)


def _copy_checkpoint_tokenizer(init_from: str, kind: str, path: epath.Path):
  """Writes the tokenizer of the checkpoint at `init_from` to `path` if it is of `kind`."""
  from basic import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  with checkpoint_lib.open_step(init_from, field='config.init_from') as (ckpt, step):
    found, model = ckpt.restore_tokenizer_kind(step), ckpt.restore_tokenizer(step)
  if model is None or found != kind:
    logging.warning('config.init_from=%r carries no %s tokenizer (%s); not using it.', init_from,
                    kind, found or 'none')
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(model)
  logging.info('Using the %s tokenizer of %s step %d (written to %s).', kind, init_from, step,
               path)


def _train_or_reuse_cached(config, path: epath.Path):
  vocab_size = config.model.text.vocab_size
  if path.exists():
    cached = spm.SentencePieceProcessor(model_proto=path.read_bytes()).vocab_size()
    if cached > vocab_size:
      raise ValueError(f'Cached tokenizer {path} has {cached} pieces, more than '
                       f'config.model.text.vocab_size={vocab_size}; delete it to retrain.')
    logging.info('Reusing tokenizer %s (%d pieces).', path, cached)
    return
  from basic.data import pipeline  # pylint: disable=g-import-not-at-top
  captions = list(pipeline.caption_stream(config, config.tokenizer.train_sentences))
  logging.info('Training a %d-piece tokenizer on %d %s captions into %s.',
               vocab_size, len(captions), config.data.source, path)
  train(captions, vocab_size, str(path), lowercase=config.tokenizer.lowercase)


# --- Command line. --------------------------------------------------------------------------------


_USAGE = ('Usage: python -m basic.tokenizer train (--input=captions.txt | --config=CONFIG.py '
          '[--config.data.FIELD=...] [--sentences=N]) [--vocab_size=N] --output=PATH.model')


def _define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('input', None, 'Text file of captions, one per line.')
  config_flags.DEFINE_config_file(
      'config', None, 'Experiment config: train on the captions of its data source instead.')
  flags.DEFINE_integer('sentences', None, 'With --config: number of captions to read '
                       '(default config.tokenizer.train_sentences).')
  flags.DEFINE_integer('vocab_size', None, 'Number of pieces, including 4 special ids '
                       '(default with --config: config.model.text.vocab_size).')
  flags.DEFINE_string('output', None, 'Path of the .model file to write.')
  flags.DEFINE_bool('lowercase', True, 'Lowercase the captions before training (default with '
                    '--config: config.tokenizer.lowercase).')
  flags.DEFINE_string('model_type', 'bpe', "SentencePiece model type: 'bpe' or 'unigram'.")
  flags.mark_flags_as_required(['output'])


def main(argv):
  if len(argv) != 2 or argv[1] != 'train':
    raise app.UsageError(_USAGE)
  options = flags.FLAGS
  config = options.config
  if (options.input is None) == (config is None):
    raise app.UsageError('Give exactly one of --input and --config. ' + _USAGE)
  vocab_size, lowercase = options.vocab_size, options.lowercase
  if config is not None:
    from basic.data import pipeline  # pylint: disable=g-import-not-at-top
    count = options.sentences or config.tokenizer.train_sentences
    sentences = pipeline.caption_stream(config, count)
    vocab_size = vocab_size or config.model.text.vocab_size
    if not options['lowercase'].present:
      lowercase = config.tokenizer.lowercase
    logging.info('Training on up to %d captions of config.data.source=%r.', count,
                 config.data.source)
  else:
    if vocab_size is None:
      raise app.UsageError('--vocab_size is required with --input. ' + _USAGE)
    with open(options.input, encoding='utf-8') as f:
      sentences = [line.rstrip('\n') for line in f]
    sentences = [s for s in sentences if s.strip()]
  path = train(sentences, vocab_size, options.output, lowercase=lowercase,
               model_type=options.model_type)
  print(f'Wrote {path} ({spm.SentencePieceProcessor(model_file=path).vocab_size()} pieces).')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
