"""The evaluator 'retrieval': image-text retrieval (COCO / Flickr30k style: several captions per
image), recall@k, of a TFDS data set (config.eval.tasks.NAME, kind='retrieval'; fields in
DEFAULTS and basic/evaluate/tasks.py).

image -> text: each image with at least one caption queries all captions; its positives are its
own captions. text -> image: each caption queries all images; its positive is its image.
Similarity is the cosine of the unit embeddings.

Ranks and ties. The rank of a query is the number of non-positive candidates whose score is
greater than or EQUAL to the score of its best-scoring positive; the query is a hit at k if its
rank is < k. So ties count against the query: a model that scores every candidate alike gets
recall 0 (while there are at least k negatives), never 1, and the result does not depend on the
order of the candidates. (Duplicate captions of different images therefore tie against each
other.) Images without any caption are candidates for text -> image but not image -> text
queries.
"""
from typing import Sequence

import jax
import numpy as np

from basic.data import sources
from basic.data import tf_setup
from basic.evaluate import datasets


def ranks(query_emb: np.ndarray, candidate_emb: np.ndarray, query_ids: np.ndarray,
          candidate_ids: np.ndarray, *, chunk_size: int = 1024) -> np.ndarray:
  """Ranks of the queries under the rule of the module docstring.

  Args:
    query_emb: float [Q, d].
    candidate_emb: float [M, d].
    query_ids: int [Q]; candidate c is a positive of query q iff
      candidate_ids[c] == query_ids[q].
    candidate_ids: int [M].
    chunk_size: queries scored at a time (memory: chunk_size x M scores).

  Returns:
    int64 [Q]: non-positive candidates scoring >= the best positive (M if q has no positive).
  """
  query_emb = np.asarray(query_emb, np.float32)
  candidate_emb = np.asarray(candidate_emb, np.float32)
  candidate_ids = np.asarray(candidate_ids)
  # Identical candidates must score exactly alike; a matrix product need not give identical
  # columns identical values (blocking), so score each distinct candidate once.
  distinct, inverse = np.unique(candidate_emb, axis=0, return_inverse=True)
  inverse = inverse.reshape(-1)
  out = np.empty(len(query_emb), np.int64)
  for start in range(0, len(query_emb), chunk_size):
    scores = (query_emb[start:start + chunk_size] @ distinct.T)[:, inverse]       # [c, M]
    positive = np.asarray(query_ids[start:start + chunk_size])[:, None] == candidate_ids[None]
    best = np.where(positive, scores, -np.inf).max(axis=1, initial=-np.inf)     # [c]
    rank = np.sum(~positive & (scores >= best[:, None]), axis=1)
    out[start:start + chunk_size] = np.where(np.isfinite(best), rank, len(candidate_emb))
  return out


