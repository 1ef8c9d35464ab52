"""basic.evaluate: data files, the zero-shot TFDS evaluator against NumPy, config errors, CLI."""
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from basic import config_lib
from basic import inference
from basic import metric_writers
from basic.evaluate import metadata
from basic.evaluate import ranking
from basic.evaluate import run
from basic.evaluate import tasks
from basic.models import build as build_model
import eval_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_data_files_counts_and_known_entries():
  names = metadata.class_names('imagenet1k')
  assert len(names) == 1000
  assert (names[0], names[1], names[207], names[999]) == (
      'tench', 'goldfish', 'Golden Retriever', 'toilet paper')
  templates = metadata.templates('clip80')
  assert len(templates) == 80 and len(set(templates)) == 80
  assert templates[0] == 'a bad photo of a {}.' and 'itap of a {}.' in templates
  assert metadata.class_names('cifar10') == (
      'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
  cifar100 = metadata.class_names('cifar100')
  assert len(cifar100) == 100 and cifar100[:2] == ('apple', 'aquarium fish')
  assert cifar100[-1] == 'worm'
  assert len(metadata.templates('clip_cifar')) == 18
  for name, first in (('imagenet_a', 'stingray'), ('imagenet_r', 'goldfish')):
    indices = metadata.subset(name, 1000)
    assert len(indices) == 200 and list(indices) == sorted(set(indices))
    assert 0 <= indices[0] and indices[-1] < 1000
    assert names[indices[0]] == first
  assert names[metadata.subset('imagenet_r')[1]] == 'great white shark'
  assert 'goldfish' not in [names[i] for i in metadata.subset('imagenet_a')]


def test_topk_rule_breaks_ties_by_class_index():
  logits = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.5, 0.2, 0.9]])
  hits = ranking.topk_hits(logits, np.array([0, 1, 0]), np.ones(3, bool), (1, 2))
  assert hits[1].tolist() == [True, False, False]      # == np.argmax's choice.
  assert hits[2].tolist() == [True, True, True]
  masked = ranking.topk_hits(logits, np.array([0, 1, 0]), np.array([True, True, False]), (1,))
  assert masked[1].tolist() == [True, False, True]     # class 2 masked out.
  outside = ranking.topk_hits(logits, np.array([2]), np.array([True, True, False]), (1, 2))
  assert not outside[1][0] and not outside[2][0]       # a label outside the subset is wrong.


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  config, workdir = eval_helpers.trained_run(tmp_path_factory)
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  dataset = eval_helpers.prepare(eval_helpers.BasicTestLabels, data_dir)
  loaded = inference.load(workdir)
  return config, workdir, data_dir, dataset, loaded


def _with_tasks(config, **named_tasks):
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval.zeroshot = False
  for name, task in named_tasks.items():
    config.eval.tasks[name] = task
  return config


def _reference(loaded, names, templates, subset=None):
  """NumPy zero-shot top-1 / top-5 of the labelled test set from the model's embeddings."""
  images, labels, _ = eval_helpers.labelled_examples()
  size = loaded.config.data.image_size
  image_emb = loaded.encode_images(eval_helpers.eval_reference_images(images, size))
  prompts = [t.format(c) for c in names for t in templates]
  text_emb = loaded.encode_texts(prompts).reshape(len(names), len(templates), -1)
  class_emb = text_emb.mean(axis=1)
  class_emb /= np.linalg.norm(class_emb, axis=1, keepdims=True)
  logits = image_emb.astype(np.float64) @ class_emb.T.astype(np.float64)
  allowed = np.zeros(len(names), bool)
  allowed[list(subset) if subset is not None else slice(None)] = True
  logits[:, ~allowed] = -np.inf
  ranked = np.argsort(-logits, axis=1, kind='stable')
  top1 = np.mean(ranked[:, 0] == labels)
  top5 = np.mean(np.any(ranked[:, :5] == labels[:, None], axis=1))
  ordered = np.sort(logits, axis=1)
  margin = float(np.min(ordered[:, -1] - ordered[:, -2]))   # the decisions are not near-ties.
  return float(top1), float(top5), margin


def test_zeroshot_task_matches_numpy_reference(setup, tmp_path):
  config, _, data_dir, dataset, loaded = setup
  names = [n.replace(' ', '_') for n in eval_helpers.labelled_examples()[2]]
  subset = sorted(eval_helpers.CLASSES[:8] + (1, 2))        # 4 labels of the data fall outside.
  subset_file = tmp_path / 'subset.txt'
  subset_file.write_text(''.join(f'{i}\n' for i in subset))
  common = dict(tfds_name=dataset, split='test', data_dir=data_dir, templates='synthetic',
                batch_size=16)   # 24 images: a full and a padded batch.
  config = _with_tasks(
      config, labels=tasks.zeroshot_task(class_names='', **common),
      labels_subset=tasks.zeroshot_task(class_names='', subset=str(subset_file), **common),
      labels_first10=tasks.zeroshot_task(class_names='', max_examples=10, **common))
  config_lib.validate(config)
  results = run.run_evaluators(config, build_model(config), loaded.params, loaded.tokenizer)

  readable = [n.replace('_', ' ') for n in names]             # ClassLabel names, as prompts.
  templates = metadata.templates('synthetic')
  top1, top5, margin = _reference(loaded, readable, templates)
  assert margin > 1e-5
  assert results['labels/top1'] == top1 and results['labels/top5'] == top5
  assert results['labels/num_images'] == eval_helpers.NUM_LABELLED
  assert results['labels/num_classes'] == 48
  top1, top5, margin = _reference(loaded, readable, templates, subset)
  assert margin > 1e-5
  assert results['labels_subset/top1'] == top1 and results['labels_subset/top5'] == top5
  assert results['labels_subset/num_classes'] == len(subset)
  # After 8 steps the 48-way accuracies may be 0 (they are for the tiny default's seed); the
  # 10-way top-5 (0.375) is not, so at least this comparison is not between zeros.
  assert top5 > 0.0
  assert results['labels_first10/num_images'] == 10
  assert set(results) == {f'{t}/{m}' for t in ('labels', 'labels_subset', 'labels_first10')
                          for m in ('top1', 'top5', 'num_images', 'num_classes')}


