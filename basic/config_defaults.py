"""The config schema: every field `basic` reads, with its default, filled in once on load.

`get_config()` is the schema: a ConfigDict of every field with its default, from which the
experiment configs (configs/*.py) derive. The fields of an extension live with it and are read
by name: a tower's are its Model's fields (`basic.models`, `config.model.image.name`), a data
source's its `DEFAULTS` (`basic.data`, `config.data.source`). Fields without a default (a
tower's sizes, `model.embed_dim`) are absent: an experiment config sets them, and
`basic.config_lib.validate` names the ones it lacks.

`fill(config)` completes a config: the schema under it, the defaults of its towers (by name)
under its tower configs, and the names of older versions upgraded (`basic.models.renames`). It
is applied once where a config enters: the experiment configs' `get_config` return it filled,
`basic.checkpoint.Checkpointer.restore_config` fills a checkpoint's (so a checkpoint written
before a field existed reads as if it had the default), and `config_lib.validate` checks a
filled copy. Code then reads `config.x.y` and never `config.get('y', default)`.
"""
import dataclasses
from typing import Any

import ml_collections

import basic.data
from basic import models
from basic.data import mixture as mixture_lib
from basic.models import renames

# The mesh axes the framework names (basic.sharding): -1 = the remaining devices.
_MESH = {'data': -1, 'model': 1}


