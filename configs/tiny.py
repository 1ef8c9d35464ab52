"""The embedded default: a 0.43M-parameter dual encoder trained on CPU in about 7 minutes.

Trains on the built-in synthetic shapes dataset (no download), evaluates zero-shot on colour x
shape combinations that never occur in training, among all combinations.

  python -m basic.train --config=configs/tiny.py --workdir=/tmp/basic_tiny
  python -m basic.train --config=configs/tiny.py --workdir=/tmp/x --config.total_steps=50
"""
import ml_collections


def get_config(arg=None):
  del arg  # The tiny config takes no argument string.
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
  # declares a process dead after distributed_heartbeat_timeout_s without a heartbeat.
  config.shutdown_timeout_s = 20
  config.peer_poll_s = 1.0
  config.distributed_heartbeat_timeout_s = 100
  # One run per workdir: the lock {workdir}/run.lock is refreshed every workdir_lock_heartbeat_s
  # and taken over by a new run when its owner's process is gone (same host) or its heartbeat is
  # older than workdir_lock_stale_s.
  config.workdir_lock_heartbeat_s = 30
  config.workdir_lock_stale_s = 300
  # Fault injection (tests): raise at that step (> 0) on that process (-1: all); make the
  # checkpoint save of that step (> 0) fail as a full disk would.
  config.debug_raise_at_step = 0
  config.debug_raise_process = -1
  config.debug_fail_checkpoint_at_step = 0
  # A checkpoint (workdir, checkpoints dir or step dir; local or gs://) whose parameters start a
  # new run (the next stage of a recipe, fine-tuning); ignored when the workdir has checkpoints.
  config.init_from = ''

  # Input pipeline (basic/data/pipeline.py). Your own data: --config.data.source=tfrecord
  # --config.data.tfrecord_pattern='/data/shards/*.tfrecord' (img2dataset's schema, or
  # `python -m basic.data.write_tfrecords`), or --config.data.source=tfds
  # --config.data.tfds_name=NAME --config.data.data_dir=DIR, plus a tokenizer
  # (python -m basic.tokenizer train --config=...).
  config.data = ml_collections.ConfigDict()
  config.data.source = 'synthetic'         # 'synthetic' | 'tfds' | 'tfrecord'
  # Training resolution and caption length (CLIPA-style reduced values are just smaller ones).
  config.data.image_size = 32
  config.data.text_length = 16
  # Text token reduction (CLIPA; basic/data/text_mask.py), before tokenisation: keep `length`
  # words (0 = data.text_length) of each caption. kind: 'none' | 'truncate' | 'random' |
  # 'block' | 'syntax' (an approximation: function words dropped first; see text_mask.py).
  config.data.text_mask = ml_collections.ConfigDict()
  config.data.text_mask.kind = 'none'
  config.data.text_mask.length = 0
  # Per-channel normalisation applied on device to uint8 images (x / 255 - mean) / std.
  config.data.mean = (0.5, 0.5, 0.5)
  config.data.std = (0.25, 0.25, 0.25)
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.seed = 0
  config.data.synthetic.num_heldout = 10   # colour x shape combinations kept out of training.
  config.data.synthetic.eval_per_class = 50
  # TFDS source: a prepared data set by name ('name', 'name/config', 'name:1.0.0'), its split
  # (slices allowed, 'train[:90%]') and the data dir ('' = TFDS's default; may be gs://).
  config.data.tfds_name = ''
  config.data.tfds_split = 'train'
  config.data.data_dir = ''
  # TFRecord source: a glob or comma-separated globs of tf.train.Example shards (may be gs://).
  config.data.tfrecord_pattern = ''
  # Feature names of the image bytes and the caption(s); '' = the source's default: 'jpg' and
  # 'txt' (img2dataset) for tfrecord, 'image' and 'caption' for tfds. A text feature holding a
  # list of captions (COCO: text_key='captions/text') gives one caption per example per epoch.
  config.data.image_key = ''
  config.data.text_key = ''
  # tfds / tfrecord stream: shuffling and augmentation are drawn from this seed.
  config.data.seed = 0
  config.data.shuffle_buffer = 10_000      # records; 0 = no record shuffling (files still are).
  config.data.cycle_length = 16            # files read at a time (interleaved record by record).
  config.data.cache = False                # keep this host's raw records in memory (small data).
  config.data.threads = 2                  # tf.data worker threads; 0 = all CPU cores.
  config.data.prefetch = 2                 # batches prepared ahead.
  config.data.resize_method = 'bilinear'   # 'bilinear' | 'bicubic' | 'area' | 'lanczos3' | ...
  config.data.antialias = True
  # Training augmentation of tfds / tfrecord images (basic/data/preprocess.py).
  config.data.augment = ml_collections.ConfigDict()
  config.data.augment.crop_scale = (0.9, 1.0)     # random resized crop: area fraction (OpenCLIP).
  config.data.augment.crop_ratio = (3 / 4, 4 / 3)  # ... and aspect ratio w / h.
  config.data.augment.flip = False                 # captions may say left / right.
  config.data.augment.erasing_prob = 0.0           # random erasing (uint8 noise), e.g. 0.25.
  config.data.augment.erasing_scale = (0.02, 1 / 3)  # ... area fraction of the rectangle,
  config.data.augment.erasing_ratio = (0.3, 3.3)     # ... its aspect ratio h / w.

  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.kind = 'sentencepiece'
  # '' = train a SentencePiece model from the synthetic captions on first use, cached in the
  # workdir; else a path to a .model file.
  config.tokenizer.model_path = ''
  config.tokenizer.train_sentences = 20000
  config.tokenizer.lowercase = True
  config.tokenizer.add_bos = False
  config.tokenizer.add_eos = True

  config.model = ml_collections.ConfigDict()
  config.model.embed_dim = 64
  config.model.dtype = 'float32'         # activation dtype; parameters stay float32.
  config.model.temperature_init = 0.07   # CLIP: logit scale 1/0.07 at init ...
  config.model.temperature_min = 0.01    # ... clipped at 100 (temperature >= 0.01).
  config.model.bias_init = -10.0         # SigLIP logit bias init; used when loss == 'sigmoid'.
  config.model.image = ml_collections.ConfigDict()
  config.model.image.name = 'vit'
  config.model.image.patch_size = 8       # 16 tokens of 8x8 px at 32 px.
  config.model.image.width = 96
  config.model.image.depth = 3
  config.model.image.num_heads = 4       # 24-dim heads; 4 heads split over a model axis of 2 or 4.
  config.model.image.mlp_dim = 192
  config.model.image.pool = 'gap'          # 'gap' | 'cls'
  config.model.image.dropout = 0.0
  config.model.image.remat = 'none'
  config.model.image.scan_layers = False  # True: one nn.scan over the blocks (basic.models.scan).
  # Image token reduction in training (ViT only; basic/models/vit.py): drop `ratio` of the patch
  # tokens per example. kind: 'none' | 'random' | 'grid' | 'block' (cells of `cell` x `cell`).
  config.model.image.mask = ml_collections.ConfigDict()
  config.model.image.mask.kind = 'none'
  config.model.image.mask.ratio = 0.0
  config.model.image.mask.cell = 2
  config.model.text = ml_collections.ConfigDict()
  config.model.text.name = 'transformer'
  config.model.text.vocab_size = 256
  config.model.text.width = 96
  config.model.text.depth = 2
  config.model.text.num_heads = 4
  config.model.text.mlp_dim = 192
  config.model.text.causal = False
  config.model.text.pool = 'mean'          # 'mean' (over non-pad) | 'eos' (last non-pad) | 'first'
  config.model.text.dropout = 0.0
  config.model.text.remat = 'none'
  config.model.text.scan_layers = False  # True: one nn.scan over the blocks (basic.models.scan).

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.schedule = 'cosine'     # warmup then cosine decay to end_lr_ratio * lr.
  config.optimizer.end_lr_ratio = 0.0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.98
  config.optimizer.eps = 1e-6
  config.optimizer.weight_decay = 0.05
  config.optimizer.grad_clip_norm = 1.0

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1   # -1: all remaining devices.
  config.mesh.model = 1

  # Parameter shardings: ordered (regex on the '/'-joined parameter path, spec) rules, first
  # match wins, unmatched = replicated (basic/sharding.py). Megatron-style tensor parallelism
  # over 'model': attention heads and the MLP hidden dimension are split, so each block needs
  # one all-reduce after attention and one after the MLP. No-ops while config.mesh.model == 1.
  config.sharding = ml_collections.ConfigDict()
  config.sharding.rules = (
      ('attn/(query|key|value)/kernel$', (None, 'model', None)),  # [D, heads, D/heads]
      ('attn/(query|key|value)/bias$', ('model', None)),          # [heads, D/heads]
      ('attn/out/kernel$', ('model', None, None)),                # [heads, D/heads, D]
      ('mlp/Dense_0/kernel$', (None, 'model')),                   # [D, mlp_dim]
      ('mlp/Dense_0/bias$', ('model',)),                          # [mlp_dim]
      ('mlp/Dense_1/kernel$', ('model', None)),                   # [mlp_dim, D]
      ('token_embedding/embedding$', ('model', None)),            # [vocab, D]
  )
  # FSDP (ZeRO-3): also shard parameters of >= fsdp_min_size elements over 'data'.
  config.sharding.fsdp = False
  config.sharding.fsdp_min_size = 2**18

  config.eval = ml_collections.ConfigDict()
  config.eval.zeroshot = True
  # Named TFDS evaluation tasks (basic/evaluate/tasks.py), metrics 'NAME/top1', ..., e.g.
  #   config.eval.tasks.imagenet = tasks.zeroshot_task(data_dir='gs://BUCKET/tfds')
  #   config.eval.tasks.coco = tasks.retrieval_task(split='test', data_dir='gs://BUCKET/tfds')
  # with `from basic.evaluate import tasks`; tasks.imagenet_suite(data_dir) gives ImageNet and
  # its distribution shifts (v2, A, R, Sketch) and CIFAR-10/100.
  config.eval.tasks = ml_collections.ConfigDict()
  return config