@pytest.mark.parametrize('field, value, message', [
    ('kind', 'knn', "config.eval.tasks.t.kind='knn': must be one of"),
    ('class_names', 'imagenet', "config.eval.tasks.t.class_names='imagenet': must be one of"),
    ('templates', '', "config.eval.tasks.t.templates='': must not be empty"),
    ('batch_size', 3, 'config.eval.tasks.t.batch_size=3: the evaluation batch'),
    ('ks', (), 'config.eval.tasks.t.ks=()'),
])
def test_config_errors_name_the_field(field, value, message):
  config = _with_tasks(eval_helpers.small_config(), t=tasks.zeroshot_task())
  config.eval.tasks.t[field] = value
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, num_data_devices=2)
  assert message in str(error.value)
  sliced = _with_tasks(eval_helpers.small_config(),
                       t=tasks.zeroshot_task(split='test[:10]', max_examples=5))
  with pytest.raises(config_lib.ConfigError, match='tasks.t.max_examples=5: cannot'):
    config_lib.validate(sliced)


@pytest.mark.parametrize('overrides, message', [
    (dict(tfds_name='no_such_dataset_xyz'), "config.eval.tasks.t.tfds_name='no_such_dataset_xyz'"),
    (dict(label_key='labels'), "config.eval.tasks.t.label_key='labels': no such feature"),
    (dict(label_key='id'), "config.eval.tasks.t.label_key='id': a Tensor feature, not a "),
    (dict(class_names='cifar10'), "config.eval.tasks.t.class_names='cifar10': 10 names, but"),
    (dict(split='validation'), "config.eval.tasks.t.split='validation': not a split"),
])
def test_data_errors_name_the_field(setup, overrides, message):
  config, _, data_dir, dataset, loaded = setup
  task = tasks.zeroshot_task(tfds_name=dataset, split='test', data_dir=data_dir,
                             class_names='', templates='photo')
  task.update(overrides)
  config = _with_tasks(config, t=task)
  with pytest.raises(ValueError) as error:
    run.run_evaluators(config, build_model(config), loaded.params, loaded.tokenizer)
  assert message in str(error.value)


def test_evaluate_checkpoint_reproduces_training_and_keeps_rows(setup, tmp_path):
  config, workdir, data_dir, dataset, _ = setup
  rows = metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  reported = [r for r in rows if 'zeroshot/top1' in r][-1]
  # The checkpoint's own config: the synthetic zero-shot evaluation training ran.
  step, results = run.evaluate_checkpoint(eval_helpers.workdir_checkpoint(workdir))
  assert step == eval_helpers.TRAIN_STEPS
  assert results['zeroshot/top1'] == reported['zeroshot/top1']
  assert results['zeroshot/top5'] == reported['zeroshot/top5']
  # A config with a task; results appended to a copy of the run's metrics.jsonl.
  out = tmp_path / 'out'
  out.mkdir()
  shutil.copy(os.path.join(workdir, 'metrics.jsonl'), out / 'metrics.jsonl')
  config = _with_tasks(config, labels=tasks.zeroshot_task(
      tfds_name=dataset, split='test', data_dir=data_dir, class_names='', templates='photo'))
  step, results = run.evaluate_checkpoint(workdir, config=config, workdir=str(out))
  after = metric_writers.read_jsonl(out / 'metrics.jsonl')
  assert after[:len(rows)] == rows and len(after) == len(rows) + 1
  assert after[-1] == {'step': step, **results} and 'labels/top1' in results
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(out))


@pytest.mark.slow
def test_command_line(setup, tmp_path):
  _, workdir, _, _, _ = setup
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, '-m', 'basic.evaluate', f'--checkpoint={workdir}', f'--workdir={out}'],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '"zeroshot/top1"' in proc.stdout
  rows = metric_writers.read_jsonl(out / 'metrics.jsonl')
  assert rows[-1]['step'] == eval_helpers.TRAIN_STEPS and 'zeroshot/top1' in rows[-1]


@pytest.mark.slow
def test_data_parallel_over_four_devices_matches_one(setup):
  """The same task sharded over 4 (fake CPU) devices gives the single-device results."""
  config, workdir, data_dir, dataset, loaded = setup
  task = dict(tfds_name=dataset, split='test', data_dir=data_dir, class_names='',
              templates='synthetic', batch_size=16)
  config = _with_tasks(config, labels=tasks.zeroshot_task(**task))
  one = run.run_evaluators(config, build_model(config), loaded.params, loaded.tokenizer)
  code = (
      'import json, sys; sys.path.insert(0, "tests")\n'
      'from basic import inference\n'
      'from basic.evaluate import run, tasks\n'
      'from basic.models import build as build_model\n'
      f'loaded = inference.load({workdir!r})\n'
      'config = loaded.config\n'
      'config.eval.zeroshot = False\n'
      f'config.eval.tasks.labels = tasks.zeroshot_task(**{task!r})\n'
      'results = run.run_evaluators(config, build_model(config), loaded.params, loaded.tokenizer)\n'
      'print("RESULTS", json.dumps(results))\n')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  four = json.loads(proc.stdout.split('RESULTS ', 1)[1])
  assert four == one
