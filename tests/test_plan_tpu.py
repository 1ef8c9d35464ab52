"""basic.plan with the TPU compiler (libtpu, the `tpu` extra), loop-aware FLOPs, model FLOPs, MFU.

The TPU tests compile for a topology on this CPU-only machine and are skipped when libtpu is
not importable; the FLOPs and MFU tests run on the CPU.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from basic import flops
from basic import metric_writers
from basic import optim
from basic import plan
from basic import train
from basic.models import build as build_model
from configs import basic_l
from configs import tiny
import config_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATMUL = 2 * 128 * 256 * 256     # FLOPs of one [128, 256] x [256, 256] matmul.


def _has_libtpu():
  try:
    import libtpu  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


needs_libtpu = pytest.mark.skipif(not _has_libtpu(), reason='libtpu (the `tpu` extra) missing')


def _scans(device):
  """Loop-aware and XLA FLOPs of a 10-step scan and of a 5 x (3-step scan + 1) nested scan of
  one matmul each, compiled for `device`, in units of one matmul."""
  def scan10(w, x):
    return jax.lax.scan(lambda x, _: (x @ w, None), x, None, length=10)[0]

  def nested(w, x):
    def outer(x, _):
      return jax.lax.scan(lambda x, _: (x @ w, None), x, None, length=3)[0] @ w, None
    return jax.lax.scan(outer, x, None, length=5)[0]

  place = jax.sharding.SingleDeviceSharding(device)
  w = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=place)
  x = jax.ShapeDtypeStruct((128, 256), jnp.float32, sharding=place)
  out = {}
  for fn in (scan10, nested):
    compiled = jax.jit(fn).lower(w, x).compile()
    cost = flops.hlo_cost(compiled)
    assert not cost['unresolved_loops'], cost
    out[fn.__name__] = (cost['flops'] / MATMUL, compiled.cost_analysis()['flops'] / MATMUL)
  return out


def test_scan_bodies_counted_by_trip_count_cpu():
  """XLA counts a loop body once (1 matmul for 10); hlo_cost counts 10, and 5 x (3 + 1) = 20."""
  out = _scans(jax.devices('cpu')[0])
  assert out['scan10'][1] == pytest.approx(1.0, rel=1e-6)   # XLA's own count: the body once.
  assert out['scan10'][0] == pytest.approx(10.0, rel=1e-6)
  assert out['nested'][0] == pytest.approx(20.0, rel=1e-6)


@needs_libtpu
def test_scan_bodies_counted_by_trip_count_tpu():
  """The TPU compiler annotates no trip count: hlo_cost reads it off the loop condition."""
  out = _scans(plan.tpu_devices('v5p:2x2x1')[0])
  assert out['scan10'][1] < 1.01                               # XLA: the body once.
  assert out['scan10'][0] == pytest.approx(10.0, rel=0.01)     # (+ a few converts)
  assert out['nested'][0] == pytest.approx(20.0, rel=0.01)


# A while loop whose body XLA unrolled twice (TPU loop double-buffering): the counter goes up by
# 2 per pass, so `i < 9` from 0 runs the body ceil(9 / 2) = 5 times (2 dots of 2 x 8^3 FLOPs
# each); reading the trip count off the condition alone gives 9.
_STEP2_HLO = """
HloModule step2

