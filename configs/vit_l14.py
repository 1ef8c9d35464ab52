r"""CLIP ViT-L/14: configs/clip_vit.py with `variant=L/14` (see there).

  python -m basic.train --config=configs/vit_l14.py:runlocal=True --workdir=runs/vit_l14_local
"""
from configs import clip_vit


def get_config(arg=None):
  return clip_vit.get_config(','.join(filter(None, ['variant=L/14', arg])))
