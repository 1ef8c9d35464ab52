"""basic.export.open_clip: basic checkpoints as OpenCLIP state dicts + model configs.

Needs the `convert` extra (torch, open_clip_torch, timm); skipped without it. Nothing is
downloaded. (1) Round trip: small random OpenCLIP CLIPs (ViT, and ConvNeXt on the test timm trunk
of tests/test_convert_convnext.py), every tensor perturbed, imported by basic.convert.open_clip and
exported back, give the same keys and bit-equal tensors, load strictly and compute bit-equal
embeddings (the ViT's class token is folded into `cls` by the importer: exported
class_embedding = class_embedding + positional_embedding[0], positional_embedding[0] = 0, exact
when that row was zero). (2) Tiny basic models (configs/open_clip.py, random init + noise, one
scanned), exported and loaded by `open_clip.create_model(name, pretrained=file)` (strict), give
basic.inference's image and text embeddings within EMBED_TOLERANCE and its logit scale / bias.
(3) Towers OpenCLIP cannot express fail naming the config field. (4) basic.export.hf: a tiny
basic ViT exported, loaded by transformers.CLIPModel.from_pretrained with its CLIPTokenizer from
the exported files, gives basic's token ids and embeddings within EMBED_TOLERANCE; towers
transformers cannot express fail naming the field.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('USE_HUB_KERNELS', '0')   # transformers 5 without the `kernels` package.
open_clip = pytest.importorskip('open_clip')
torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
safetensors_torch = pytest.importorskip('safetensors.torch')

from basic import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
from basic import config_lib
from basic import inference
from basic import models
from basic.convert import open_clip as convert_lib
from basic.export import open_clip as export_lib
from configs import open_clip as open_clip_configs
from tests import test_convert_convnext  # noqa: F401  (registers the tiny timm ConvNeXt trunks)
from tests.test_convert_open_clip import MERGES
from tests.test_convert_open_clip import REPO
from tests.test_convert_open_clip import SUBPROCESS_ENV
from tests.test_convert_open_clip import TINY
from tests.test_convert_open_clip import _perturb

EMBED_TOLERANCE = 1e-5   # max abs difference of unit embeddings, float32.
CAPTIONS = ['a photo of a cat!', 'Two dogs playing in the snow!!', '', 'a diagram']


def _state(path) -> dict:
  return {k: v.numpy() for k, v in safetensors_torch.load_file(str(path)).items()}


def _load_exported(weights: str, cfg_path: str):
  """open_clip.create_model from the exported JSON config, strict load of the weights."""
  open_clip.add_model_config(cfg_path)
  name = os.path.splitext(os.path.basename(cfg_path))[0]
  return open_clip.create_model(name, pretrained=weights).eval()


def _images(size: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (4, size, size, 3), np.uint8)


def _encode(model, images: np.ndarray, mean, std, captions=CAPTIONS):
  """OpenCLIP's unit image / text embeddings of uint8 images and captions."""
  mean = torch.tensor(mean).view(1, 3, 1, 1)
  std = torch.tensor(std).view(1, 3, 1, 1)
  with torch.no_grad():
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    return (model.encode_image(x, normalize=True).numpy(),
            model.encode_text(open_clip.tokenize(captions), normalize=True).numpy())


# --- (1) OpenCLIP -> basic -> OpenCLIP. -----------------------------------------------------------


def _round_trip(tmp_path, cfg: dict, name: str, seed: int, **kwargs):
  torch.manual_seed(seed)
  model = open_clip.model.CLIP(**cfg).eval()
  state = _perturb(model, seed=seed + 1)
  source = tmp_path / f'{name}.safetensors'
  safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(source))
  (tmp_path / f'{name}_source.json').write_text(json.dumps(cfg))
  converted = convert_lib.convert(str(tmp_path / f'{name}_source.json'), str(source),
                                  str(tmp_path / f'{name}_basic'))
  weights, cfg_path = export_lib.export(converted, str(tmp_path / f'{name}.out.safetensors'),
                                        model_config_path=str(tmp_path / f'{name}.json'),
                                        **kwargs)
  return model, {k: v.numpy() for k, v in state.items()}, _state(weights), weights, cfg_path