body {
  p = (s32[], f32[8,8]) parameter(0)
  i = s32[] get-tuple-element(p), index=0
  x = f32[8,8] get-tuple-element(p), index=1
  d1 = f32[8,8] dot(x, x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  d2 = f32[8,8] dot(d1, d1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  one = s32[] constant(1)
  i1 = s32[] add(i, one)
  i2 = s32[] add(one, i1)
  ROOT t = (s32[], f32[8,8]) tuple(STEP, d2)
}

cond {
  p = (s32[], f32[8,8]) parameter(0)
  i = s32[] get-tuple-element(p), index=0
  n = s32[] constant(9)
  ROOT lt = pred[] compare(i, n), direction=LT
}

ENTRY main {
  x = f32[8,8] parameter(0)
  zero = s32[] constant(0)
  init = (s32[], f32[8,8]) tuple(zero, x)
  w = (s32[], f32[8,8]) while(init), condition=cond, body=body
  ROOT r = f32[8,8] get-tuple-element(w), index=1
}
"""


def test_trip_count_of_a_body_unrolled_twice():
  """The loop counter's step is read off the body: +2 per pass gives 5 trips of `i < 9` (10
  dots), +1 gives 9 (18 dots); a counter raised by a non-constant is unresolved (counted once)."""
  import jaxlib._hlo as hlo  # pylint: disable=g-import-not-at-top
  dot = 2 * 8**3
  text = lambda step: hlo.hlo_module_from_text(_STEP2_HLO.replace('STEP', step)).to_string()
  twice = flops.hlo_text_cost(text('i2'))
  assert twice['loops'] == [('body', 5)] and twice['flops'] == pytest.approx(10 * dot, rel=0.01)
  once = flops.hlo_text_cost(text('i1'))
  assert once['loops'] == [('body', 9)] and once['flops'] == pytest.approx(9 * 2 * dot, rel=0.01)
  unknown = flops.hlo_text_cost(text('i2').replace('add(%one, %i1)', 'add(%i1, %i1)'))
  assert unknown['loops'] == [] and unknown['unresolved_loops'] == ['body']
  assert unknown['flops'] == pytest.approx(2 * dot, rel=0.01)


def _config(**fields):
  return config_helpers.tiny_config(fields)


_LOOPS = {'model.image.depth': 1, 'model.text.depth': 1, 'batch_size': 64,
          'microbatch_size': 16, 'loss_chunk_size': 16}   # K = 4 microbatches, 4 loss chunks.


def test_step_flops_count_microbatch_and_loss_loops():
  """The gradient-cached step with K = 4 microbatches and a chunked loss (5 loops of 4 trips):
  XLA's own count (loop bodies once) is below half of hlo_cost's, and hlo_cost's is 4/3 of
  the model FLOPs (pass 1 of the gradient cache recomputes the forward), 1.2-1.5 with the
  optimiser and the loss's recomputed logits. Counting a loop body once would give ~1/3."""
  cpu = jax.devices('cpu')[:1]
  looped, abstract, model, _ = plan.compile_step(_config(**_LOOPS), cpu)
  cost = flops.hlo_cost(looped)
  assert [trip for _, trip in cost['loops']] == [4] * 5 and not cost['unresolved_loops']
  assert looped.cost_analysis()['flops'] < 0.5 * cost['flops']
  model_flops = flops.model_flops(_config(**_LOOPS), abstract.params,
                                  encode_fn=train.make_encode_fn(model),
                                  make_loss_fn=train.make_loss_fn, init_batch=train.init_batch)
  assert 1.2 < cost['flops'] / model_flops < 1.5


@pytest.mark.slow
def test_step_flops_equal_with_microbatch_loops_unrolled():
  """The same step with its microbatch loops unrolled (gradcache_unroll = K, only the loss
  loops left): the FLOPs agree within 5% (measured 2.7%: XLA shares some work between unrolled
  microbatches)."""
  cpu = jax.devices('cpu')[:1]
  looped = flops.hlo_cost(plan.compile_step(_config(**_LOOPS), cpu)[0])
  unrolled = flops.hlo_cost(plan.compile_step(_config(gradcache_unroll=4, **_LOOPS), cpu)[0])
  assert len(looped['loops']) > len(unrolled['loops']) >= 1
  assert looped['flops'] == pytest.approx(unrolled['flops'], rel=0.05)


# Image depth 3 and text depth 2 scanned inside K = 4 microbatch loops, remat 'full', a
# chunked loss: every loop has its own trip count, so a count read from the wrong loop shows.
_NESTED = {'batch_size': 64, 'microbatch_size': 16, 'loss_chunk_size': 16,
           'model.image.remat': 'full', 'model.text.remat': 'full'}


def _scanned_vs_unrolled(devices):
  """hlo_cost of the step with its layers scanned and unrolled (otherwise equal), compiled for
  `devices`."""
  out = {}
  for scan in (True, False):
    config = _config(**{'model.image.scan_layers': scan, 'model.text.scan_layers': scan},
                     **_NESTED)
    compiled = plan.compile_step(config, devices)[0]
    cost = flops.hlo_cost(compiled)
    raw = compiled.cost_analysis()
    cost['xla'] = (raw[0] if isinstance(raw, (list, tuple)) else raw)['flops']
    out[scan] = cost
  return out


def _check_scanned_vs_unrolled(out, rel):
  scanned, unrolled = out[True], out[False]
  assert not scanned['unresolved_loops'] and not unrolled['unresolved_loops']
  # Layer loops of 3 and 2 trips (forward, and backward with remat) inside the microbatch loops.
  trips = sorted({trip for _, trip in scanned['loops']})
  assert 2 in trips and 3 in trips and 4 in trips, scanned['loops']
  assert scanned['xla'] < 0.5 * scanned['flops']        # XLA's own count: loop bodies once.
  assert scanned['flops'] == pytest.approx(unrolled['flops'], rel=rel)


@pytest.mark.slow
def test_scanned_step_flops_equal_unrolled_cpu():
  """XLA:CPU, one device: the scanned step's loop-aware FLOPs equal the unrolled step's within
  1% (measured -0.05%; XLA's own count of the scanned step is 11% of it). Slow: four loops
  compiled unrolled on XLA:CPU (~3 min on a loaded 2-core machine)."""
  _check_scanned_vs_unrolled(_scanned_vs_unrolled(jax.devices('cpu')[:1]), rel=0.01)


@pytest.mark.slow
@needs_libtpu
def test_scanned_step_flops_equal_unrolled_tpu():
  """The TPU compiler, one v5p chip: scanned and unrolled steps' loop-aware FLOPs agree within
  2% (measured -0.03%; with all 4 chips of 'v5p:2x2x1' +0.08%), the layer scans (3 and 2 trips,
  forward and remat'd backward) nested in the gradient-cache loops (4 trips), beside the loss's
  loops. Slow: ~2.5 min on a loaded 2-core machine."""
  _check_scanned_vs_unrolled(_scanned_vs_unrolled(plan.tpu_devices('v5p:2x2x1')[:1]), rel=0.02)


def _basic_l_fsdp_twin(scan):
  """BASIC-L's small twin with FSDP on a data x model mesh: CoAtNet stages of 1, 3, 1, 3 blocks
  and a 6-layer text tower (29.6M parameters, every one of >= 1024 elements FSDP-sharded), remat
  'full', K = 4 microbatches, layers scanned or unrolled."""
  config = basic_l.get_config('runlocal=True')
  config.model.image.update(dict(depths=(1, 3, 1, 3), dims=(64, 128, 256, 512), stem_dim=32,
                                 head_dim=32, drop_path=0.0, remat='full', scan_layers=scan))
  config.model.text.update(dict(width=512, depth=6, num_heads=8, mlp_dim=2048, remat='full',
                                scan_layers=scan))
  config.batch_size, config.microbatch_size, config.loss_chunk_size = 256, 64, 64
  config.mesh.data, config.mesh.model = -1, 2
  config.sharding.fsdp, config.sharding.fsdp_min_size = True, 1024
  return config


@pytest.mark.slow
@needs_libtpu
def test_scanned_fsdp_step_needs_no_more_memory_than_unrolled_tpu():
  """The TPU compiler's memory of the FSDP twin on 'v5p:2x2x2' (8 chips, data 4 x model 2):
  scanned <= unrolled + 5% (measured 0.1545 vs 0.2117 GiB per chip, temporaries 0.120 vs
  0.177). Were the FSDP gathers of the stacked weights hoisted out of the layer scan, every chip
  would hold whole stacks (the BASIC-L plan once read 45.5 GiB scanned against 6.5 unrolled)."""
  devices = plan.tpu_devices('v5p:2x2x2')
  scanned, unrolled = (plan.plan(_basic_l_fsdp_twin(scan), devices) for scan in (True, False))
  assert scanned['params/total'] == unrolled['params/total'] == 29_578_985
  assert scanned['mesh'] == {'data': 4, 'model': 2}
  assert 0 < scanned['memory/total_gib'] <= 1.05 * unrolled['memory/total_gib']


def _hand_forward(cfg, n):
  """FLOPs of the forward of tiny-style towers on n examples (matmuls only), and of the loss."""
  img, txt, d = cfg.model.image, cfg.model.text, cfg.model.embed_dim
  size, patch = cfg.data.image_size, img.patch_size
  tokens = (size // patch) ** 2

  def blocks(t, tower):
    w, h = tower.width, tower.mlp_dim
    qkv, out_proj = 3 * 2 * t * w * w, 2 * t * w * w
    scores, mix = 2 * t * t * w, 2 * t * t * w
    mlp = 2 * (2 * t * w * h)
    return tower.depth * (qkv + scores + mix + out_proj + mlp)

  image = 2 * tokens * (patch * patch * 3) * img.width + blocks(tokens, img) + 2 * img.width * d
  text = blocks(cfg.data.text_length, txt) + 2 * txt.width * d
  # The loss: the N x N logits (2 N^2 d), their scaling by the temperature and a log-sum-exp
  # over rows and one over columns (max, subtract, sum: 3 N^2 each; exp is a transcendental).
  return {'towers': n * (image + text), 'loss': 2 * n * n * d + 7 * n * n}


def _abstract(config):
  model = build_model(config)
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  return model, jax.eval_shape(train.make_init_fn(config, model, tx)).params


def _model_flops(config):
  model, params = _abstract(config)
  fns = dict(encode_fn=train.make_encode_fn(model), make_loss_fn=train.make_loss_fn,
             init_batch=train.init_batch)
  return flops.forward_flops(config, params, **fns), flops.model_flops(config, params, **fns)


def test_model_flops_match_hand_count_of_tiny_towers():
  """Patch embedding, attention (QKV, scores, mixing, output), MLPs, projections (matmuls) and
  the loss (logits and their softmaxes), counted by hand, within 5% of the compiled forwards'
  FLOPs (measured: towers +2.9%, the elementwise work of norms and activations; loss +0.8%)."""
  config = tiny.get_config()
  forward, model_flops = _model_flops(config)
  hand = _hand_forward(config, config.batch_size)
  assert forward['towers'] == pytest.approx(hand['towers'], rel=0.05)
  assert forward['loss'] == pytest.approx(hand['loss'], rel=0.05)
  assert model_flops == pytest.approx(3 * (hand['towers'] + hand['loss']), rel=0.05)
  assert model_flops == 3 * (forward['towers'] + forward['loss'])


def test_mfu_arithmetic_on_one_layer_model():
  """train/mfu = model FLOPs x steps / seconds / (devices x peak), the model FLOPs of a one-layer
  model within 5% of the hand count; no train/mfu without a peak."""
  config = _config(**{'model.image.depth': 1, 'model.text.depth': 1, 'batch_size': 32,
                      'microbatch_size': 16})
  _, model_flops = _model_flops(config)
  hand = _hand_forward(config, 32)
  hand_step = 3 * (hand['towers'] + hand['loss'])
  assert model_flops == pytest.approx(hand_step, rel=0.05)
  out = flops.mfu(model_flops, steps=10, seconds=2.0, num_devices=4, peak_per_device=1e9)
  assert out['train/model_flops_per_sec'] == pytest.approx(model_flops * 10 / 2.0, rel=1e-12)
  assert out['train/mfu'] == pytest.approx(model_flops * 5 / 4e9, rel=1e-12)
  assert out['train/mfu'] == pytest.approx(hand_step * 5 / 4e9, rel=0.05)
  assert 'train/mfu' not in flops.mfu(model_flops, 10, 2.0, 4, 0.0)
  assert flops.peak_flops_per_device(config, jax.devices('cpu')) == 0.0
  config.peak_flops_per_device = 2e9
  assert flops.peak_flops_per_device(config, jax.devices('cpu')) == 2e9


def test_tiny_run_logs_mfu(tmp_path):
  """A short tiny run with config.peak_flops_per_device logs train/mfu and
  train/model_flops_per_sec, consistent with images/s and the step's model FLOPs."""
  config = _config(**{'batch_size': 32, 'microbatch_size': 32, 'total_steps': 4,
                      'log_every_steps': 2, 'eval_every_steps': 4, 'checkpoint_every_steps': 4,
                      'eval.zeroshot': False, 'tokenizer.train_sentences': 2000,
                      'peak_flops_per_device': 1e12})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  rows = [r for r in metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if 'train/loss' in r]
  assert [r['step'] for r in rows] == [2, 4]
  _, model_flops = _model_flops(config)
  for r in rows:
    steps_per_sec = r['train/images_per_sec'] / config.batch_size
    assert r['train/model_flops_per_sec'] == pytest.approx(model_flops * steps_per_sec, rel=1e-4)
    assert r['train/mfu'] == pytest.approx(
        r['train/model_flops_per_sec'] / (jax.device_count() * 1e12), rel=1e-6)
    assert 0 < r['train/mfu'] < 1


def _lines(stdout):
  return dict(line.split(': ', 1) for line in stdout.splitlines() if ': ' in line)


@needs_libtpu
def test_plan_tiny_for_v5p_with_the_tpu_compiler():
  """The tiny config's step compiled by the TPU compiler for 'v5p:2x2x1' (4 chips, no TPU
  here), as `python -m basic.plan --topology=v5p:2x2x1` prints it: positive memory below the
  chip's HBM, hbm/fits, FLOPs, roofline and an MFU bound in (0, 1]."""
  devices = plan.tpu_devices('v5p:2x2x1')
  assert len(devices) == 4 and devices[0].platform == 'tpu'
  lines = _lines('\n'.join(plan.format_plan(plan.plan(tiny.get_config(), devices, costs=True))))
  assert lines['mesh'] == "{'data': 4, 'model': 1}"
  assert lines['device/chip'] == 'v5p' and float(lines['hbm/capacity_gib']) == 95.0
  for key in ('arguments', 'outputs', 'temporaries', 'total'):
    assert 0 < float(lines[f'memory/{key}_gib']) < 95.0
  assert lines['hbm/fits'] == 'true' and 0.9 < float(lines['hbm/headroom']) < 1
  model_flops = float(lines['cost/model_flops_per_device'])
  assert 0.9 < float(lines['cost/flops_per_device']) / model_flops < 1.5
  step_s = float(lines['roofline/step_s'])
  assert step_s >= float(lines['cost/flops_per_device']) / flops.CHIPS['v5p'].peak_flops
  assert float(lines['roofline/mfu']) == pytest.approx(
      model_flops / (step_s * flops.CHIPS['v5p'].peak_flops), rel=1e-3)
  assert 0 < float(lines['roofline/mfu']) <= 1


@needs_libtpu
def test_plan_tiny_for_v4_megacore_with_the_tpu_compiler():
  """'v4:2x2x1' is planned as a v4-8 VM runs it: megacore, 4 devices of 32 GiB. (The tiny
  config with one block per tower, to keep the suite fast.)"""
  devices = plan.tpu_devices('v4:2x2x1')
  assert len(devices) == 4 and flops.devices_per_chip(devices) == 1
  result = plan.plan(_config(**{'model.image.depth': 1, 'model.text.depth': 1}), devices)
  assert result['mesh'] == {'data': 4, 'model': 1}
  assert result['hbm/capacity_gib'] == 32.0 and result['hbm/fits'] is True
  for key in ('arguments', 'outputs', 'temporaries', 'total'):
    assert 0 < result[f'memory/{key}_gib'] < 32.0
  lines = _lines('\n'.join(plan.format_plan(result)))
  assert lines['hbm/fits'] == 'true' and lines['device/chip'] == 'v4'


@pytest.mark.slow
@needs_libtpu
def test_plan_command_line_for_a_topology():
  """python -m basic.plan --topology=... sets up libtpu itself (JAX_PLATFORMS unset here)."""
  env = dict(os.environ)
  for key in ('JAX_PLATFORMS', 'XLA_FLAGS'):
    env.pop(key, None)
  proc = subprocess.run(
      [sys.executable, '-m', 'basic.plan', '--config=configs/tiny.py', '--topology=v5p:2x2x1'],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  lines = _lines(proc.stdout)
  assert "{'data': 4, 'model': 1} on 4 devices of v5p:2x2x1" in lines['mesh']
  assert lines['hbm/fits'] == 'true' and float(lines['roofline/mfu']) > 0


def test_device_table_and_accelerator_types():
  """Per-device peaks: a v3 device is one TensorCore (half a chip), v5p megacore a chip."""
  class Dev:  # pylint: disable=too-few-public-methods
    def __init__(self, kind, coords):
      self.device_kind, self.coords = kind, coords
  v3 = [Dev('TPU v3', (i // 2, 0, 0)) for i in range(8)]
  assert flops.device_spec(v3).peak_flops == 123e12 / 2
  assert flops.device_spec(v3).hbm_bytes == 16 * 2**30
  assert flops.device_spec([Dev('TPU v5', (i, 0, 0)) for i in range(4)]).peak_flops == 459e12
  assert flops.device_spec([Dev('cpu', ())]) is None
  assert flops.roofline(2e12, 1e9, flops.device_spec(v3)) == pytest.approx(2e12 / 61.5e12)
  assert plan.accelerator_type('v5p:2x2x1') == 'v5p-8'
  assert plan.accelerator_type('v3:8x16') == 'v3-256'
  assert plan.accelerator_type('v5e:2x2') == 'v5litepod-4'
