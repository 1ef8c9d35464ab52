r"""FLOPs of compiled programs (loops counted by their trip counts), model FLOPs, chip peaks.

Three things a plan and the train loop need:

* `hlo_cost(compiled)` -> {'flops', 'bytes accessed'} of one execution, per device. XLA's
  `compiled.cost_analysis()` counts the body of a while loop (a `lax.scan`, `fori_loop`, the
  gradient cache's microbatch loops, the chunked loss's row loops, scanned layers) ONCE, not
  times its trip count, on the TPU and the CPU compilers alike (a 10-step scan of one matmul
  reports the FLOPs of one matmul; tests/test_plan_tpu.py). So the cost here is assembled from
  loop bodies x trip counts, read off the optimised HLO module:

      T(X) = C(X) + sum over the while loops w in X (not inside another loop of X) of
                    trip(w) * T(body(w)) - C(body(w))

  where C(X) is XLA's own HloCostAnalysis of computation X (loop bodies once, as XLA counts
  them) and T(X) the true cost. C(body) comes from the same module re-parsed with the body as
  its entry computation; the entry's C is `compiled.cost_analysis()` itself. trip(w) is the
  `known_trip_count` XLA:CPU annotates, else read off the loop's condition, `i < C` with i a
  tuple element that starts at a constant s and that the body raises by a constant k (the form
  every `lax.scan` / `fori_loop` lowers to; k > 1 where the TPU compiler unrolled the body k
  times): ceil((C - s) / k). A loop whose trip count cannot be read is counted once and listed
  in 'unresolved_loops'.
  Loop conditions are not multiplied (a compare per iteration).

* `model_flops(config, params, ...)` -> FLOPs of the model's maths for one step of N =
  config.batch_size examples: 3 x (forward FLOPs of both towers on N examples + forward FLOPs of
  the contrastive loss on N x N pairs), the usual "forward + backward = 3 x forward" convention
  (backward = 2 x forward: one matmul for the activations' cotangents, one for the weights').
  Each forward is a compiled program (the towers on one microbatch of m examples, times N / m;
  the unchunked N x N reference loss), its cost taken with `hlo_cost`, so scanned layers count
  once per layer. Recomputation (gradient cache pass 1, remat) and optimiser FLOPs are not model
  FLOPs: MFU = model FLOPs / (time x peak) does not reward them.

* `CHIPS`, `device_spec(devices)`: peak bf16 FLOP/s, HBM capacity and bandwidth per device
  (a chip's figure / devices per chip), for the roofline `roofline(flops, bytes, spec)` =
  max(flops / peak, bytes / bandwidth), a lower bound of the step time, and so an upper bound
  of the MFU.
"""
import dataclasses
import re
from typing import Optional

import jax
import numpy as np

_GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip: peak dense bf16 FLOP/s, HBM bytes and HBM bytes/s (whole chip)."""
  name: str
  peak_flops: float
  hbm_bytes: float
  hbm_bytes_per_s: float


# Per chip, from Google Cloud's TPU pages ("Key specifications" / "System architecture"):
#   v3  https://cloud.google.com/tpu/docs/v3   123 TFLOPS (bf16), 32 GiB HBM2, 900 GBps
#   v4  https://cloud.google.com/tpu/docs/v4   275 TFLOPS (bf16), 32 GiB HBM2, 1200 GBps
#   v5e https://cloud.google.com/tpu/docs/v5e  197 TFLOPS (bf16), 16 GB HBM2, 819 GBps
#   v5p https://cloud.google.com/tpu/docs/v5p  459 TFLOPS (bf16), 95 GB HBM2e, 2765 GBps
#   v6e https://cloud.google.com/tpu/docs/v6e  918 TFLOPS (bf16), 32 GB HBM, 1638 GBps
#   v2  https://cloud.google.com/tpu/docs/v2 gives no table; it points to Jouppi et al., "A
#       Domain-Specific Supercomputer for Training Deep Neural Networks" (CACM 2020), Table 3:
#       46 TFLOPS (bf16), 16 GiB HBM, 700 GB/s per chip.
# HBM capacities are taken as GiB (the pages mix GB and GiB; the usable limit a runtime reports
# is a little below either), so `hbm/fits` wants the headroom a plan prints.
# GPUs (dense bf16 Tensor Core FLOP/s without sparsity, HBM, bandwidth), NVIDIA datasheets:
#   A100 SXM 80GB 312 TFLOPS, 80 GB, 2039 GB/s; H100 SXM 989 TFLOPS, 80 GB, 3.35 TB/s;
#   H200 SXM 989 TFLOPS, 141 GB, 4.8 TB/s.
_T, _G = 1e12, 1e9
CHIPS = {
    'v2': Chip('v2', 46 * _T, 16 * _GIB, 700 * _G),
    'v3': Chip('v3', 123 * _T, 32 * _GIB, 900 * _G),
    'v4': Chip('v4', 275 * _T, 32 * _GIB, 1200 * _G),
    'v5e': Chip('v5e', 197 * _T, 16 * _GIB, 819 * _G),
    'v5p': Chip('v5p', 459 * _T, 95 * _GIB, 2765 * _G),
    'v6e': Chip('v6e', 918 * _T, 32 * _GIB, 1638 * _G),
    'a100': Chip('a100', 312 * _T, 80 * 1e9, 2039 * _G),
    'h100': Chip('h100', 989 * _T, 80 * 1e9, 3350 * _G),
    'h200': Chip('h200', 989 * _T, 141 * 1e9, 4800 * _G),
}

# jax Device.device_kind -> CHIPS key (TPU kinds as JAX reports them; v5p is 'TPU v5').
_KINDS = {
    'tpu v2': 'v2', 'tpu v3': 'v3', 'tpu v4': 'v4', 'tpu v5 lite': 'v5e', 'tpu v5e': 'v5e',
    'tpu v5': 'v5p', 'tpu v5p': 'v5p', 'tpu v6 lite': 'v6e', 'tpu v6e': 'v6e',
}


def chip_of(device) -> Optional[Chip]:
  """The CHIPS entry of a jax device (by `device_kind`), or None when unknown (e.g. a CPU)."""
  kind = str(getattr(device, 'device_kind', '')).lower()
  if kind in _KINDS:
    return CHIPS[_KINDS[kind]]
  for name in ('a100', 'h100', 'h200'):
    if name in kind:
      return CHIPS[name]
  return None


def devices_per_chip(devices) -> int:
  """Devices JAX makes of one chip: 2 on v2/v3 (one per TensorCore) and on v4 without
  megacore, else 1. Read from the devices' chip coordinates where they have them."""
  coords = [tuple(getattr(d, 'coords', ())) for d in devices]
  if not all(coords):
    return 1
  return max(1, len(coords) // len(set(coords)))


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """One JAX device's share of its chip."""
  chip: str
  peak_flops: float          # FLOP/s
  hbm_bytes: float
  hbm_bytes_per_s: float


def device_spec(devices) -> Optional[DeviceSpec]:
  """Peak FLOP/s, HBM and bandwidth per device of `devices` (one kind), or None if unknown."""
  chip = chip_of(devices[0])
  if chip is None:
    return None
  k = devices_per_chip(devices)
  return DeviceSpec(chip.name, chip.peak_flops / k, chip.hbm_bytes / k, chip.hbm_bytes_per_s / k)


def roofline(flops: float, bytes_accessed: float, spec: DeviceSpec) -> float:
  """Lower bound of the step time (s) on one device: max(FLOPs / peak, bytes / bandwidth)."""
  return max(flops / spec.peak_flops, bytes_accessed / spec.hbm_bytes_per_s)


# ---------------------------------------------------------------------------------------------
# Loop-aware cost of an HLO module.

_COMP_RE = re.compile(r'^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$')
_WHILE_RE = re.compile(r'\bwhile\(%?([\w.\-]+)\).*?condition=%?([\w.\-]+), body=%?([\w.\-]+)')
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS_RE = re.compile(r'(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)')
_BRANCHES_RE = re.compile(r'branch_computations=\{([^}]*)\}')
# name = shape opcode(operands...: the opcode is the first word after a space followed by '('
# (a shape's own parentheses, as in {1,0:T(8,128)} or a tuple '(s32[], ...)', never are).
_DEF_RE = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)')