def _assert_same_model(model, exported, images, mean, std):
  want, got = _encode(model, images, mean, std), _encode(exported, images, mean, std)
  for w, g in zip(want, got):
    np.testing.assert_array_equal(g, w)
  assert exported.logit_scale.item() == model.logit_scale.item()


def test_vit_round_trip_gives_back_every_tensor(tmp_path):
  model, want, got, weights, cfg_path = _round_trip(tmp_path, TINY, 'vit', seed=3)
  assert got.keys() == want.keys()
  folded = ('visual.class_embedding', 'visual.positional_embedding')
  for key in want:
    if key not in folded:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
      assert got[key].dtype == want[key].dtype == np.float32
  pos = want['visual.positional_embedding']
  np.testing.assert_array_equal(got['visual.positional_embedding'][1:], pos[1:])
  np.testing.assert_array_equal(got['visual.class_embedding'],
                                want['visual.class_embedding'] + pos[0])
  assert not got['visual.positional_embedding'][0].any() and pos[0].any()
  exported = _load_exported(weights, cfg_path)   # strict=True
  _assert_same_model(model, exported, _images(32, 0), open_clip.OPENAI_DATASET_MEAN,
                     open_clip.OPENAI_DATASET_STD)
  assert json.loads(open(cfg_path).read())['quick_gelu'] is True
  # With positional_embedding[0] = 0 (nothing to fold) every tensor comes back, here through
  # the table in memory (convert_params, then export_params of the converted config).
  want = dict(want, **{'visual.positional_embedding': np.concatenate([0 * pos[:1], pos[1:]])})
  reader = convert_lib._Reader(dict(want), 'tiny')    # pylint: disable=protected-access
  arch = convert_lib.architecture(reader, TINY)
  params = convert_lib.convert_params(reader, arch)
  config = checkpoint_lib.Checkpointer(str(tmp_path / 'vit_basic'),
                                       read_only=True).restore_config(0)
  got = export_lib.export_params(params, config, export_lib.architecture(params, config))
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_convnext_round_trip_gives_back_every_tensor(tmp_path):
  cfg = test_convert_convnext._model_config()   # pylint: disable=protected-access
  model, want, got, weights, cfg_path = _round_trip(
      tmp_path, cfg, 'convnext', seed=5, timm_model_name='basic_test_convnext')
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  exported = _load_exported(weights, cfg_path)
  _assert_same_model(model, exported, _images(64, 1), open_clip.OPENAI_DATASET_MEAN,
                     open_clip.OPENAI_DATASET_STD)


# --- (2) basic -> OpenCLIP: the same embeddings. ------------------------------------------------

TEXT = dict(text_width=64, text_depth=2, text_num_heads=2, text_mlp_dim=256, text_length=77,
            vocab_size=49408, embed_dim=48)


def _basic_checkpoint(path, config, seed: int) -> str:
  """A random basic model of `config`, every parameter perturbed, saved as step 0."""
  size = config.data.image_size
  params = jax.jit(models.build(config).init)(    # One compilation, not one per op.
      jax.random.key(seed), np.zeros((1, size, size, 3), np.float32),
      np.zeros((1, config.data.text_length), np.int32))['params']
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: np.asarray(x + 0.05 * rng.standard_normal(x.shape),
                                             np.float32), params)
  ckpt = checkpoint_lib.Checkpointer(str(path), async_save=False)
  ckpt.save(0, {'params': params}, config, tokenizer_model=open(MERGES, 'rb').read(),
            tokenizer_kind='clip_bpe')
  ckpt.wait()
  ckpt.close()
  return str(path)