def recall_at_k(query_ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
  """{k: fraction of queries with rank < k}."""
  query_ranks = np.asarray(query_ranks)
  return {k: float(np.mean(query_ranks < k)) if len(query_ranks) else 0.0 for k in ks}


def evaluate_task(task_name: str, task, encoders, params, tokenizer,
                  config) -> dict[str, float]:
  """Retrieval recall@k of a TFDS task in both directions (see basic/evaluate/tasks.py).

  Each host reads its share of the split; image and caption embeddings of all hosts are
  gathered (replicated) so every host computes the same ranks.

  Returns:
    {'NAME/i2t_recall@{k}', 'NAME/t2i_recall@{k}' for k in task.ks, 'NAME/num_images',
    'NAME/num_texts'}.
  """
  field = lambda name: datasets.field_name(task_name, name)
  builder = datasets.builder(task, task_name)
  datasets.check_image(builder, task, task_name)
  datasets.check_text(builder, task.caption_key, field('caption_key'))
  index, count = jax.process_index(), jax.process_count()
  split, counts = datasets.host_split(builder, task, task_name, index, count)
  first_id = sum(counts[:index])          # Global image ids: hosts' splits are contiguous.
  ds = datasets.examples(builder, split, task.image_key, config.data.image_size,
                         extra={'captions': task.caption_key},
                         resize_method=config.data.resize_method,
                         antialias=config.data.antialias, threads=config.data.threads)
  tf = tf_setup.configure_tensorflow()
  # captions: string [n], one caption or several.
  ds = ds.enumerate().map(sources.plain(lambda i, ex: {
      'image': ex['image'], 'captions': tf.reshape(ex['captions'], [-1]), 'id': first_id + i}))
  local = encoders.local_batch
  size = config.data.image_size
  batches = ds.padded_batch(local).prefetch(2).as_numpy_iterator()

  image_emb, image_ids, captions, owners = [], [], [], []
  for _ in range(-(-max(counts) // local)):    # The same number of steps on every host.
    batch = next(batches, None)
    if batch is None:
      batch = {'image': np.zeros((0, size, size, 3), np.uint8), 'id': np.zeros(0, np.int64),
               'captions': np.zeros((0, 0), object)}
    n = len(batch['id'])
    emb = encoders.images(params, batch['image'])
    ids = encoders.gather(np.asarray(batch['id'], np.int64))
    valid = encoders.gather(np.ones(n, bool))
    image_emb.append(emb[valid])
    image_ids.append(ids[valid])
    for i in range(n):
      for text in batch['captions'][i]:
        text = text.decode('utf-8').strip()
        if text:          # padded_batch pads caption lists with b''.
          captions.append(text)
          owners.append(int(batch['id'][i]))
  image_emb, image_ids = np.concatenate(image_emb), np.concatenate(image_ids)

  # Every host's captions (token ids) and owners, then each distinct token sequence encoded
  # once: identical captions get one embedding, so they tie exactly (see the module docstring).
  tokens = tokenizer.encode(captions) if captions else np.zeros((0, tokenizer.length), np.int32)
  owners = np.asarray(owners, np.int64)
  all_tokens, text_owners = [], []
  for s in range(_max_over_hosts(-(-len(captions) // local))):
    rows = slice(s * local, (s + 1) * local)
    valid = encoders.gather(np.ones(len(owners[rows]), bool))
    all_tokens.append(encoders.gather(tokens[rows])[valid])
    text_owners.append(encoders.gather(owners[rows])[valid])
  all_tokens = np.concatenate(all_tokens) if all_tokens else tokens
  text_owners = np.concatenate(text_owners) if text_owners else owners
  if not len(all_tokens):
    raise ValueError(f'{field("caption_key")}={task.caption_key!r}: no non-empty caption in '
                     f'TFDS {builder.info.full_name} split {task.split!r}.')
  unique, inverse = np.unique(all_tokens, axis=0, return_inverse=True)
  text_emb = encoders.same_texts(params, unique)[inverse.reshape(-1)]

  queries = np.isin(image_ids, text_owners)   # Images with at least one caption.
  i2t = recall_at_k(ranks(image_emb[queries], text_emb, image_ids[queries], text_owners),
                    task.ks)
  t2i = recall_at_k(ranks(text_emb, image_emb, text_owners, image_ids), task.ks)
  results = {f'{task_name}/i2t_recall@{k}': v for k, v in i2t.items()}
  results.update({f'{task_name}/t2i_recall@{k}': v for k, v in t2i.items()})
  results[f'{task_name}/num_images'] = float(len(image_ids))
  results[f'{task_name}/num_texts'] = float(len(text_owners))
  return results


def _max_over_hosts(value: int) -> int:
  if jax.process_count() == 1:
    return value
  from basic import checkpoint  # pylint: disable=g-import-not-at-top
  return int(checkpoint.gather_host_values([value]).max())


# --- The evaluator 'retrieval' (basic.evaluate.EVALUATORS). ---------------------------------------

DEFAULTS = dict(tfds_name='coco_captions', split='test', data_dir='', image_key='image',
                caption_key='captions/text', max_examples=0, ks=(1, 5, 10))


def validate(task, field: str, config):
  """Config-only checks of a retrieval task; ConfigError naming config.<field>.<x>."""
  del task
  from basic import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  evaluate_lib.check_tfds_fields(config, field, ('tfds_name', 'split', 'image_key', 'caption_key'),
                                 ('data_dir',))
  evaluate_lib.check_ks(config, f'{field}.ks')


def evaluate(name: str, task, encoders, params, tokenizer, config, *, state: dict):
  del state
  return evaluate_task(name, task, encoders, params, tokenizer, config)
