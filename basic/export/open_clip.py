r"""Exports a basic checkpoint as an OpenCLIP state dict (.safetensors) plus its OpenCLIP model
config (JSON, the format of OpenCLIP's model_configs/), the other half of basic.convert.open_clip
(`pip install -e .[convert]`).

  python -m basic.export.open_clip --checkpoint=runs/clip_b32 --output=clip_b32.safetensors
  # writes clip_b32.safetensors and clip_b32.json (or --model_config=FILE.json); then in torch:
  open_clip.add_model_config('clip_b32.json')
  model = open_clip.create_model('clip_b32', pretrained='clip_b32.safetensors')  # strict load

--checkpoint: a training workdir, checkpoints directory or step directory (its latest step, or
--step). The model must be one OpenCLIP's `CLIP` computes: a ViT image tower (class-token pool,
learned position embedding, no patch bias) or a ConvNeXt (timm's, at `visual.trunk`), and a
causal text Transformer pooled at the EOT token ('argmax', padding not masked) with CLIP's BPE
(`tokenizer.kind='clip_bpe'`); GELU or QuickGELU. Anything else fails naming the config field.
Scanned towers are unstacked (basic.models.scan.unstack). The parameters are mapped by the
importer's own table, `basic.convert.open_clip.param_table`, read backwards (`Entry.to_open_clip`:
transposes, reshapes, concatenations; exact). The temperature: basic's logits are sim / T with
log_temperature = log T clipped below at log(config.model.temperature_min); OpenCLIP's are
exp(logit_scale) * sim, so logit_scale = -max(log_temperature, log temperature_min) (exactly
-log_temperature when not clipped). A sigmoid loss's learnable bias (`config.loss='sigmoid'`,
param 'bias') is exported as OpenCLIP's `logit_bias` (model config `init_logit_bias`), which
OpenCLIP's CLIP adds to its logits as basic does. A ConvNeXt needs a timm model name whose trunk
is basic's (`config.model.image.variant`, a basic.models.convnext.VARIANTS entry of the same
sizes and eps, or --timm_model_name).
"""
import json
import os
from typing import Optional

try:
  import triton  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import  (see convert)
except ImportError:
  pass

from absl import app
from absl import flags
from absl import logging
import numpy as np

from basic import checkpoint as checkpoint_lib
from basic import config_lib
from basic.convert import open_clip as convert_lib
from basic.models import convnext
from basic.models import scan as scan_lib

ACTIVATIONS = ('gelu', 'quick_gelu')   # basic's names of OpenCLIP's two MLP activations.
# OpenCLIP's default image normalisation (OPENAI_DATASET_MEAN / STD).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _fail(field: str, value, why: str):
  raise config_lib.ConfigError(f'config.{field}={value!r}: {why}')


def _get(config, field: str, default=None):
  node = config
  for part in field.split('.'):
    if part not in node:
      return default
    node = node[part]
  return node


def check_exportable(config):
  """ConfigError naming the first field of `config` that OpenCLIP's CLIP cannot express."""
  image, text = config.model.image, config.model.text
  if image.name not in ('vit', 'convnext'):
    _fail('model.image.name', image.name, "OpenCLIP's CLIP has ViT and timm ConvNeXt image "
          "towers only ('vit', 'convnext').")
  if text.name != 'transformer':
    _fail('model.text.name', text.name, "OpenCLIP's text tower is basic's 'transformer'.")
  if not text.causal:
    _fail('model.text.causal', text.causal, "OpenCLIP's CLIP text tower is causal "
          '(a bidirectional tower has no OpenCLIP equivalent).')
  if text.pool != 'argmax':
    _fail('model.text.pool', text.pool, "OpenCLIP's CLIP pools at the EOT token ('argmax').")
  if _get(text, 'mask_padding', True):
    _fail('model.text.mask_padding', True, 'OpenCLIP attends to every token (id 0 is a BPE '
          "token, '!'); only mask_padding=False exports.")
  kind = _get(config, 'tokenizer.kind')
  if kind != 'clip_bpe':
    _fail('tokenizer.kind', kind, "OpenCLIP's CLIP reads CLIP's BPE ids ('clip_bpe').")
  if text.activation not in ACTIVATIONS:
    _fail('model.text.activation', text.activation, f'OpenCLIP has {ACTIVATIONS} only.')
  if image.name == 'vit':
    for field, want in (('pool', 'cls'), ('posemb', 'learn'), ('patch_bias', False)):
      if _get(image, field) != want:
        _fail(f'model.image.{field}', _get(image, field), f'OpenCLIP\'s ViT has {want!r}.')
    if image.activation != text.activation:
      _fail('model.image.activation', image.activation, "OpenCLIP's quick_gelu sets both "
            f'towers of a ViT CLIP alike; the text tower has {text.activation!r}.')
  extra = {'sigmoid': ('bias',)}.get(config.loss, ())
  from basic import losses  # pylint: disable=g-import-not-at-top
  names = tuple(name for name, _ in losses.extra_params(config))
  if names != extra:
    _fail('loss', config.loss, f'its parameters {names} have no place in OpenCLIP\'s CLIP.')


