"""Text token reduction (CLIPA): keep `length` words of each caption, before tokenisation.

`mask_captions(captions, kind, length, seed)`: tf.string [B] -> tf.string [B], in-graph (tf.data).
A caption is split on whitespace into words; `length` of them are kept, in their original order,
joined by single spaces; the tokenizer then cuts the result to `config.data.text_length` ids.
Kinds (`KINDS`):
  'none':     the caption unchanged (the tokenizer's cut is plain truncation).
  'truncate': the first `length` words (explicit truncation).
  'random':   `length` words chosen uniformly at random, per caption.
  'block':    `length` consecutive words at a random start, per caption.
  'syntax':   an APPROXIMATION of CLIPA's syntax masking. CLIPA tags parts of speech (NLTK) and
              keeps nouns first, then adjectives, then other words. No part-of-speech tagger with
              its model data installs from the package registry here (NLTK downloads its tagger
              at run time; spaCy's English models are not on PyPI but for unofficial re-uploads),
              so this drops the words of a fixed English function-word list (`FUNCTION_WORDS`:
              articles, prepositions, pronouns, conjunctions, auxiliaries) first: content words
              (nouns, adjectives, verbs, ...) are kept first, in order, then function words.
Units are words, not tokens (a word is one or a few SentencePiece ids), so the caption still
meets the tokenizer's length cut. Randomness is stateless: a function of `seed` (int64 [2], from
the data seed and the batch's stream position in basic/data/pipeline.py) and the row.
"""
from basic.data import tf_setup

KINDS = ('none', 'truncate', 'random', 'block', 'syntax')

# Closed-class English words, dropped first by 'syntax' (the approximation above).
FUNCTION_WORDS = tuple(sorted(set('''
a an the this that these those some any each every no all both either neither another such
of in on at by for with about against between into through during before after above below to
from up down out off over under near onto upon within without along across behind beside
beneath around among toward towards inside outside via per than as like
and or but nor so yet if while because although though whereas unless until since whether
i me my mine myself you your yours yourself he him his himself she her hers herself it its
itself we us our ours ourselves they them their theirs themselves who whom whose which what
is are was were be been being am has have had having do does did doing will would shall should
can could may might must there here then very too also just not only
'''.split())))


def _normalise(tf, words):
  """Lower-cased words without leading / trailing punctuation (for the function-word test)."""
  return tf.strings.regex_replace(tf.strings.lower(words), r'^[^\w]+|[^\w]+$', '')


def mask_captions(captions, kind: str, length: int, seed):
  """Keeps `length` words of each caption (see the module docstring).

  Args:
    captions: tf.string [B].
    kind: one of KINDS.
    length: words kept per caption (>= 1); captions with fewer words are kept whole.
    seed: int64 [2] stateless seed ('random' and 'block').

  Returns:
    tf.string [B]: the kept words in their original order, joined by single spaces.
  """
  tf = tf_setup.configure_tensorflow()
  if kind not in KINDS:
    raise ValueError(f'Unknown config.data.text_mask.kind {kind!r}; one of {KINDS}.')
  if kind == 'none':
    return captions
  if length < 1:
    raise ValueError(f'config.data.text_mask.length must be >= 1, got {length}.')
  words = tf.strings.split(captions)                                   # Ragged [B, (n)].
  n = tf.cast(words.row_lengths(), tf.int32)                           # [B]
  dense = words.to_tensor('')                                          # [B, W]
  b, w = tf.shape(dense)[0], tf.shape(dense)[1]
  pos = tf.broadcast_to(tf.range(w)[None], [b, w])                     # [B, W]
  posf = tf.cast(pos, tf.float32)
  wf = tf.cast(w, tf.float32)
  if kind == 'truncate':
    score = posf
  elif kind == 'random':
    score = tf.random.stateless_uniform([b, w], seed=seed)
  elif kind == 'block':
    u = tf.random.stateless_uniform([b], seed=seed)
    starts = tf.maximum(n - length + 1, 1)
    start = tf.minimum(tf.cast(u * tf.cast(starts, tf.float32), tf.int32), starts - 1)[:, None]
    # Positions from `start` on come first, in order; those before it after them.
    score = tf.where(pos >= start, posf, wf + posf)
  else:  # 'syntax'
    table = tf.constant(FUNCTION_WORDS)
    is_function = tf.reduce_any(tf.equal(_normalise(tf, dense)[..., None], table), axis=-1)
    score = tf.where(is_function, wf, 0.0) + posf
  valid = pos < n[:, None]
  score = tf.where(valid, score, 4.0 * wf + 4.0)                       # Padding last.
  rank = tf.argsort(tf.argsort(score, axis=1, stable=True), axis=1, stable=True)
  keep = (rank < length) & valid
  kept = tf.ragged.boolean_mask(dense, keep)
  return tf.strings.reduce_join(kept, axis=1, separator=' ')
