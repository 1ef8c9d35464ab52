"""basic.convert.open_clip for OpenCLIP's timm ConvNeXt image towers (the model card's
`convnext_xxlarge`): the converted model gives OpenCLIP's embeddings and zero-shot probabilities.

Needs the `convert` extra (torch, open_clip_torch, which brings timm); skipped without it. Nothing
is downloaded. The reference is a small OpenCLIP CLIP whose image trunk is timm's `ConvNeXt` on
the code path of `convnext_xxlarge` (conv_mlp=False: Linear MLP and channels-last LayerNorm in
the blocks, LayerNorm2d in the stem, downsampling and head; norm_eps 1e-5), registered in timm
below; every tensor of its state dict is perturbed with noise (tests/test_convert_open_clip.py),
so LayerNorm scales and biases, layer scales and zero-initialised biases all matter.
The released convnext_xxlarge itself is checked at full size from shapes only (built on torch's
'meta' device): its sizes, LayerNorm eps, key mapping and parameter count.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
open_clip = pytest.importorskip('open_clip')
timm = pytest.importorskip('timm')
torch = pytest.importorskip('torch')
safetensors_torch = pytest.importorskip('safetensors.torch')

from basic import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
from basic import config_lib
from basic.convert import open_clip as convert_lib
from basic.models import DualEncoder
from basic.models import build as build_model
from basic.models import convnext
from configs import convnext_xxlarge
from configs import open_clip as open_clip_configs
from tests.test_convert_open_clip import REPO
from tests.test_convert_open_clip import SUBPROCESS_ENV
from tests.test_convert_open_clip import TOLERANCE
from tests.test_convert_open_clip import _differences
from tests.test_convert_open_clip import _perturb

TRUNK = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), norm_eps=1e-5)


@timm.models.register_model
def basic_test_convnext(pretrained=False, **kwargs):
  """timm's ConvNeXt as `convnext_xxlarge` builds it (default conv_mlp=False), tiny."""
  return timm.models.convnext._create_convnext(  # pylint: disable=protected-access
      'basic_test_convnext', pretrained=pretrained, **dict(TRUNK, **kwargs))


@timm.models.register_model
def basic_test_convnext_conv_mlp(pretrained=False, **kwargs):
  """The other code path (convnext_atto..nano): 1x1-conv MLP, LayerNorm2d in the blocks."""
  return timm.models.convnext._create_convnext(  # pylint: disable=protected-access
      'basic_test_convnext_conv_mlp', pretrained=pretrained,
      **dict(TRUNK, conv_mlp=True, **kwargs))


def _model_config(trunk='basic_test_convnext', **vision):
  """An OpenCLIP model config in the format of model_configs/convnext_xxlarge.json."""
  vision = dict(dict(timm_model_name=trunk, timm_model_pretrained=False, timm_pool='',
                     timm_proj='linear', timm_drop=0.0, timm_drop_path=0.1, image_size=64),
                **vision)
  return dict(embed_dim=48, vision_cfg=vision,
              text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2))


def _open_clip_model(cfg, seed):
  torch.manual_seed(seed)
  model = open_clip.model.CLIP(**cfg).eval()
  return model, _perturb(model, seed=seed + 1)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """The small ConvNeXt CLIP, saved as .safetensors, converted with the command line (whose
  process does not know the test's timm model: its LayerNorm eps is given with --norm_eps)."""
  root = tmp_path_factory.mktemp('convnext')
  model, state = _open_clip_model(_model_config(), seed=0)
  safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()},
                              str(root / 'tiny.safetensors'))
  (root / 'tiny.json').write_text(json.dumps(_model_config()))
  output = str(root / 'converted')
  subprocess.run([sys.executable, '-m', 'basic.convert.open_clip', f'--model={root}/tiny.json',
                  f'--checkpoint={root}/tiny.safetensors', f'--output={output}',
                  '--norm_eps=1e-5'],
                 cwd=REPO, env=SUBPROCESS_ENV, check=True)
  return model, output, {k: v.numpy().copy() for k, v in state.items()}


