"""Loss 'sigmoid': SigLIP's pairwise sigmoid loss, with its learnable logit bias.

loss = -(1/N) sum_ij log_sigmoid(z_ij (image_emb_i . text_emb_j / t + bias)), z_ii = 1, else
-1; the maths, its chunked custom VJP and its sharded form are basic/contrastive.py and
basic/contrastive_sharded.py. The bias is a scalar parameter of the model ('bias', initialised at
config.model.bias_init).
"""
from basic import contrastive
from basic import contrastive_sharded


def parameters(config):
  return (('bias', config.model.bias_init),)


def validate(config):
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  bias = config_lib.get_field(config, 'model.bias_init')
  if isinstance(bias, bool) or not isinstance(bias, (int, float)):
    config_lib.fail('model.bias_init', bias, "must be a number (config.loss='sigmoid').")


def value(image_emb, text_emb, temperature, params, *, precision='highest'):
  return contrastive.sigmoid_loss(image_emb, text_emb, temperature, params['bias'],
                                  precision=precision)


def chunked(image_emb, text_emb, temperature, params, *, chunk_size, precision='highest'):
  return contrastive.sigmoid_loss(image_emb, text_emb, temperature, params['bias'],
                                  chunk_size=chunk_size, precision=precision)


def sharded(image_emb, text_emb, temperature, params, *, mesh, axes, chunk_size,
            precision='highest'):
  return contrastive_sharded.sigmoid_loss(image_emb, text_emb, temperature, params['bias'],
                                          mesh=mesh, axes=axes, chunk_size=chunk_size,
                                          precision=precision)