def get_config() -> ml_collections.ConfigDict:
  """The schema: every field with its default (see the module docstring)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Contrastive batch and its exact gradient-cached execution (see basic/gradcache.py).
  config.batch_size = 256          # N, global over all hosts.
  config.microbatch_size = 256     # m: N % m == 0; N / m microbatches per step.
  config.loss = 'softmax'          # 'softmax' (InfoNCE) | 'sigmoid' (SigLIP).
  # c rows per logit block on each device: -1 = automatic (the largest whose c x N float32
  # buffers fit loss_chunk_budget_mib), 0 = the unchunked N x N reference, c > 0 as given.
  config.loss_chunk_size = -1
  config.loss_chunk_budget_mib = 256   # Per device, for loss_chunk_size = -1 (3 c x N x 4 B).
  # 'sharded': on a mesh, each device computes the loss of its N / P rows against all N
  # (basic.contrastive_sharded); 'replicated': every device computes the whole loss (reference).
  config.loss_sharding = 'sharded'
  # Precision of the logits matmuls: 'highest' (f32) | 'high' | 'default' (one bf16 pass on
  # TPU); measured errors in BENCHMARKS.md, "Loss precision".
  config.loss_precision = 'highest'
  # Microbatches per loop iteration of the gradient-cache passes (same result). 1 on
  # accelerators; on CPU, XLA runs loop bodies slowly, so set it to N / m for small N / m
  # (see BENCHMARKS.md, gradcache).
  config.gradcache_unroll = 1

  config.total_steps = 1500
  # Peak FLOP/s of one device, for train/mfu where basic.flops's chip table does not know the
  # device kind (CPUs, other accelerators); 0 = unknown: train/mfu is then not logged.
  config.peak_flops_per_device = 0.0
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2              # the last K checkpoints ...
  config.keep_checkpoint_every_steps = 0   # ... plus every multiple of M steps forever (0: none).
  # A NaN/inf loss or gradient norm: 'stop' (raise, naming the step and the last good
  # checkpoint) or 'skip' (leave params and optimiser state unchanged; counted in metrics).
  config.on_nonfinite = 'stop'
  config.debug_nan_at_step = 0             # > 0: make that update non-finite (tests the guard).
  # Failures (README, "Checkpoints"): after an exception the run flushes its logs and metrics,
  # waits at most shutdown_timeout_s for an in-flight checkpoint, and exits non-zero; the other
  # processes of a multi-process run notice within peer_poll_s and exit too (status 3). JAX
  # declares a process dead after distributed_heartbeat_timeout_s without a heartbeat; a process
  # that finished waits as long for the others before it exits.
  config.shutdown_timeout_s = 20
  config.peer_poll_s = 1.0
  config.distributed_heartbeat_timeout_s = 100
  # One run per workdir: the lock {workdir}/run.lock is refreshed every workdir_lock_heartbeat_s
  # and taken over by a new run when its owner's process is gone (same host) or its heartbeat is
  # older than workdir_lock_stale_s.
  config.workdir_lock_heartbeat_s = 30
  config.workdir_lock_stale_s = 300
  # Fault injection (tests): raise at that step (> 0) on that process (-1: all); make the
  # checkpoint save of that step (> 0) fail as a full disk would; make process 0 finish that many
  # seconds after the others (a slow final flush).
  config.debug_raise_at_step = 0
  config.debug_raise_process = -1
  config.debug_fail_checkpoint_at_step = 0
  config.debug_finish_delay_s = 0
  # An exponential moving average of the parameters kept in the train state (basic.train
  # EmaTrainState): ema <- d * ema + (1 - d) * params after each update, from the initial
  # parameters, no warmup; evaluated beside them ('zeroshot_ema/top1'), saved in checkpoints,
  # used by basic.inference.load(use_ema=True) and `python -m basic.evaluate --use_ema`.
  # 0 = off (no copy of the parameters); in [0, 1), e.g. 0.999. Fixed for a run's checkpoints.
  config.ema_decay = 0.0
  # A jax.profiler trace of steps (start, count) (step k = the k-th update, as logged), written
  # to {workdir}/profile/plugins/profile/<time>/ (TensorBoard's profile plugin, --logdir=workdir)
  # by process 0, or by every process with profile_all_processes; () = off.
  config.profile_steps = ()
  config.profile_all_processes = False
  # Weights & Biases (`pip install '.[wandb]'`; basic.metric_writers.WandbWriter): process 0 logs
  # the scalars TensorBoard gets, under the same names, at the training step, to one wandb run
  # per workdir (its id kept in {workdir}/wandb_run_id; a restart resumes it). '' = no wandb
  # (nothing imported).
  config.wandb = ml_collections.ConfigDict()
  config.wandb.project = ''
  config.wandb.entity = ''   # The team or user; '' = wandb's default entity.
  config.wandb.name = ''     # The run's display name; '' = wandb's generated name.
  config.wandb.tags = ()     # Strings.
  # 'online' | 'offline' (kept in the wandb dir, `wandb sync` later) | 'disabled'; '' = wandb's
  # own choice (the WANDB_MODE environment variable, `wandb offline`, else online).
  config.wandb.mode = ''
  # A checkpoint (workdir, checkpoints dir or step dir; local or gs://) whose parameters start a
  # new run (the next stage of a recipe, fine-tuning); ignored when the workdir has checkpoints.
  config.init_from = ''
  # The part of config.init_from's checkpoint taken: regexes fully matching '/'-joined parameter
  # paths as the model names them (e.g. ('image/.*', 'image_proj/.*'): the image tower and its
  # projection, LiT); the other parameters keep their fresh initialisation, and the checkpoint's
  # tokenizer is used only if a 'text/...' parameter is taken. A regex matching no parameter is
  # an error. () = all parameters.
  config.init_from_params = ()
  # Locked towers (LiT; OpenCLIP --lock-image / --lock-text): the tower's every parameter,
  # its projection to the joint embedding included, is frozen (as config.optimizer.frozen), except
  # its last `*_unlocked_blocks` blocks (0 = fully locked; their layers as in layer_decay, the
  # final norm / pool / projection then trainable too). A fully locked tower is embedded once per
  # step (no gradient pass). Fixed for a run's checkpoints.
  config.lock_image = False
  config.lock_text = False
  config.lock_image_unlocked_blocks = 0
  config.lock_text_unlocked_blocks = 0

  config.data = _data()

  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.kind = 'sentencepiece'   # 'sentencepiece' | 'clip_bpe'.
  # '' = train a SentencePiece model from the training captions on first use, cached in the
  # workdir; else a path to a .model file (or CLIP's BPE merges file).
  config.tokenizer.model_path = ''
  config.tokenizer.train_sentences = 20000
  config.tokenizer.lowercase = True
  config.tokenizer.add_bos = False
  config.tokenizer.add_eos = True

  config.model = ml_collections.ConfigDict()
  # config.model.embed_dim: the joint embedding's width (no default).
  config.model.dtype = 'float32'         # activation dtype; parameters stay float32.
  config.model.temperature_init = 0.07   # CLIP: logit scale 1/0.07 at init ...
  config.model.temperature_min = 0.01    # ... clipped at 100 (temperature >= 0.01).
  config.model.bias_init = -10.0         # SigLIP logit bias init; used when loss == 'sigmoid'.
  # The towers: a name in basic.models.IMAGE_TOWERS / TEXT_TOWERS, then the fields of its Model
  # (its sizes have no default).
  config.model.image = tower('vit')
  config.model.text = tower('transformer', kind='text')

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adamw'          # 'adamw' | 'adafactorw' (basic/optim.py).
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.schedule = 'cosine'     # warmup then cosine decay to end_lr_ratio * lr.
  config.optimizer.end_lr_ratio = 0.0
  config.optimizer.b1 = 0.9                # Momentum (Adafactor: 0 = none).
  config.optimizer.b2 = 0.98
  config.optimizer.eps = 1e-6
  config.optimizer.weight_decay = 0.05
  config.optimizer.grad_clip_norm = 1.0    # Global-norm clipping; 0 = none.
  # Adafactor only (optax defaults): factored second moments, beta2_t = 1 - t^-decay_rate,
  # update clipping (0 = none), the smallest dimension that is factored.
  config.optimizer.factored = True
  config.optimizer.decay_rate = 0.8
  config.optimizer.clipping_threshold = 1.0
  config.optimizer.min_dim_size_to_factor = 128
  # Frozen parameters (basic/freeze.py): regexes over the '/'-joined parameter path (e.g.
  # 'image/.*', 'text/encoder/block0[0-3]/.*'; 'log_temperature' and the sigmoid 'bias' are
  # top-level), fully matched. A frozen leaf gets no optimiser state, no weight decay, no update,
  # is not in the clipping norm and is not differentiated. () = none.
  config.optimizer.frozen = ()
  # Layer-wise learning-rate decay (BEiT, OpenCLIP): a tower's parameter at layer i of L blocks
  # (embedding 0, block b at b + 1, final norm / pool / projection L + 1) gets lr * d^(L + 1 - i);
  # the temperature and bias d^0. In (0, 1]; 1.0 = off.
  config.optimizer.layer_decay = 1.0
  # Per-group learning-rate multipliers: ((regex, multiplier >= 0), ...) over parameter paths,
  # fully matched, first match wins; unmatched = 1. Multiplies with layer_decay.
  config.optimizer.lr_mults = ()

  config.mesh = ml_collections.ConfigDict(_MESH)

  # Parameter shardings: ordered (regex on the '/'-joined parameter path, spec) rules, first
  # match wins, unmatched = replicated (basic/sharding.py). Experiment configs take their towers'
  # (basic.models.sharding_rules(config.model)). No-ops while config.mesh.model == 1.
  config.sharding = ml_collections.ConfigDict()
  config.sharding.rules = ()
  # FSDP (ZeRO-3): also shard parameters of >= fsdp_min_size elements over 'data'.
  config.sharding.fsdp = False
  config.sharding.fsdp_min_size = 2**18

  config.eval = ml_collections.ConfigDict()
  config.eval.zeroshot = True   # The synthetic data's held-out zero-shot evaluation.
  # Named TFDS evaluation tasks (basic/evaluate/tasks.py), metrics 'NAME/top1', ..., e.g.
  #   config.eval.tasks.imagenet = tasks.zeroshot_task(data_dir='gs://BUCKET/tfds')
  #   config.eval.tasks.coco = tasks.retrieval_task(split='test', data_dir='gs://BUCKET/tfds')
  # with `from basic.evaluate import tasks`; tasks.imagenet_suite(data_dir) gives ImageNet and
  # its distribution shifts (v2, A, R, Sketch) and CIFAR-10/100.
  config.eval.tasks = ml_collections.ConfigDict()
  return config


def _data() -> ml_collections.ConfigDict:
  """config.data: the fields every source shares, then each registered source's DEFAULTS."""
  data = ml_collections.ConfigDict()
  data.source = 'synthetic'  # A name in basic.data.SOURCES: 'synthetic' | 'tfds' | 'mixture' ...
  # Training resolution and caption length (CLIPA-style reduced values are just smaller ones).
  data.image_size = 32
  data.text_length = 16
  # Text token reduction (CLIPA; basic/data/text_mask.py), before tokenisation: keep `length`
  # words (0 = data.text_length) of each caption. kind: 'none' | 'truncate' | 'random' |
  # 'block' | 'syntax' (an approximation: function words dropped first; see text_mask.py).
  data.text_mask = ml_collections.ConfigDict({'kind': 'none', 'length': 0})
  # Per-channel normalisation applied on device to uint8 images (x / 255 - mean) / std.
  data.mean = (0.5, 0.5, 0.5)
  data.std = (0.25, 0.25, 0.25)
  data.threads = 2                  # tf.data worker threads; 0 = all CPU cores.
  data.prefetch = 2                 # batches prepared ahead.
  data.resize_method = 'bilinear'   # 'bilinear' | 'bicubic' | 'area' | 'lanczos3' | ...
  data.antialias = True
  # Training augmentation of decoded images (basic/data/preprocess.py).
  data.augment = ml_collections.ConfigDict()
  data.augment.crop_scale = (0.9, 1.0)     # random resized crop: area fraction (OpenCLIP).
  data.augment.crop_ratio = (3 / 4, 4 / 3)  # ... and aspect ratio w / h.
  data.augment.flip = False                 # captions may say left / right.
  data.augment.erasing_prob = 0.0           # random erasing (uint8 noise), e.g. 0.25.
  data.augment.erasing_scale = (0.02, 1 / 3)  # ... area fraction of the rectangle,
  data.augment.erasing_ratio = (0.3, 3.3)     # ... its aspect ratio h / w.
  # Each source's fields (basic/data/<source>.py DEFAULTS; the record sources share theirs).
  # 'mixture' (basic/data/mixture.py): data.mixture = {} maps names to components, each with
  # `source`, `weight` (no defaults) and its source's DEFAULTS (filled in by `fill`, by name).
  tree = _plain(data)
  for name in basic.data.SOURCES.names():
    tree = _under(tree, getattr(basic.data.SOURCES.get(name), 'DEFAULTS', {}))
  return ml_collections.ConfigDict(tree)


