"""Where a long prefill's device memory goes: compiles (does not run) the engine's prefill
programs for the Llama-3.1-8B shape at a given prompt length and batch, and prints XLA's memory
analysis (temp = the one scratch allocation a program makes) and the largest arrays of the
optimized HLO (instructions inside fusions included, so read them as hints, not allocations).

  python bench/probe_prefill_memory.py --input_len=130560 --options=configs/rocket_chunked.yaml
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("input_len", 130560, "prompt tokens")
flags.DEFINE_integer("output_len", 512, "generated tokens (pool sizing)")
flags.DEFINE_integer("batch", 2, "sequences the pool holds at full length")
flags.DEFINE_list("options", ["configs/rocket_chunked.yaml"], "options YAMLs ('dense' = none)")
flags.DEFINE_string("config", "llama-3.1-8b", "model shape (configs/models)")
flags.DEFINE_integer("top", 12, "largest HLO arrays to print per program")
flags.DEFINE_bool("smoke", False, "tiny model on the CPU")

_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f8e5m2": 1, "f8e4m3fn": 1, "pred": 1, "s8": 1, "u8": 1}


def largest_arrays(hlo: str, top: int):
  rows = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]", line)
    if m and m.group(2) in _BYTES and m.group(3):
      dims = tuple(int(x) for x in m.group(3).split(","))
      nbytes = _BYTES[m.group(2)] * math.prod(dims)
      op = re.search(r"\] ?\{?[\d,]*\}? ?([\w-]+)\(", line)
      meta = re.search(r'op_name="([^"]+)"', line)
      key = (m.group(2), dims, op.group(1) if op else "?", meta.group(1)[-90:] if meta else "")
      rows[key] = max(rows.get(key, 0), nbytes)
  return sorted(((b, k) for k, b in rows.items()), reverse=True)[:top]


def main(_):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import models
  from bench import model_config
  from pallas_kernels import _compat
  from sparse_jax.bench import load_options
  from sparse_jax.config import KvCacheConfig
  from sparse_jax.engine import Engine

  _compat.silence_triton_deprecations()
  if FLAGS.smoke:
    from tests.model_fixtures import tiny_llama
    model, dtype, backend = tiny_llama(0, max_pos=FLAGS.input_len + FLAGS.output_len), jnp.float32, "reference"
  else:
    model = models.build_model(model_config(FLAGS.config), dtype=jnp.bfloat16)
    dtype, backend = jnp.bfloat16, "pallas"
  for entry in FLAGS.options:
    name, options = load_options(entry)
    sparse = options.sparse_attention_config if options else None
    kv = options.kv_cache_config if options else KvCacheConfig()
    chunked_cfg = bool(options and options.enable_chunked_prefill)
    total = FLAGS.input_len + FLAGS.output_len
    page = kv.tokens_per_block
    kv = dataclasses.replace(kv, max_tokens=FLAGS.batch * math.ceil(total / page) * page)
    eng = Engine(model, kv_cache_config=kv, sparse_attention_config=sparse, backend=backend, kv_dtype=dtype,
                 max_batch_size=FLAGS.batch, max_seq_len=total, enable_chunked_prefill=chunked_cfg)
    pool = sum(x.nbytes for x in jax.tree_util.tree_leaves(eng.cache))
    print(f"\n=== {name}: pool {pool / 1e9:.2f} GB, weights "
          f"{sum(x.nbytes for x in jax.tree_util.tree_leaves(eng.params)) / 1e9:.2f} GB", flush=True)
    table = jnp.asarray(eng.allocator.table())
    samp = eng.sampling_state(np.array([0]))
    c = eng.max_num_tokens
    if chunked_cfg:
      last = max((FLAGS.input_len - 1) // c * c, 2 * c)
      programs = [("chunk (middle)", True, False, c, last - c), ("chunk (final)", True, True, c, last)]
    else:
      programs = [("one-shot", False, True, FLAGS.input_len, 0)]
    for label, chunked, final, t, start in programs:
      n_pages = eng.page_table_width(start + t)
      lowered = eng.prefill_fn.lower(
          eng.params, eng.cache, table, jnp.zeros((1, t), jnp.int32), jnp.array([t], jnp.int32),
          jnp.array([0], jnp.int32), jnp.array([start], jnp.int32), samp, eng.history, n_pages=n_pages, chunked=chunked,
          final=final)
      compiled = lowered.compile()
      m = compiled.memory_analysis()
      print(f"-- {label}: temp {m.temp_size_in_bytes / 2**30:.2f} GiB, args "
            f"{m.argument_size_in_bytes / 2**30:.2f} GiB, aliased {m.alias_size_in_bytes / 2**30:.2f} GiB", flush=True)
      for nbytes, (dt, dims, op, meta) in largest_arrays(compiled.as_text(), FLAGS.top):
        print(f"   {nbytes / 2**30:7.3f} GiB {dt}{list(dims)} {op} {meta}")
    del eng


if __name__ == "__main__":
  app.run(main)