def test_tiny_convnext_gives_the_same_embeddings(tiny):
  model, output, _ = tiny
  diffs = _differences(output, model, 64, seed=3)
  assert max(diffs.values()) <= TOLERANCE, diffs
  config = checkpoint_lib.Checkpointer(output, read_only=True).restore_config(0)
  image = config.model.image
  assert (image.name, image.variant, tuple(image.depths), tuple(image.dims), image.norm_eps,
          image.drop_path) == ('convnext', '', TRUNK['depths'], TRUNK['dims'], 1e-5, 0.1)
  assert (config.data.image_size, config.model.embed_dim, config.model.text.activation,
          config.model.text.mask_padding, config.tokenizer.kind) == (64, 48, 'gelu', False,
                                                                     'clip_bpe')
  config_lib.validate(config)


def _reader(state):
  return convert_lib._Reader(dict(state), 'ckpt.pt')  # pylint: disable=protected-access


def test_conv_mlp_trunk_gives_the_same_image_embeddings():
  """timm's conv_mlp=True path (1x1 convs [O, I, 1, 1]), converted by the functions."""
  cfg = _model_config('basic_test_convnext_conv_mlp')
  model, state = _open_clip_model(cfg, seed=4)
  reader = _reader({k: v.numpy() for k, v in state.items()})
  arch = convert_lib.architecture(reader, cfg)   # eps: from timm's registered model.
  assert arch['norm_eps'] == 1e-5
  params = convert_lib.convert_params(reader, arch)
  config = open_clip_configs.clip_convnext(
      **{k: v for k, v in arch.items() if k != 'image_tower'})
  images = np.random.default_rng(5).normal(size=(3, 64, 64, 3)).astype(np.float32)
  encode = jax.jit(lambda p, x: build_model(config).apply({'params': p}, x,
                                                         method=DualEncoder.encode_image))
  got = encode(params, images)
  with torch.no_grad():
    want = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2), normalize=True)
  diff = float(np.abs(np.asarray(got) - want.numpy()).max())
  print(f'conv_mlp ConvNeXt: max abs image-embedding difference {diff}')
  assert diff <= TOLERANCE