def architecture(params: dict, config) -> dict:
  """`basic.convert.open_clip.architecture`'s dict from unscanned params' shapes and `config`:
  what `param_table` needs (image_tower, sizes, embed_dim, text_*)."""
  text = params['text']
  q = text['encoder']['block00']['attn']['query']['kernel']        # [W, H, W / H]
  arch = dict(
      embed_dim=params['text_proj']['kernel'].shape[1], text_width=q.shape[0],
      text_num_heads=q.shape[1],
      text_depth=sum(k.startswith('block') for k in text['encoder']),
      text_mlp_dim=text['encoder']['block00']['mlp']['fc1']['kernel'].shape[1],
      text_length=text['pos_embedding'].shape[1],
      vocab_size=text['token_embedding']['embedding'].shape[0])
  image = params['image']
  if config.model.image.name == 'convnext':
    stages = sorted({int(k[len('stage')]) for k in image if k.startswith('stage')})
    arch.update(image_tower='convnext', dims=tuple(
        image[f'stage{s}_block00']['norm']['scale'].shape[0] for s in stages),
        depths=tuple(sum(k.startswith(f'stage{s}_block') for k in image) for s in stages))
  else:
    kernel = image['embedding']['kernel']                             # [p, p, 3, W]
    qi = image['encoder']['block00']['attn']['query']['kernel']
    grid = int(round(np.sqrt(image['pos_embedding'].shape[1])))
    arch.update(image_tower='vit', patch_size=kernel.shape[0], width=kernel.shape[3],
                image_size=grid * kernel.shape[0], num_heads=qi.shape[1],
                depth=sum(k.startswith('block') for k in image['encoder']),
                mlp_dim=image['encoder']['block00']['mlp']['fc1']['kernel'].shape[1],
                ln_pre='ln_pre' in image)
  return arch


def _timm_model_name(config, arch: dict, timm_model_name: Optional[str]) -> str:
  """The timm ConvNeXt name for vision_cfg.timm_model_name: given, the config's variant, or the
  basic.models.convnext.VARIANTS entry of these (depths, dims, eps)."""
  if timm_model_name:
    return timm_model_name
  image = config.model.image
  eps = image.norm_eps
  if image.variant:
    want = convnext.VARIANTS.get(image.variant)
    if want is None or tuple(want) != (arch['depths'], arch['dims'], eps):
      _fail('model.image.norm_eps', eps, f'not timm\'s {image.variant} ({want}); give '
            '--timm_model_name of a timm ConvNeXt with these sizes and eps.')
    return image.variant
  for name, (depths, dims, want_eps) in convnext.VARIANTS.items():
    if (tuple(depths), tuple(dims), want_eps) == (arch['depths'], arch['dims'], eps):
      return name
  _fail('model.image.dims', tuple(image.dims), f'(depths {arch["depths"]}, eps {eps}) is no '
        'timm ConvNeXt basic knows (basic.models.convnext.VARIANTS); give --timm_model_name of a '
        'registered timm ConvNeXt with these sizes and eps.')


