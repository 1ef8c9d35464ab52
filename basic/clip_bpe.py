"""OpenAI CLIP's byte-level BPE tokenizer, as OpenCLIP's `SimpleTokenizer` (tokenizer.kind
'clip_bpe'), for CLIP weights converted by `basic.convert.open_clip`.

Ids: 49406 = <start_of_text> (SOT), 49407 = <end_of_text> (EOT), 0 = padding. A caption becomes
[SOT] tokens... [EOT] followed by 0 up to `length`; a longer one is cut to `length` ids with EOT
as its last (OpenCLIP's `tokenize`). Id 0 is also the token '!': CLIP models pool at the EOT
token (`pool='argmax'`: EOT has the largest id) and attend to every token
(`model.text.mask_padding=False`).

Text is cleaned as OpenCLIP's default ('lower'): ftfy.fix_text, HTML entities unescaped twice,
whitespace runs collapsed to one space, lowercased. It is split by CLIP's regex, each piece's
UTF-8 bytes are mapped to printable characters (`bytes_to_unicode`) and merged pairwise by the
ranks of the merges file (`bpe_simple_vocab_16e6.txt.gz`: gzipped text, a header line, then one
merge per line; the file CLIP and OpenCLIP ship). The file is the tokenizer's model:
`config.tokenizer.model_path` points at it and every checkpoint carries its bytes.

Tokenisation runs in Python (inside tf.data through `tf.numpy_function`); merged words are kept
in an LRU cache, so a caption corpus's frequent words are merged once.
"""
import functools
import gzip
import html
from typing import Sequence

from etils import epath
import ftfy
import numpy as np
import regex

from basic.data import tf_setup

SOT = '<start_of_text>'
EOT = '<end_of_text>'
PAD_ID = 0
# CLIP's vocabulary: 256 byte symbols, the same 256 ending a word ('</w>'), the first
# NUM_MERGES merges of the file, then SOT and EOT: 49408 ids.
NUM_MERGES = 49152 - 256 - 2
BPE_CACHE_SIZE = 2**18        # Merged words kept (LRU).
# CLIP's pre-tokenisation: special tokens, English contractions, letter runs, single digits, runs
# of other non-space characters.
_PATTERN = (SOT + '|' + EOT +
            r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
  """Byte -> printable character: printable Latin-1 bytes map to themselves, the other 68 bytes
  to the characters 256.. in order, so a byte string is a string without spaces or controls."""
  bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) +
        list(range(ord('®'), ord('ÿ') + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, [chr(c) for c in cs]))


def clean(text: str) -> str:
  """OpenCLIP's 'lower' clean: ftfy, HTML unescaped twice, whitespace collapsed, lowercase."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return ' '.join(text.split()).lower()


class ClipBpeTokenizer:
  """CLIP's BPE to fixed-length int32 ids; the interface of `basic.tokenizer.Tokenizer`.

  Attributes:
    length: L, the number of ids per caption (the context length, 77 for CLIP).
    vocab_size: 49408 with CLIP's merges file.
    pad_id, bos_id, eos_id: 0, SOT (49406) and EOT (49407).
  """

  kind = 'clip_bpe'
  pad_id = PAD_ID

  def __init__(self, merges_path: str, length: int):
    if length < 2:
      raise ValueError(f'length={length} leaves no room for <start_of_text> and <end_of_text>.')
    self._model = epath.Path(merges_path).read_bytes()   # Local or gs://.
    self.model_path = merges_path
    self.length = length
    try:
      lines = gzip.decompress(self._model).decode('utf-8').split('\n')
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f'{merges_path}: not a gzipped BPE merges file '
                       '(bpe_simple_vocab_16e6.txt.gz).') from e
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + '</w>' for s in symbols] + [''.join(m) for m in merges] + [SOT, EOT]
    self._encoder = {token: i for i, token in enumerate(vocab)}
    self._decoder = {i: token for token, i in self._encoder.items()}
    self._ranks = {merge: i for i, merge in enumerate(merges)}
    self._byte_encoder = bytes_to_unicode()
    self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
    self._pattern = regex.compile(_PATTERN, regex.IGNORECASE)
    self.vocab_size = len(self._encoder)
    self.bos_id = self._encoder[SOT]
    self.eos_id = self._encoder[EOT]
    self._bpe = functools.lru_cache(maxsize=BPE_CACHE_SIZE)(self._merge)

  @property
  def serialized_model(self) -> bytes:
    """The merges file's bytes (gzipped; saved with every checkpoint)."""
    return self._model

  def _merge(self, word: str) -> tuple[str, ...]:
    """One pre-token (byte characters) -> its BPE symbols, lowest-ranked pair merged first."""
    if word in (SOT, EOT):
      return (word,)
    parts = tuple(word[:-1]) + (word[-1] + '</w>',)
    while len(parts) > 1:
      pairs = set(zip(parts[:-1], parts[1:]))
      pair = min(pairs, key=lambda p: self._ranks.get(p, float('inf')))
      if pair not in self._ranks:
        break
      merged, i = [], 0
      while i < len(parts):
        if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = tuple(merged)
    return parts

  def tokens(self, text: str) -> list[int]:
    """One caption -> its BPE ids, without SOT / EOT, untruncated."""
    ids = []
    for piece in self._pattern.findall(clean(text)):
      word = ''.join(self._byte_encoder[b] for b in piece.encode('utf-8'))
      ids.extend(self._encoder[s] for s in self._bpe(word))
    return ids

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """list of str [B] -> int32 [B, length]: SOT, ids, EOT (last when cut), then 0."""
    out = np.full((len(texts), self.length), PAD_ID, np.int32)
    for row, text in zip(out, texts):
      ids = [self.bos_id] + self.tokens(text) + [self.eos_id]
      if len(ids) > self.length:
        ids = ids[:self.length - 1] + [self.eos_id]
      row[:len(ids)] = ids
    return out

  def _encode_bytes(self, texts: np.ndarray) -> np.ndarray:
    return self.encode([t.decode('utf-8', errors='replace') for t in texts.reshape(-1)])

  def tf_tokenize(self, texts):
    """tf.Tensor string [B] -> tf.Tensor int32 [B, length]; usable inside tf.data / tf.function
    (a `tf.numpy_function` calling `encode`)."""
    tf = tf_setup.configure_tensorflow()
    texts = tf.convert_to_tensor(texts, dtype=tf.string)
    ids = tf.numpy_function(self._encode_bytes, [texts], tf.int32, stateful=False)
    ids.set_shape(texts.shape.concatenate([self.length]))
    return ids

  def decode(self, ids) -> list[str]:
    """int [B, L] -> B strings; SOT, and EOT with everything after it, are dropped."""
    texts = []
    for row in np.atleast_2d(np.asarray(ids)).tolist():
      if row and row[0] == self.bos_id:
        row = row[1:]
      if self.eos_id in row:
        row = row[:row.index(self.eos_id)]
      chars = ''.join(self._decoder[i] for i in row)
      text = bytearray(self._byte_decoder[c] for c in chars if c in self._byte_decoder)
      texts.append(text.decode('utf-8', errors='replace').replace('</w>', ' ').strip())
    return texts