def test_layer_norm_eps_from_the_model_config(tiny):
  _, _, state = tiny
  eps = lambda cfg, **kw: convert_lib.architecture(_reader(state), cfg, **kw)['norm_eps']
  assert eps(_model_config()) == 1e-5                        # timm's registered model.
  assert eps(_model_config(), norm_eps=1e-6) == 1e-6          # --norm_eps overrides.
  assert eps(_model_config('nope_convnext'), norm_eps=1e-5) == 1e-5
  with pytest.raises(ValueError, match=r"timm_model_name='nope_convnext': neither one of .* "
                                       r'give its LayerNorm eps with --norm_eps'):
    eps(_model_config('nope_convnext'))
  # basic's table of timm's convnext_* sizes and eps (no timm needed), against timm's models.
  for name, (depths, dims, norm_eps) in convnext.VARIANTS.items():
    with torch.device('meta'):
      trunk = timm.create_model(name)
    got_depths = tuple(len(stage.blocks) for stage in trunk.stages)
    got_dims = tuple(stage.blocks[0].gamma.shape[0] for stage in trunk.stages)
    got_eps = {m.eps for m in trunk.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert (got_depths, got_dims, got_eps) == (depths, dims, {norm_eps}), name


def test_open_clip_convnext_xxlarge_at_full_size():
  """OpenCLIP's own convnext_xxlarge (model_configs/convnext_xxlarge.json, the model card's), on
  the 'meta' device: the converter reads its sizes and eps from the shapes and the name, maps
  every trunk key, and its config's DualEncoder has OpenCLIP's 1,200,576,385 parameters."""
  cfg = convert_lib.model_config('convnext_xxlarge')
  with torch.device('meta'):
    state = open_clip.model.CLIP(**cfg).state_dict()
  zero = np.zeros((), np.float32)     # Shapes only: no memory.
  reader = _reader({k: np.broadcast_to(zero, v.shape) for k, v in state.items()})
  arch = convert_lib.architecture(reader, cfg)
  want = dict(image_tower='convnext', image_size=256, depths=(3, 4, 30, 3),
              dims=(384, 768, 1536, 3072), norm_eps=1e-5, drop_path=0.1, embed_dim=1024,
              text_width=1024, text_depth=24, text_num_heads=16, text_mlp_dim=4096,
              text_length=77, vocab_size=49408, causal=True, text_activation='gelu',
              text_norm_eps=1e-5)
  assert arch == want
  config = open_clip_configs.clip_convnext(
      **{k: v for k, v in arch.items() if k != 'image_tower'})
  config_lib.validate(config)
  spec = lambda image: convnext.variant_spec(image.variant, depths=image.depths,
                                             dims=image.dims, norm_eps=image.norm_eps)
  assert spec(config.model.image) == spec(convnext_xxlarge.get_config().model.image)
  images = jax.ShapeDtypeStruct((1, 256, 256, 3), np.float32)
  tokens = jax.ShapeDtypeStruct((1, 77), np.int32)
  shapes = jax.eval_shape(build_model(config).init, jax.random.key(0), images, tokens)['params']
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 1_200_576_385
  trunk = convert_lib._convnext(reader, arch)  # pylint: disable=protected-access
  assert jax.tree.map(np.shape, trunk) == jax.tree.map(lambda x: x.shape, shapes['image'])
  assert not {k for k in state if k.startswith('visual.trunk.')} - reader.used


def test_a_trunk_that_does_not_fit_fails_naming_the_key(tiny, tmp_path):
  _, _, state = tiny

  def convert(state, cfg=None, **kwargs):
    reader = _reader(state)
    return convert_lib.convert_params(reader, convert_lib.architecture(
        reader, cfg or _model_config(), **kwargs))

  assert convert(state)['image']['stage2_block01']['gamma'].shape == (64,)
  gamma = 'visual.trunk.stages.2.blocks.1.gamma'
  with pytest.raises(ValueError, match=rf"key '{gamma}' is missing"):
    convert({k: v for k, v in state.items() if k != gamma})
  with pytest.raises(ValueError, match=r"key 'visual\.trunk\.head\.norm\.bias' is missing"):
    convert({k: v for k, v in state.items() if k != 'visual.trunk.head.norm.bias'})
  with pytest.raises(ValueError, match=r"key 'visual\.trunk\.norm_pre\.weight' \(and 0 more\) "
                                       r'has no place'):
    convert({**state, 'visual.trunk.norm_pre.weight': np.ones(128, np.float32)})
  bad = dict(state)
  bad['visual.trunk.stages.1.blocks.0.conv_dw.weight'] = np.zeros((32, 1, 5, 5), np.float32)
  conv_dw = r"key 'visual\.trunk\.stages\.1\.blocks\.0\.conv_dw\.weight' has shape \(32, 1, 5, 5\)"
  with pytest.raises(ValueError, match=conv_dw + r', expected \(32, 1, 7, 7\)'):
    convert(bad, norm_eps=1e-5)
  with pytest.raises(ValueError, match=conv_dw + r", but timm's basic_test_convnext has "
                                       r'\(32, 1, 7, 7\): wrong --model\?'):
    convert(bad)    # Checked against the timm model whose eps is read.
  with pytest.raises(ValueError, match=r"keys 'visual\.trunk\.stages\.\*' give depths=\(1, 1, 2, "
                                       r"1\), .*timm_model_name='convnext_xxlarge'.* wrong "
                                       r'--model\?'):
    convert(state, _model_config('convnext_xxlarge'))
  with pytest.raises(ValueError, match=r"vision_cfg\.timm_proj='mlp' is not supported"):
    convert(state, _model_config(timm_proj='mlp'))
  with pytest.raises(ValueError, match=r"keys 'visual\.trunk\.\*' hold a timm image tower, but "
                                       r'the model config has no vision_cfg\.timm_model_name'):
    convert(state, {**_model_config(), 'vision_cfg': {'image_size': 64}})
  # The command line: the same errors, before anything is written.
  torch.save({k: torch.from_numpy(v) for k, v in state.items() if k != gamma},
             tmp_path / 'bad.pt')
  (tmp_path / 'tiny.json').write_text(json.dumps(_model_config()))
  run = subprocess.run([sys.executable, '-m', 'basic.convert.open_clip',
                        f'--model={tmp_path}/tiny.json', f'--checkpoint={tmp_path}/bad.pt',
                        f'--output={tmp_path}/out', '--norm_eps=1e-5'],
                       cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True)
  assert run.returncode != 0 and f"key '{gamma}' is missing" in run.stderr, run.stderr[-2000:]
  assert not os.path.exists(tmp_path / 'out')
