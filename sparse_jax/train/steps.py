"""The model, the loss, the optimizer and the compiled training / evaluation steps."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparse_jax.train.config import PAD_ID, TrainConfig


def build_model(cfg: TrainConfig, compute_dtype) -> nnx.Module:
  import models
  return models.build_model(cfg.model.hf_config(), dtype=compute_dtype, param_dtype=jnp.float32,
                            rngs=nnx.Rngs(cfg.seed))


def _hidden(graphdef, params, tokens, backend):
  model = nnx.merge(graphdef, params)
  return model, model(tokens, backend=backend, return_hidden=True)


def _answer_logits(graphdef, params, tokens, pos, backend):
  """tokens: int32[B, T]; pos: int32[B, K] -> float32 logits [B, K, vocab] at those positions."""
  model, h = _hidden(graphdef, params, tokens, backend)
  return model.logits(jnp.take_along_axis(h, pos[..., None], axis=1))


def _nll(logits, targets):
  return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]


def _loss(params, graphdef, batch, backend, lm_weight):
  """Mean NLL of the supervised (answer + EOS) tokens, plus lm_weight x the mean next-token NLL
  of every non-pad token (an auxiliary language-modelling loss: the repeated haystack
  sentences reward copying from context, which the retrieval circuits reuse)."""
  model, h = _hidden(graphdef, params, batch["tokens"], backend)
  logits = model.logits(jnp.take_along_axis(h, batch["pos"][..., None], axis=1))
  w = batch["w"]
  n = jnp.maximum(w.sum(), 1.0)
  answer = (_nll(logits, batch["tgt"]) * w).sum() / n
  acc = ((jnp.argmax(logits, -1) == batch["tgt"]) * w).sum() / n
  lm = jnp.zeros((), jnp.float32)
  if lm_weight:
    targets = batch["tokens"][:, 1:]
    mask = (targets != PAD_ID).astype(jnp.float32)
    lm = (_nll(model.logits(h[:, :-1]), targets) * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return answer + lm_weight * lm, (answer, acc, lm)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """AdamW without the learning rate (the step scales by the scheduled LR it is passed)."""
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.scale_by_adam(cfg.b1, cfg.b2, eps=1e-8),
                     optax.add_decayed_weights(cfg.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))


def train_step(state, batch, lr, *, graphdef, tx, backend, lm_weight=0.0):
  """state: {"params", "opt"} (donated); batch: tokens int32[B,T], pos/tgt int32[B,K], w f32[B,K];
  lr: float32 scalar. Returns (state, metrics); metrics["loss"] is the answer loss."""
  (_, (loss, acc, lm)), grads = jax.value_and_grad(_loss, has_aux=True)(state["params"], graphdef, batch, backend,
                                                                         lm_weight)
  updates, opt = tx.update(grads, state["opt"], state["params"])
  params = jax.tree.map(lambda p, u: p - lr * u.astype(p.dtype), state["params"], updates)
  return {"params": params, "opt": opt}, {"loss": loss, "acc": acc, "lm_loss": lm,
                                          "grad_norm": _global_norm(grads)}


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def eval_step(params, tokens, pos, tgt, *, graphdef, backend):
  """-> bool[B, K]: greedy (argmax) token == target at each slot, teacher-forced."""
  logits = _answer_logits(graphdef, params, tokens, pos, backend)
  return jnp.argmax(logits, -1) == tgt


def batch_spec(cfg: TrainConfig, length: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of one training batch of rows of `length` tokens."""
  b, k = cfg.batch_size(length), cfg.slots(length)
  return {"tokens": jax.ShapeDtypeStruct((b, length), jnp.int32), "pos": jax.ShapeDtypeStruct((b, k), jnp.int32),
          "tgt": jax.ShapeDtypeStruct((b, k), jnp.int32), "w": jax.ShapeDtypeStruct((b, k), jnp.float32)}


def run_eval(compiled_eval, params, data: dict[str, Any], batch: int, limit: int | None = None) -> dict[str, float]:
  """Exact-match accuracy per task of teacher-forced greedy answers (equal to greedy decoding
  producing the whole answer) on the prepared eval rows {task: rows}."""
  out = {}
  for task, rows in data.items():
    n = rows["tokens"].shape[0] if limit is None else min(limit, rows["tokens"].shape[0])
    correct = []
    for i in range(0, n, batch):
      sl = slice(i, min(n, i + batch))
      k = sl.stop - sl.start
      pad = batch - k
      arrs = [np.concatenate([rows[key][sl], np.zeros((pad,) + rows[key].shape[1:], rows[key].dtype)])
              for key in ("tokens", "pos", "tgt")]
      ok = np.asarray(compiled_eval(params, *arrs))[:k]
      mask = rows["answer_mask"][sl]
      correct.extend(np.all(ok | ~mask, axis=1).tolist())
    out[task] = float(np.mean(correct)) if correct else float("nan")
  return out


def cudnn_attention_works(q_heads: int, kv_heads: int, head_dim: int) -> tuple[bool, str]:
  """Compiles and runs cuDNN flash attention forward + backward once on a small GQA shape;
  (False, why) where that fails (the caller logs why and uses XLA attention)."""
  if jax.default_backend() != "gpu":
    return False, f"backend is {jax.default_backend()}"
  try:
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 256, q_heads, head_dim)), jnp.bfloat16)
    kv = jnp.asarray(rng.normal(size=(2, 256, kv_heads, head_dim)), jnp.bfloat16)

    def f(q, k, v):
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
      return out.astype(jnp.float32).sum()

    g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, kv, kv)
  except (RuntimeError, ValueError, NotImplementedError) as e:  # no cuDNN, or this shape unsupported
    return False, f"{type(e).__name__}: {e}"
  ok = all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in g)
  return ok, "ok" if ok else "non-finite gradients"