def model_config(config, arch: dict, params: dict, *,
                 timm_model_name: Optional[str] = None) -> dict:
  """OpenCLIP's model config (model_configs/*.json format) of the model `config` describes."""
  text = config.model.text
  cfg = {
      'embed_dim': int(arch['embed_dim']),
      'quick_gelu': text.activation == 'quick_gelu',
      'text_cfg': {
          'context_length': int(arch['text_length']), 'vocab_size': int(arch['vocab_size']),
          'width': int(arch['text_width']), 'heads': int(arch['text_num_heads']),
          'layers': int(arch['text_depth']),
          'mlp_ratio': arch['text_mlp_dim'] / arch['text_width'],
          'norm_kwargs': {'eps': float(text.norm_eps)},
      },
  }
  if arch['image_tower'] == 'vit':
    image = config.model.image
    cfg['vision_cfg'] = {
        'image_size': int(arch['image_size']), 'patch_size': int(arch['patch_size']),
        'width': int(arch['width']), 'layers': int(arch['depth']),
        'head_width': arch['width'] // arch['num_heads'],
        'mlp_ratio': arch['mlp_dim'] / arch['width'], 'no_ln_pre': not arch['ln_pre'],
        'norm_kwargs': {'eps': float(image.norm_eps)},
    }
  else:
    cfg['vision_cfg'] = {
        'timm_model_name': _timm_model_name(config, arch, timm_model_name),
        'timm_model_pretrained': False, 'timm_pool': '', 'timm_proj': 'linear',
        'timm_proj_bias': False, 'timm_drop': 0.0,
        'timm_drop_path': float(_get(config.model.image, 'drop_path', 0.0) or 0.0),
        'image_size': int(config.data.image_size),
    }
  for name, mlp, width in (('text_cfg', arch['text_mlp_dim'], arch['text_width']),
                           ('vision_cfg', arch.get('mlp_dim'), arch.get('width'))):
    if mlp is not None and int(width * cfg[name]['mlp_ratio']) != mlp:
      raise ValueError(f'{name}.mlp_ratio: {mlp} / {width} does not give back {mlp} in '
                       "OpenCLIP's int(width * mlp_ratio).")
  if 'bias' in params:
    cfg['init_logit_bias'] = float(np.asarray(params['bias']))
  return cfg


def timm_trunk(name: str):
  """timm's model `name` built on torch's 'meta' device (no memory), or None without timm."""
  try:
    import timm  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  if not timm.is_model(name):
    raise ValueError(f'vision_cfg.timm_model_name={name!r}: not a model registered in timm.')
  with torch.device('meta'):
    return timm.create_model(name, pretrained=False)


def check_timm_trunk(trunk, name: str, state: dict, eps: float):
  """The exported `visual.trunk.*` must be timm's `name`: same keys and shapes, LayerNorm eps
  equal to config.model.image.norm_eps. ValueError / ConfigError naming what differs."""
  import torch  # pylint: disable=g-import-not-at-top
  want = {f'visual.trunk.{k}': tuple(v.shape) for k, v in trunk.state_dict().items()
          if not k.startswith('head.fc.')}
  got = {k: tuple(v.shape) for k, v in state.items() if k.startswith('visual.trunk.')}
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))
    raise ValueError(f'vision_cfg.timm_model_name={name!r}: its trunk differs from the '
                     f'exported one ({diff[:4]}); give --timm_model_name of this trunk.')
  eps_found = {m.eps for m in trunk.modules() if isinstance(m, torch.nn.LayerNorm)}
  if eps_found != {eps}:
    _fail('model.image.norm_eps', eps, f"timm's {name} has LayerNorm eps {sorted(eps_found)}.")


def export_params(params: dict, config, arch: dict, *, conv_mlp: bool = False) -> dict:
  """basic's DualEncoder params -> OpenCLIP's state dict {key: float32 C-order array}, by
  `param_table` read backwards. The temperature is clipped as basic clips it (module doc).
  conv_mlp: the target timm ConvNeXt's MLPs are 1x1 convs ([O, I, 1, 1])."""
  params = dict(params)
  floor = np.float32(np.log(config.model.temperature_min))
  log_t = np.asarray(params['log_temperature'], np.float32)
  params['log_temperature'] = log_t if log_t >= floor else floor
  state = {}
  for entry in convert_lib.param_table(arch, conv_mlp=conv_mlp,
                                         logit_bias='bias' in params):
    values = entry.to_open_clip(*(np.asarray(convert_lib.get_path(params, p), np.float32)
                                  for p in entry.paths))
    for key, shape, value in zip(entry.keys, entry.shapes, values):
      if tuple(value.shape) != tuple(shape):
        raise AssertionError(f'{key}: exported shape {value.shape}, expected {shape}.')
      state[key] = np.ascontiguousarray(value, np.float32)
  return state