def _compare(directory: str, weights: str, cfg_path: str, seed: int):
  """-> the exported OpenCLIP model, after checking its embeddings and logit scale."""
  loaded = inference.load(directory, batch_size=4)
  exported = _load_exported(weights, cfg_path)
  images = _images(loaded.config.data.image_size, seed)
  image, text = _encode(exported, images, loaded.config.data.mean, loaded.config.data.std)
  diffs = {'image': float(np.abs(image - loaded.encode_images(images)).max()),
           'text': float(np.abs(text - loaded.encode_texts(CAPTIONS)).max())}
  print(f'{directory}: max abs differences {diffs}')
  assert max(diffs.values()) <= EMBED_TOLERANCE, diffs
  assert np.abs(image @ text.T).max() > 0.1    # Not degenerate embeddings.
  np.testing.assert_allclose(exported.logit_scale.exp().item(), 1 / loaded.temperature,
                             rtol=1e-6)
  return exported


def test_basic_vit_scanned_exports_to_the_same_embeddings(tmp_path):
  config = open_clip_configs.clip_vit(image_size=32, patch_size=8, width=64, depth=2,
                                     num_heads=2, mlp_dim=256, activation='quick_gelu',
                                     scan_layers=True, **TEXT)
  directory = _basic_checkpoint(tmp_path / 'vit', config, seed=0)
  assert 'block_scan' in checkpoint_lib.Checkpointer(directory, read_only=True).restore_params(
      0)['image']['encoder']
  # The command line.
  subprocess.run([sys.executable, '-m', 'basic.export.open_clip', f'--checkpoint={directory}',
                  f'--output={tmp_path}/vit_export.safetensors'],
                 cwd=REPO, env=SUBPROCESS_ENV, check=True, stdout=subprocess.DEVNULL)
  _compare(directory, f'{tmp_path}/vit_export.safetensors', f'{tmp_path}/vit_export.json', seed=2)


def test_basic_convnext_sigmoid_exports_to_the_same_embeddings_and_bias(tmp_path):
  trunk = test_convert_convnext.TRUNK
  config = open_clip_configs.clip_convnext(image_size=64, depths=trunk['depths'],
                                           dims=trunk['dims'], norm_eps=trunk['norm_eps'],
                                           text_activation='gelu', **TEXT)
  config.loss = 'sigmoid'
  config.model.bias_init = -10.0
  directory = _basic_checkpoint(tmp_path / 'convnext', config, seed=1)
  weights, cfg_path = export_lib.export(directory, str(tmp_path / 'cnx.safetensors'),
                                        timm_model_name='basic_test_convnext')
  exported = _compare(directory, weights, cfg_path, seed=3)
  bias = checkpoint_lib.Checkpointer(directory, read_only=True).restore_params(0)['bias']
  assert exported.logit_bias.item() == float(bias) != -10.0
  with pytest.raises(config_lib.ConfigError, match=r'config\.model\.image\.dims=\(16, 32, 64, '
                     r'128\).*--timm_model_name'):
    export_lib.export(directory, str(tmp_path / 'x.safetensors'))
  with pytest.raises(ValueError, match=r"timm_model_name='convnext_atto': its trunk differs"):
    export_lib.export(directory, str(tmp_path / 'y.safetensors'), timm_model_name='convnext_atto')
  assert not os.path.exists(tmp_path / 'x.safetensors')
  assert not os.path.exists(tmp_path / 'y.safetensors')


# --- (3) What OpenCLIP cannot express. ------------------------------------------------------------


def test_unexportable_towers_fail_naming_the_field():
  def config(**changes):
    c = open_clip_configs.clip_vit(image_size=32, patch_size=8, width=64, depth=2, num_heads=2,
                                   mlp_dim=256, **TEXT)
    for field, value in changes.items():
      node = c
      *parents, last = field.split('.')
      for p in parents:
        node = node[p]
      node[last] = value
    return c

  export_lib.check_exportable(config())
  for field, value in (('model.image.name', 'coatnet'), ('model.text.causal', False),
                       ('model.text.pool', 'mean'), ('tokenizer.kind', 'sentencepiece'),
                       ('model.text.mask_padding', True), ('model.image.pool', 'gap'),
                       ('model.image.activation', 'gelu_tanh')):
    with pytest.raises(config_lib.ConfigError,
                       match=rf'config\.{field.replace(".", chr(92) + ".")}={value!r}'):
      export_lib.check_exportable(config(**{field: value}))


