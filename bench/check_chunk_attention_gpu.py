"""GPU check of sparse chunked prefill's attention: the engine's cuDNN path (two calls merged by
their log-sum-exps) and the packed single call against a float32 reference on peaked attention (large logits, a sink key), per-head context lengths (random,
zero, full) and a short last chunk; then the default model end to end: greedy tokens after a
12K-token prompt with one-shot dense prefill vs chunked prefill (dense context, and RocketKV
whose prefill_budget covers the whole context) must agree. Exits non-zero if the engine's path
gives a NaN or a relative error above 5%, or the engine's greedy tokens disagree.

  python bench/check_chunk_attention_gpu.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from absl import app, flags

FLAGS = flags.FLAGS


def main(_):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from sparse_jax import attention as A
  impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  dt = jnp.bfloat16 if impl == "cudnn" else jnp.float32
  rng = np.random.default_rng(0)
  failures = []
  cases = [(8, 4, 64, 6.0, "random", 3000), (8, 4, 64, 6.0, "zero", 3000), (8, 4, 64, 6.0, "full", 4096),
           (32, 8, 128, 6.0, "full", 4096)]
  for hq, hk, d, sharp, ctx_kind, chunk in cases:
    n, c, u = 1, 4096, 4096
    q = rng.normal(size=(n, c, hq, d)) * sharp
    k = rng.normal(size=(n, c, hk, d))
    v = rng.normal(size=(n, c, hk, d))
    kc = rng.normal(size=(n, hk, u, d))
    kc[:, :, 0] = 5.0 * np.sign(q.mean(axis=(1,))[..., : d].reshape(n, hk, -1, d).mean(2))  # a sink key per head
    vc = rng.normal(size=(n, hk, u, d))
    cl = np.array([chunk])
    ctx = {"random": rng.integers(1, u + 1, size=(n, hk)), "zero": np.zeros((n, hk), np.int32),
           "full": np.full((n, hk), u, np.int32)}[ctx_kind]
    args32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v)] + [jnp.asarray(cl)] + \
             [jnp.asarray(x, jnp.float32) for x in (kc, vc)] + [jnp.asarray(ctx)]
    args = [a.astype(dt) if a.dtype == jnp.float32 else a for a in args32]
    scale = d ** -0.5
    ref = np.asarray(A.chunk_attention(*args32, scale))[:, :chunk]
    for name, fn in (("split", A.chunk_attention_split), ("packed", A.chunk_attention_packed)):
      call = jax.jit(lambda *a, fn=fn: fn(*a, scale, implementation=impl))
      out = np.asarray(call(*args).astype(jnp.float32))[:, :chunk]
      err = np.abs(out - ref)
      rel = err.max() / np.abs(ref).max()
      print(f"{name} hq={hq} hk={hk} d={d} sharp={sharp} ctx={ctx_kind} chunk={chunk}: max err {err.max():.4f}, "
            f"rel {rel:.4f}, mean err {err.mean():.5f}, nan {np.isnan(out).sum()}", flush=True)
      if name == "split" and not rel <= 0.05:  # also catches NaN
        failures.append(f"{name} {ctx_kind} hq={hq}: rel err {rel}")
  engine_check()
  if failures:
    raise SystemExit("chunk attention disagrees with the reference: " + "; ".join(failures))


def engine_check():
  """The default model: greedy tokens after a 12K-token prompt, one-shot dense prefill vs chunked
  prefill (dense context, and RocketKV whose prefill_budget covers the whole context)."""
  import numpy as np
  from sparse_jax import LLM, SamplingParams
  from sparse_jax.algorithms.rocket import RocketSparseAttentionConfig
  prompt = [int(t) for t in np.random.default_rng(1).integers(10, 200, size=12000)]
  outs = {}
  full = RocketSparseAttentionConfig(prompt_budget=16384, topk=4096, prefill_budget=16384, page_size=4, topr=1.0)
  for name, sparse, chunked in (("dense", None, False), ("dense chunked", None, True), ("rocket chunked full", full, True)):
    llm = LLM(dtype="bfloat16", sparse_attention_config=sparse, max_batch_size=1, max_seq_len=12100,
              enable_chunked_prefill=chunked)
    outs[name] = llm.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True))[0].outputs[0].token_ids
    print(f"   engine {name}: {outs[name]}", flush=True)
  same = all(o == outs["dense"] for o in outs.values())
  print(f"   engine paths agree: {same}", flush=True)
  if not same:
    raise SystemExit("chunked prefill disagrees with one-shot prefill")


if __name__ == "__main__":
  app.run(main)
