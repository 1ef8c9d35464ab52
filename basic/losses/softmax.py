"""Loss 'softmax': the symmetric InfoNCE loss of CLIP, ALIGN and BASIC (no parameters of its own).

loss = (CE(image -> text) + CE(text -> image)) / 2 over logits image_emb @ text_emb.T / t; the
maths, its chunked custom VJP and its sharded form are basic/contrastive.py and
basic/contrastive_sharded.py.
"""
from basic import contrastive
from basic import contrastive_sharded


def value(image_emb, text_emb, temperature, params, *, precision='highest'):
  del params
  return contrastive.softmax_loss(image_emb, text_emb, temperature, precision=precision)


def chunked(image_emb, text_emb, temperature, params, *, chunk_size, precision='highest'):
  del params
  return contrastive.softmax_loss(image_emb, text_emb, temperature, chunk_size=chunk_size,
                                  precision=precision)


def sharded(image_emb, text_emb, temperature, params, *, mesh, axes, chunk_size,
            precision='highest'):
  del params
  return contrastive_sharded.softmax_loss(image_emb, text_emb, temperature, mesh=mesh, axes=axes,
                                          chunk_size=chunk_size, precision=precision)