# --- basic.export.hf (transformers, in the convert extra). ----------------------------------------


def _features(out):
  """get_*_features -> a tensor (transformers 5 may wrap it in a model output)."""
  return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_basic_vit_exports_to_transformers_clip(tmp_path):
  transformers = pytest.importorskip('transformers')
  from basic.export import hf as hf_export  # pylint: disable=g-import-not-at-top
  config = open_clip_configs.clip_vit(image_size=32, patch_size=8, width=64, depth=2,
                                     num_heads=2, mlp_dim=256, activation='gelu', **TEXT)
  directory = _basic_checkpoint(tmp_path / 'vit', config, seed=4)
  output = hf_export.export(directory, str(tmp_path / 'hf'))
  model = transformers.CLIPModel.from_pretrained(output).eval()   # USE_HUB_KERNELS=0 above
  tokenizer = transformers.CLIPTokenizer.from_pretrained(output)
  loaded = inference.load(directory, batch_size=4)
  captions = ['a photo of a cat', 'two dogs playing in the snow', 'a diagram']
  ids = tokenizer(captions, padding='max_length', max_length=77, return_tensors='pt')['input_ids']
  want_ids = loaded.tokenizer.encode(captions)
  np.testing.assert_array_equal(ids.numpy()[want_ids != 0], want_ids[want_ids != 0])
  images = _images(32, 5)
  mean = torch.tensor(loaded.config.data.mean).view(1, 3, 1, 1)
  std = torch.tensor(loaded.config.data.std).view(1, 3, 1, 1)
  with torch.no_grad():
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    image = _features(model.get_image_features(pixel_values=x))
    text = _features(model.get_text_features(input_ids=ids))
  image = (image / image.norm(dim=-1, keepdim=True)).numpy()
  text = (text / text.norm(dim=-1, keepdim=True)).numpy()
  diffs = {'image': float(np.abs(image - loaded.encode_images(images)).max()),
           'text': float(np.abs(text - loaded.encode_texts(captions)).max())}
  print(f'{output}: max abs differences {diffs}')
  assert max(diffs.values()) <= EMBED_TOLERANCE, diffs
  np.testing.assert_allclose(model.logit_scale.exp().item(), 1 / loaded.temperature, rtol=1e-6)


def test_towers_transformers_cannot_express_fail_naming_the_field():
  from basic.export import hf as hf_export  # pylint: disable=g-import-not-at-top
  def vit(ln_pre=True):
    return open_clip_configs.clip_vit(image_size=32, patch_size=8, width=64, depth=2,
                                      num_heads=2, mlp_dim=256, ln_pre=ln_pre, **TEXT)
  hf_export.check_exportable(vit())
  convnext = open_clip_configs.clip_convnext(image_size=64, depths=(1, 1, 1, 1),
                                             dims=(8, 8, 8, 8), norm_eps=1e-6, **TEXT)
  no_ln_pre = vit(ln_pre=False)
  sigmoid = vit()
  sigmoid.loss = 'sigmoid'
  text_mean = vit()
  text_mean.model.text.pool = 'mean'   # basic.export.open_clip's checks come first.
  for config, match in ((convnext, r"config\.model\.image\.name='convnext'"),
                        (no_ln_pre, r'config\.model\.image\.ln_pre=False'),
                        (sigmoid, r"config\.loss='sigmoid'"),
                        (text_mean, r"config\.model\.text\.pool='mean'")):
    with pytest.raises(config_lib.ConfigError, match=match):
      hf_export.check_exportable(config)