def _computations(text: str) -> dict:
  """HLO module text -> {name: [instruction lines]}, with '__entry__' naming the entry."""
  comps, name = {}, None
  for line in text.splitlines():
    m = _COMP_RE.match(line)
    if m:
      name = m.group(2)
      comps[name] = []
      if m.group(1):
        comps['__entry__'] = name
    elif name is not None and line.startswith('}'):
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps


def _defs(lines) -> dict:
  """{instruction name: (opcode, operand text)} of one computation's lines."""
  out = {}
  for line in lines:
    m = _DEF_RE.match(line)
    if m:
      out[m.group(1)] = (m.group(3), m.group(4))
  return out


def _operands(args: str) -> list:
  return re.findall(r'%([\w.\-]+)', args.split(')')[0])


def _constant(defs, name, depth=0) -> Optional[int]:
  """Integer value of `name` when it is a scalar constant, possibly through copies/converts."""
  if name not in defs or depth > 8:
    return None
  op, args = defs[name]
  if op == 'constant':
    m = re.match(r'\s*(-?\d+)\)', args)
    return int(m.group(1)) if m else None
  if op in ('copy', 'convert', 'bitcast', 'reshape'):
    ops = _operands(args)
    return _constant(defs, ops[0], depth + 1) if ops else None
  return None


def _induction_step(body_lines, index: int) -> Optional[int]:
  """What one pass of a loop body adds to its tuple element `index` (the loop counter): the
  body's ROOT tuple element `index` must be the parameter's element `index` plus constants
  (a chain of adds, through copies), else None. A body that XLA unrolled k-fold (TPU loop
  double-buffering) adds k."""
  defs = _defs(body_lines)
  root = next((l for l in body_lines if l.lstrip().startswith('ROOT')), None)
  rm = _DEF_RE.match(root) if root else None
  if not rm or rm.group(3) != 'tuple':
    return None
  elements = _operands(rm.group(4))
  if index >= len(elements):
    return None
  name, step = elements[index], 0
  for _ in range(64):
    if name not in defs:
      return None
    op, args = defs[name]
    ops = _operands(args)
    if op == 'get-tuple-element':
      m = re.search(r'index=(\d+)', args)
      is_param = ops and ops[0] in defs and defs[ops[0]][0] == 'parameter'
      return step if is_param and m and int(m.group(1)) == index else None
    if op in ('copy', 'bitcast', 'convert') and ops:
      name = ops[0]
    elif op == 'add' and len(ops) == 2:
      values = [_constant(defs, o) for o in ops]
      if values[0] is not None and values[1] is None:
        step, name = step + values[0], ops[1]
      elif values[1] is not None and values[0] is None:
        step, name = step + values[1], ops[0]
      else:
        return None
    else:
      return None
  return None


