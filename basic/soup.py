r"""Model soups: average the parameters of several checkpoints (Wortsman et al., 2022).

  python -m basic.soup --checkpoints=A,B,... --output=DIR [--method=uniform|greedy]

Each of A, B, ... is a training workdir or a checkpoints directory (its latest step is used), or
one step directory (`.../checkpoints/12000`), local or gs://. All must hold the same parameter
tree. The soup is written as a params-only checkpoint in DIR (step = the largest ingredient step),
with the config and tokenizer of the first ingredient, so `basic.inference.load(DIR)` and
`--config.init_from=DIR` read it like any checkpoint.

  uniform: the mean of all ingredients (the OpenCLIP ConvNeXt-XXLarge soup averaged its main run
    and its last-10% rewind this way).
  greedy: ingredients sorted by the held-out metric, best first; each is added to the soup if the
    metric of the average does not drop (Wortsman et al., Recipe 1). The metric is zero-shot
    top-1 of the first ingredient's config (`basic.evaluate.synthetic`).

Averaging is done in float64 on the host and cast back to each parameter's dtype.
"""
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from basic import checkpoint as checkpoint_lib

METHODS = ('uniform', 'greedy')


def average(trees: Sequence) -> dict:
  """The element-wise mean of parameter trees of identical structure (float64 accumulation)."""
  structures = {jax.tree.structure(t) for t in trees}
  if len(structures) != 1:
    raise ValueError(f'The checkpoints hold different parameter trees: {structures}.')
  return jax.tree.map(
      lambda *xs: np.mean([np.asarray(x, np.float64) for x in xs], axis=0).astype(
          np.asarray(xs[0]).dtype), *trees)


def greedy(trees: Sequence, metric: Callable[[dict], float]) -> tuple[dict, list[int]]:
  """Greedy soup: -> (params, indices of the ingredients used, in the order added).

  `metric(params)` is higher-is-better on held-out data.
  """
  scores = [metric(t) for t in trees]
  order = sorted(range(len(trees)), key=lambda i: -scores[i])
  used, best = [order[0]], scores[order[0]]
  for i in order[1:]:
    score = metric(average([trees[j] for j in used + [i]]))
    logging.info('Greedy soup: + ingredient %d -> %.4f (soup so far %.4f).', i, score, best)
    if score >= best:
      used, best = used + [i], score
  return average([trees[j] for j in used]), used


class Ingredient:
  """One checkpoint step: its params, config and tokenizer (model file and kind)."""

  def __init__(self, path: str):
    with checkpoint_lib.open_step(path) as (ckpt, self.step):
      self.path = path
      self.params = ckpt.restore_params(self.step)
      self.config = ckpt.restore_config(self.step)
      self.tokenizer_model = ckpt.restore_tokenizer(self.step)
      self.tokenizer_kind = ckpt.restore_tokenizer_kind(self.step) or 'sentencepiece'


def zeroshot_metric(config, tokenizer_model: bytes) -> Callable[[dict], float]:
  """params -> zero-shot top-1 on the held-out split of `config`'s data (`tokenizer_model`: the
  model file of config.tokenizer.kind)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from basic import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from basic import sharding  # pylint: disable=g-import-not-at-top
  from basic.data import pipeline  # pylint: disable=g-import-not-at-top
  from basic.evaluate import encoders as encoders_lib  # pylint: disable=g-import-not-at-top
  from basic.evaluate import synthetic  # pylint: disable=g-import-not-at-top
  from basic import models  # pylint: disable=g-import-not-at-top
  with tempfile.NamedTemporaryFile(suffix='.model', delete=False) as f:
    f.write(tokenizer_model)
  tokenizer = tokenizer_lib.make_tokenizer(config.tokenizer, f.name, config.data.text_length)
  model, data = models.build(config), pipeline.make_zeroshot_data(config)
  # The soup's parameters live on this process's first device.
  mesh = sharding.make_mesh({'data': 1, 'model': 1}, jax.devices()[:1])
  encoders = encoders_lib.Encoders(model, mesh, config.microbatch_size)
  return lambda params: synthetic.evaluate_data(encoders, params, tokenizer,
                                                data)['zeroshot/top1']


def make_soup(paths: Sequence[str], output: str, method: str = 'uniform',
              metric: Optional[Callable[[dict], float]] = None) -> dict:
  """Averages the checkpoints at `paths` into a params-only checkpoint at `output`.

  Returns:
    {'step': int, 'used': [paths in the soup], 'path': output}.
  """
  if method not in METHODS:
    raise ValueError(f'--method={method!r}: must be one of {METHODS}.')
  if len(paths) < 2:
    raise ValueError(f'A soup needs at least 2 checkpoints, got {list(paths)}.')
  ingredients = [Ingredient(p) for p in paths]
  first = ingredients[0]
  config, tokenizer_model, tokenizer_kind = (first.config, first.tokenizer_model,
                                             first.tokenizer_kind)
  trees = [x.params for x in ingredients]
  if method == 'uniform':
    params, used = average(trees), list(range(len(trees)))
  else:
    if metric is None:
      if tokenizer_model is None:
        raise ValueError(f'{paths[0]} holds no tokenizer: the greedy metric needs one.')
      metric = zeroshot_metric(config, tokenizer_model)
    params, used = greedy(trees, metric)
  step = max(x.step for x in ingredients)
  out = checkpoint_lib.Checkpointer(output, async_save=False)
  out.save(step, {'params': params}, config,
           data={'soup': [f'{ingredients[i].path}@{ingredients[i].step}' for i in used]},
           tokenizer_model=tokenizer_model, tokenizer_kind=tokenizer_kind)
  out.wait()
  out.close()
  return {'step': step, 'used': [paths[i] for i in used], 'path': out.directory}


_CHECKPOINTS = flags.DEFINE_list('checkpoints', None, 'Comma list of checkpoints to average.')
_OUTPUT = flags.DEFINE_string('output', None, 'Directory to write the soup checkpoint to.')
_METHOD = flags.DEFINE_enum('method', 'uniform', METHODS, 'uniform or greedy.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _CHECKPOINTS.value or not _OUTPUT.value:
    raise app.UsageError('--checkpoints=A,B,... and --output=DIR are required.')
  result = make_soup(_CHECKPOINTS.value, _OUTPUT.value, _METHOD.value)
  print(f"Soup of {len(result['used'])} checkpoints ({', '.join(result['used'])}) written to "
        f"{result['path']} step {result['step']}.")


if __name__ == '__main__':
  app.run(main)