def tower(name: str, *, kind: str = 'image', **fields) -> ml_collections.ConfigDict:
  """A tower config: `name` (in basic.models.IMAGE_TOWERS, or TEXT_TOWERS for kind='text'),
  the defaults of its Model's fields, then `fields`. Fields without a default are left out
  unless given."""
  towers = models.IMAGE_TOWERS if kind == 'image' else models.TEXT_TOWERS
  defaults = {k: _plain(v) for k, v in models.tower_fields(towers.get(name).Model).items()
              if v is not dataclasses.MISSING}
  return ml_collections.ConfigDict({'name': name, **defaults, **fields})


def fill(config: Any) -> ml_collections.ConfigDict:
  """`config` (a ConfigDict or dict) completed: old names upgraded, then every field it lacks
  added from the schema, the fields of its towers from their Models' defaults (by name) and
  those of its data mixture's components from their sources' DEFAULTS (by name).

  A new ConfigDict; the values `config` has are kept as they are.
  """
  tree = renames.upgrade_config(_plain(config))
  schema = _plain(get_config())
  model = tree.get('model', {})
  for kind in ('image', 'text'):   # A tower's schema is its own Model's, by name.
    node = model.get(kind)
    if isinstance(node, dict) and 'name' in node:
      towers = models.IMAGE_TOWERS if kind == 'image' else models.TEXT_TOWERS
      if node['name'] in towers:
        schema['model'][kind] = _plain(tower(node['name'], kind=kind))
      else:   # Unknown: left for validate to name.
        schema['model'][kind] = {}
  mixture = tree.get('data', {}).get('mixture')
  if isinstance(mixture, dict):   # A mixture component's schema is its source's, by name.
    schema['data']['mixture'] = {
        name: _plain(mixture_lib.component_defaults(node['source']))
        for name, node in mixture.items() if isinstance(node, dict)
        and node.get('source') in basic.data.SOURCES and node['source'] != 'mixture'}
  return ml_collections.ConfigDict(_under(tree, schema))


def _plain(value):
  """ConfigDicts and mappings -> dicts (recursively); other values as they are."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if hasattr(value, 'items'):
    return {k: _plain(v) for k, v in value.items()}
  return value


def _under(values: dict, defaults: dict) -> dict:
  """`values` with the keys it lacks taken from `defaults`, recursively into dicts."""
  out = dict(values)
  for key, default in defaults.items():
    if key not in out:
      out[key] = _plain(default)
    elif isinstance(out[key], dict) and isinstance(default, dict):
      out[key] = _under(out[key], default)
  return out