def _trip_count(comps, caller_lines, while_line) -> Optional[int]:
  """Trip count of a while loop: XLA's known_trip_count, else `i < C` (or `C > i`) with i a
  tuple element that starts at a constant s and that each pass of the body raises by a
  constant k > 0: ceil((C - s) / k). None when any of that cannot be read."""
  m = _TRIP_RE.search(while_line)
  if m:
    return int(m.group(1))
  init_name, cond, body = _WHILE_RE.search(while_line).groups()
  cond_defs = _defs(comps.get(cond, []))
  root = next((l for l in comps.get(cond, []) if l.lstrip().startswith('ROOT')), None)
  if root is None:
    return None
  rm = _DEF_RE.match(root)
  if not rm or rm.group(3) != 'compare':
    return None
  direction = re.search(r'direction=(\w+)', root)
  a, b = (_operands(rm.group(4)) + [None, None])[:2]
  if direction and direction.group(1) == 'GT':
    a, b = b, a
  elif not direction or direction.group(1) != 'LT':
    return None
  limit = _constant(cond_defs, b)
  if limit is None or a not in cond_defs or cond_defs[a][0] != 'get-tuple-element':
    return None
  index = int(re.search(r'index=(\d+)', cond_defs[a][1]).group(1))
  caller_defs = _defs(caller_lines)
  if init_name not in caller_defs or caller_defs[init_name][0] != 'tuple':
    return None
  elements = _operands(caller_defs[init_name][1])
  start = _constant(caller_defs, elements[index]) if index < len(elements) else None
  step = _induction_step(comps.get(body, []), index)
  if start is None or step is None or step <= 0:
    return None
  return max(0, -(-(limit - start) // step))


def _reachable_whiles(comps, name, seen=None):
  """(caller computation, while line) of the loops in `name` and in what it calls, not looking
  inside loop bodies."""
  seen = set() if seen is None else seen
  if name in seen or name not in comps:
    return []
  seen.add(name)
  out = []
  for line in comps[name]:
    if _WHILE_RE.search(line):
      out.append((name, line))
      continue
    callees = _CALLS_RE.findall(line)
    for group in _BRANCHES_RE.findall(line):
      callees += re.findall(r'%?([\w.\-]+)', group)
    for callee in callees:
      out += _reachable_whiles(comps, callee, seen)
  return out


def _cost_of_computation(text: str, entry: str, name: str, client) -> dict:
  """XLA's HloCostAnalysis of computation `name` of module `text` (made its entry)."""
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  import jaxlib._hlo as hlo  # pylint: disable=g-import-not-at-top
  if name != entry:
    # The module header's attributes (aliasing, entry layout, schedule) describe the old entry.
    text = re.sub(r'^HloModule [^\n]*', 'HloModule loop_body', text, count=1)
    text = re.sub(r'^ENTRY ', '', text, count=1, flags=re.M)
    text = re.sub(r'^%?' + re.escape(name) + ' ', 'ENTRY %' + name + ' ', text, count=1,
                  flags=re.M)
  return _jax.hlo_module_cost_analysis(client, hlo.hlo_module_from_text(text))


def _cpu_client():
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  try:
    return xla_bridge.get_backend('cpu')
  except RuntimeError:
    return xla_bridge.get_backend()


def hlo_text_cost(text: str, entry_cost: Optional[dict] = None) -> dict:
  """Loop-aware {'flops', 'bytes accessed', 'loops', 'unresolved_loops'} of HLO module text.

  entry_cost: XLA's cost of the module as compiled (`compiled.cost_analysis()`); default: the
  HloCostAnalysis of the re-parsed text. 'loops' lists (body, trip count) per loop found.
  """
  comps = _computations(text)
  entry = comps.pop('__entry__')
  client = _cpu_client()
  keys = ('flops', 'bytes accessed')
  loops, unresolved, cache = [], [], {}

  def c_of(name):
    if name not in cache:
      cost = (entry_cost if name == entry and entry_cost is not None
              else _cost_of_computation(text, entry, name, client))
      cache[name] = np.array([float(cost.get(k, 0.0)) for k in keys])
    return cache[name]

  def t_of(name, depth=0):
    total = c_of(name).copy()
    for caller, line in _reachable_whiles(comps, name):
      body = _WHILE_RE.search(line).group(3)
      trip = _trip_count(comps, comps[caller], line)
      if trip is None:
        unresolved.append(body)
        continue
      loops.append((body, trip))
      total += trip * t_of(body, depth + 1) - c_of(body)
    return total

  total = t_of(entry)
  return {'flops': float(total[0]), 'bytes accessed': float(total[1]), 'loops': loops,
          'unresolved_loops': unresolved}


def hlo_cost(compiled) -> dict:
  """Loop-aware cost of a compiled executable (per device); see the module docstring."""
  raw = compiled.cost_analysis()
  raw = raw[0] if isinstance(raw, (list, tuple)) else raw
  return hlo_text_cost(compiled.as_text(), entry_cost=raw)


# ---------------------------------------------------------------------------------------------
# Model FLOPs.

def _compile_cost(fn, *args) -> float:
  """Loop-aware FLOPs of `fn` compiled for one CPU device (else the default device) from the
  shapes of `args`."""
  try:
    device = jax.devices('cpu')[0]
  except RuntimeError:
    device = jax.devices()[0]
  place = jax.sharding.SingleDeviceSharding(device)
  args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place), args)
  return hlo_cost(jax.jit(fn).lower(*args).compile())['flops']


