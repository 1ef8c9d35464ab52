"""basic.evaluate.retrieval: ranks with ties against a brute-force reference; a TFDS task; the
evaluators on two processes."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import data_helpers
import eval_helpers
from basic import config_lib
from basic import inference
from basic.evaluate import retrieval
from basic.evaluate import run
from basic.evaluate import tasks
from basic.models import build as build_model
from launch import local as launch_local


def brute_force_ranks(query_emb, candidate_emb, query_ids, candidate_ids):
  """Per query: sort the candidates by score, ties with negatives first (ties count against the
  query); the rank is the position of the first positive (len(candidates) if none)."""
  out = []
  for q in range(len(query_emb)):
    entries = []
    for c in range(len(candidate_emb)):
      score = float(np.dot(query_emb[q], candidate_emb[c]))
      entries.append((-score, candidate_ids[c] == query_ids[q]))   # False (negative) first.
    order = sorted(entries)
    positions = [i for i, (_, positive) in enumerate(order) if positive]
    out.append(positions[0] if positions else len(candidate_emb))
  return np.array(out)


def test_ranks_with_ties_equal_brute_force():
  rng = np.random.default_rng(0)
  # Small integer vectors: many exact ties between positives and negatives.
  images = rng.integers(-1, 2, size=(9, 3)).astype(np.float32)
  owners = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7, 7])   # image 8 has no caption.
  texts = rng.integers(-1, 2, size=(len(owners), 3)).astype(np.float32)
  texts[1] = texts[4]                                          # a duplicate caption.
  image_ids = np.arange(9)
  for chunk in (1, 4, 1024):
    i2t = retrieval.ranks(images, texts, image_ids, owners, chunk_size=chunk)
    np.testing.assert_array_equal(i2t, brute_force_ranks(images, texts, image_ids, owners))
    t2i = retrieval.ranks(texts, images, owners, image_ids, chunk_size=chunk)
    np.testing.assert_array_equal(t2i, brute_force_ranks(texts, images, owners, image_ids))
  assert i2t[8] == len(texts)                                  # no positive: never a hit.
  ties = brute_force_ranks(images, texts, image_ids, owners)
  assert len(set(ties.tolist())) > 2
  recall = retrieval.recall_at_k(t2i, (1, 5, 10))
  assert recall == {k: float(np.mean(t2i < k)) for k in (1, 5, 10)}


def test_tie_rule_on_a_hand_made_case():
  query = np.array([[1.0, 0.0]])
  candidates = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])   # positive 0 ties negative 1.
  rank = retrieval.ranks(query, candidates, np.array([0]), np.array([0, 1, 2]))
  assert rank.tolist() == [1]                                       # the tie counts against.
  assert retrieval.recall_at_k(rank, (1, 2)) == {1: 0.0, 2: 1.0}
  # A model that scores everything alike retrieves nothing at k=1 (not everything).
  same = np.ones((4, 2)) / np.sqrt(2)
  ranks = retrieval.ranks(same, same, np.arange(4), np.arange(4))
  assert ranks.tolist() == [3, 3, 3, 3]
  # Several positives: the best one counts.
  rank = retrieval.ranks(query, np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]),
                         np.array([7]), np.array([7, 3, 7]))
  assert rank.tolist() == [0]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  config, workdir = eval_helpers.trained_run(tmp_path_factory)
  data_dir = str(tmp_path_factory.mktemp('tfds_captions'))
  dataset = data_helpers.prepare(data_helpers.BasicTestMultiCaptions, data_dir)
  return config, data_dir, dataset, inference.load(workdir)


def test_retrieval_task_matches_brute_force(setup):
  config, data_dir, dataset, loaded = setup
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval.zeroshot = False
  config.eval.tasks.captions = tasks.retrieval_task(
      tfds_name=dataset, split='train', data_dir=data_dir, batch_size=16)   # 24 images, 72 texts
  config.eval.tasks.first10 = tasks.retrieval_task(
      tfds_name=dataset, split='train', data_dir=data_dir, batch_size=16, max_examples=10,
      ks=(1,))
  config_lib.validate(config)
  results = run.run_evaluators(config, build_model(config), loaded.params, loaded.tokenizer)

  n, k = data_helpers.NUM_EXAMPLES, data_helpers.NUM_CAPTIONS
  images, names = data_helpers.images_and_names(n)
  size = config.data.image_size
  image_emb = loaded.encode_images(eval_helpers.eval_reference_images(images, size))
  captions = [data_helpers.multi_caption(i, j, names) for i in range(n) for j in range(k)]
  owners = np.repeat(np.arange(n), k)
  # Captions that tokenise alike share one embedding, as in the evaluator (here the digits are
  # unknown to the tokenizer: 18 distinct token sequences among the 72 captions).
  unique, inverse = np.unique(loaded.tokenizer.encode(captions), axis=0, return_inverse=True)
  encode_text = jax.jit(lambda p, t: build_model(config).apply({'params': p}, t,
                                                              method='encode_text'))
  text_emb = np.asarray(encode_text(loaded.params, unique))[inverse.reshape(-1)]
  i2t = brute_force_ranks(image_emb, text_emb, np.arange(n), owners)
  t2i = brute_force_ranks(text_emb, image_emb, owners, np.arange(n))
  for q in (1, 5, 10):
    assert results[f'captions/i2t_recall@{q}'] == np.mean(i2t < q)
    assert results[f'captions/t2i_recall@{q}'] == np.mean(t2i < q)
  assert results['captions/num_images'] == n and results['captions/num_texts'] == n * k
  assert 0 < results['captions/t2i_recall@10'] < 1     # neither trivial nor degenerate.
  assert results['first10/num_images'] == 10 and results['first10/num_texts'] == 10 * k
  recalls = {f'captions/{d}_recall@{q}' for d in ('i2t', 't2i') for q in (1, 5, 10)}
  assert set(results) == recalls | {
      'captions/num_images', 'captions/num_texts', 'first10/i2t_recall@1',
      'first10/t2i_recall@1', 'first10/num_images', 'first10/num_texts'}


def test_caption_key_errors_name_the_field(setup):
  config, data_dir, dataset, loaded = setup
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval.zeroshot = False
  config.eval.tasks.t = tasks.retrieval_task(tfds_name=dataset, split='train',
                                             data_dir=data_dir, caption_key='captions/txt')
  with pytest.raises(ValueError, match="config.eval.tasks.t.caption_key='captions/txt': no such "
                     'feature .*captions/text'):
    run.run_evaluators(config, build_model(config), loaded.params, loaded.tokenizer)
  config.eval.tasks.t.caption_key = 'id'
  with pytest.raises(ValueError, match="caption_key='id': a Tensor feature, not Text"):
    run.run_evaluators(config, build_model(config), loaded.params, loaded.tokenizer)


# Runs every kind of evaluator (the synthetic held-out zero-shot, a TFDS zero-shot task, a TFDS
# retrieval task) on the mesh of all devices and prints the results. argv: JSON of the run's
# workdir, the two data sets, the coordinator address ('' = one process), processes, process id.
_EVAL_WORKER = r'''
import json, sys
args = json.loads(sys.argv[1])
from basic import multihost
if args['coordinator']:
  multihost.initialize(args['coordinator'], args['num_processes'], args['process_id'])
import jax
from basic import inference
from basic.evaluate import run, tasks
from basic.models import build as build_model
loaded = inference.load(args['workdir'])
config = loaded.config
config.eval.zeroshot = True
# Uneven host shares: 23 labelled images -> 12 + 11, 19 captioned ones -> 10 + 9 (local batch 4).
config.eval.tasks.labels = tasks.zeroshot_task(
    tfds_name=args['labels'], data_dir=args['labels_dir'], split='test[:23]', class_names='',
    templates='synthetic', batch_size=8)
config.eval.tasks.captions = tasks.retrieval_task(
    tfds_name=args['captions'], data_dir=args['captions_dir'], split='train[:19]', batch_size=8)
results = run.run_evaluators(config, build_model(config), loaded.params, loaded.tokenizer)
print('RESULTS', jax.process_index(), jax.device_count(), json.dumps(results, sort_keys=True))
'''


def _results(stdout: str) -> dict:
  """{process index: (global devices, results)} from the workers' RESULTS lines."""
  out = {}
  for line in stdout.splitlines():
    if 'RESULTS ' in line:
      index, devices, results = line.split('RESULTS ', 1)[1].split(' ', 2)
      out[int(index)] = (int(devices), json.loads(results))
  return out


