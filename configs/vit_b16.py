r"""CLIP ViT-B/16: configs/clip_vit.py with `variant=B/16` (see there).

  python -m basic.train --config=configs/vit_b16.py:runlocal=True --workdir=runs/vit_b16_local
"""
from configs import clip_vit


def get_config(arg=None):
  return clip_vit.get_config(','.join(filter(None, ['variant=B/16', arg])))