def forward_flops(config, params, *, encode_fn, make_loss_fn, init_batch) -> dict:
  """{'towers': F_t, 'loss': F_l}: forward FLOPs of both towers (with projections) on N =
  config.batch_size examples, and of the contrastive loss on their N x N pairs.

  F_t = (N / m) x the compiled forward of one microbatch of m = config.microbatch_size
  examples, encode_fn(params, init_batch(config, m), rng) (train mode: token masks and dropout
  as the step runs them); F_l = the compiled unchunked, unsharded reference loss
  make_loss_fn(config with loss_chunk_size=0)(params, image_emb, text_emb) on [N, d]
  embeddings. (basic.train's make_encode_fn(model), make_loss_fn, init_batch; passed in, as
  this module does not import basic.train.) Compiled for the CPU from abstract shapes; nothing
  is allocated.
  """
  n, m = config.batch_size, config.microbatch_size
  batch = jax.eval_shape(lambda: init_batch(config, m))
  rng = jax.eval_shape(lambda: jax.random.key(0))
  towers = _compile_cost(encode_fn, params, batch, rng) * (n // m)
  image_emb, text_emb = jax.eval_shape(encode_fn, params, batch, rng)
  emb = lambda e: jax.ShapeDtypeStruct((n,) + e.shape[1:], e.dtype)
  reference = config.copy_and_resolve_references()
  reference.loss_chunk_size = 0
  loss = _compile_cost(make_loss_fn(reference), params, emb(image_emb), emb(text_emb))
  return {'towers': towers, 'loss': loss}


def model_flops(config, params, **fns) -> float:
  """Model FLOPs of one train step (all devices): 3 x (towers + loss forward FLOPs); `fns` as
  for `forward_flops`."""
  f = forward_flops(config, params, **fns)
  return 3.0 * (f['towers'] + f['loss'])


def peak_flops_per_device(config, devices) -> float:
  """Peak FLOP/s of one of `devices`: the chip table, else config.peak_flops_per_device (0 =
  unknown)."""
  spec = device_spec(devices)
  if spec is not None:
    return spec.peak_flops
  return float(config.peak_flops_per_device)


def mfu(model_flops_per_step: float, steps: int, seconds: float, num_devices: int,
        peak_per_device: float) -> dict:
  """{'train/model_flops_per_sec', 'train/mfu'} of `steps` steps in `seconds` on `num_devices`
  devices of `peak_per_device` FLOP/s ('train/mfu' only when the peak is known, > 0)."""
  per_sec = model_flops_per_step * steps / seconds
  out = {'train/model_flops_per_sec': per_sec}
  if peak_per_device > 0:
    out['train/mfu'] = per_sec / (num_devices * peak_per_device)
  return out