def load(checkpoint: str, step: Optional[int] = None):
  """-> (config, unscanned params as numpy, tokenizer bytes or None) of a checkpoint."""
  with checkpoint_lib.open_step(checkpoint, step, field='--checkpoint') as (ckpt, step):
    config = ckpt.restore_config(step)
    params = ckpt.restore_params(step)
    tokenizer = ckpt.restore_tokenizer(step)
  params = scan_lib.unstack(params)
  import jax  # pylint: disable=g-import-not-at-top
  return config, jax.tree.map(np.asarray, params), tokenizer


def export(checkpoint: str, output: str, *, model_config_path: Optional[str] = None,
           step: Optional[int] = None, timm_model_name: Optional[str] = None) -> tuple[str, str]:
  """Writes `output` (.safetensors) and its model config JSON (default: output with .json).
  -> (output, model_config_path)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  config, params, tokenizer = load(checkpoint, step)
  check_exportable(config)
  arch = architecture(params, config)
  cfg = model_config(config, arch, params, timm_model_name=timm_model_name)
  trunk = conv_mlp = None
  if arch['image_tower'] == 'convnext':
    trunk = timm_trunk(cfg['vision_cfg']['timm_model_name'])
    conv_mlp = trunk is not None and trunk.stages[0].blocks[0].mlp.fc1.weight.ndim == 4
  state = export_params(params, config, arch, conv_mlp=bool(conv_mlp))
  if trunk is not None:
    check_timm_trunk(trunk, cfg['vision_cfg']['timm_model_name'], state,
                     config.model.image.norm_eps)
  model_config_path = model_config_path or os.path.splitext(output)[0] + '.json'
  save_file(state, output)
  with open(model_config_path, 'w', encoding='utf-8') as f:
    json.dump(cfg, f, indent=2)
  try:
    default = open(convert_lib.default_tokenizer_path(), 'rb').read()
  except ImportError:
    default = None
  if tokenizer is not None and default is not None and tokenizer != default:
    logging.warning("The checkpoint's CLIP BPE merges differ from the ones OpenCLIP ships; "
                    "OpenCLIP's tokenizer will not give basic's ids.")
  if (not np.allclose(config.data.mean, OPENAI_MEAN, atol=1e-6)
      or not np.allclose(config.data.std, OPENAI_STD, atol=1e-6)):
    logging.warning('config.data.mean / std %s / %s are not OpenAI\'s, OpenCLIP\'s default '
                    'preprocessing: pass them as image_mean / image_std to OpenCLIP.',
                    tuple(config.data.mean), tuple(config.data.std))
  logging.info('Exported %s (%s image tower) to %s and %s.', checkpoint, arch['image_tower'],
               output, model_config_path)
  return output, model_config_path


def _define_flags():
  flags.DEFINE_string('checkpoint', None, 'A basic workdir, checkpoints dir or step dir.')
  flags.DEFINE_string('output', None, 'The OpenCLIP state dict to write (.safetensors).')
  flags.DEFINE_string('model_config', None, 'The OpenCLIP model config JSON to write (default: '
                      '--output with .json).')
  flags.DEFINE_integer('step', None, 'The step (default: the latest).')
  flags.DEFINE_string('timm_model_name', None, "A ConvNeXt's vision_cfg.timm_model_name "
                      '(default: its variant, or the VARIANTS entry of its sizes).')
  flags.mark_flags_as_required(['checkpoint', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  o = flags.FLAGS
  output, cfg = export(o.checkpoint, o.output, model_config_path=o.model_config, step=o.step,
                       timm_model_name=o.timm_model_name)
  name = os.path.splitext(os.path.basename(cfg))[0]
  print(f'Wrote {output} and {cfg}: open_clip.add_model_config({cfg!r}); '
        f'open_clip.create_model({name!r}, pretrained={output!r})')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