def test_two_processes_evaluate_like_one(setup, tmp_path_factory):
  """2 processes x 2 CPU devices (jax.distributed, gloo) give exactly the results of 1 process
  x 4 devices, on every host, with uneven host shares of the TFDS splits."""
  config, captions_dir, captions, loaded = setup
  del config, loaded
  labels_dir = str(tmp_path_factory.mktemp('tfds_labels'))
  labels = eval_helpers.prepare(eval_helpers.BasicTestLabels, labels_dir)
  workdir = eval_helpers.trained_run(tmp_path_factory)[1]
  args = dict(workdir=workdir, labels=labels, labels_dir=labels_dir, captions=captions,
              captions_dir=captions_dir, coordinator='', num_processes=1, process_id=0)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(launch_local.__file__)))
  one = subprocess.run([sys.executable, '-c', _EVAL_WORKER, json.dumps(args)],
                       env=launch_local.process_env(4), cwd=repo, capture_output=True, text=True,
                       timeout=600)
  assert one.returncode == 0, one.stderr[-5000:]
  coordinator = f'127.0.0.1:{launch_local.free_port()}'
  procs = [subprocess.Popen(
      [sys.executable, '-c', _EVAL_WORKER,
       json.dumps({**args, 'coordinator': coordinator, 'num_processes': 2, 'process_id': i})],
      env=launch_local.process_env(2), cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-5000:]

  (reference_devices, reference), = _results(one.stdout).values()
  assert reference_devices == 4
  assert reference['labels/num_images'] == 23 and reference['captions/num_images'] == 19
  assert reference['captions/num_texts'] == 19 * data_helpers.NUM_CAPTIONS
  assert reference['zeroshot/num_images'] > 0
  for index, (stdout, _) in enumerate(outs):
    devices, results = _results(stdout)[index]
    assert devices == 4
    assert results == reference, (index, results, reference)
