"""Helpers shared by the benchmarks: device set-up, copy ceiling, timing, tables, JSON.

Timing (``time_fn``): compile and warm up, then three estimates, all upper bounds of the
device time of one call:

* ``us_call``:      median of [dispatch, block_until_ready] per call (host latency included);
* ``us_pipelined``: ``n`` calls dispatched back to back, one sync at the end, / n
                    (hides host dispatch whenever the device is slower than the host);
* ``us_loop``:      for calls under ``loop_below_us``: ``k`` calls inside ONE jit
                    (``lax.fori_loop``; every small argument is rewritten each iteration
                    by a no-op XLA cannot see through, so no call is hoisted or merged),
                    minus the same loop without the call, / k.

``us`` = min(us_pipelined, us_loop) is the number to report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import jax  # noqa: E402
from jax import lax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels import _compat  # noqa: E402


def kernel_bench_parser(doc: str, budget_s: float) -> argparse.ArgumentParser:
  """The options of a kernel benchmark (--smoke, --check, --iters, --budget-s, --out); the
  benchmark adds its own (which shapes, sweeps)."""
  parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny test shapes in interpret mode (CPU); exits 0 if it runs")
  parser.add_argument("--check", action="store_true",
                      help="only compare the kernel with the reference on this device")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--budget-s", type=float, default=budget_s,
                      help="wall-clock budget; optional work is skipped once spent")
  parser.add_argument("--out", default="", help="JSON directory (default $OUT)")
  return parser


def setup() -> dict[str, Any]:
  """Silences jax 0.11's Triton deprecation warnings; returns a description of the device."""
  _compat.silence_triton_deprecations()
  device = jax.devices()[0]
  info = dict(
      device=getattr(device, "device_kind", str(device)),
      platform=device.platform,
      jax=jax.__version__,
      date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      argv=" ".join(sys.argv),
  )
  print(f"# device: {info['device']} ({info['platform']}), jax {info['jax']}, "
        f"{info['date']}", flush=True)
  return info


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _block(x):
  return jax.block_until_ready(x)


def measure_copy_ceiling(nbytes: int | None = None, iters: int = 10) -> float:
  """Achievable HBM bandwidth in bytes/s: a large device-to-device elementwise copy
  (``x + 1`` on uint32: every byte read once and written once), (2 * nbytes) / time.
  About 2.9e12 on an H100 SXM. Default size: 2 GiB on a GPU, 64 MiB elsewhere."""
  if nbytes is None:
    nbytes = (2 << 30) if on_gpu() else (64 << 20)
  x = jnp.zeros((nbytes // 4,), jnp.uint32)
  copy = jax.jit(lambda a: a + jnp.uint32(1))
  _block(copy(x))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    _block(copy(x))
    times.append(time.perf_counter() - t0)
  del x
  return 2 * nbytes / min(times)


@dataclasses.dataclass
class Timing:
  us: float  # best estimate: min(us_pipelined, us_loop)
  us_call: float
  us_pipelined: float
  us_loop: float | None
  calls: int  # timed calls in the pipelined estimate (per repetition)

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


_VARY_MAX_BYTES = 4 << 20


def _varied_arg_indices(args) -> list[int]:
  """Arguments small enough to rewrite every iteration (q, ids, lengths, ...): all those up
  to 4 MiB, at least the smallest one. Big pools stay untouched (no copy per iteration)."""
  sizes = [a.size * a.dtype.itemsize for a in args]
  plain = [j for j, a in enumerate(args)  # no arithmetic on float8 & co.
           if a.dtype == jnp.bool_ or (a.dtype.kind in "iuf" and a.dtype.itemsize >= 2)]
  small = [j for j in plain if sizes[j] <= _VARY_MAX_BYTES]
  return small or [min(plain, key=lambda j: sizes[j])]


def _vary(i, a):
  """``a`` itself, but XLA cannot prove it (i >= 0 is not known to the simplifier), so
  nothing computed from ``a`` can be hoisted out of the loop or merged across iterations."""
  one = jnp.ones((), a.dtype) if a.dtype != jnp.bool_ else True
  changed = (a + one) if a.dtype != jnp.bool_ else ~a
  return jnp.where(i < 0, changed, a)


def _looped(fn: Callable, k: int, args, *, null: bool = False) -> Callable:
  """``k`` calls of ``fn(*args)`` in one jit (``lax.fori_loop``). The small arguments go
  through :func:`_vary` with the loop index, so no call (nor its XLA pre/post-processing)
  can be hoisted out of the loop or deduplicated. ``null=True`` builds the same loop
  without ``fn`` (only the _vary work), whose time is subtracted."""
  varied = _varied_arg_indices(args)

  @jax.jit
  def run(*args):
    def fresh(i):
      return [_vary(i, a) if j in varied else a for j, a in enumerate(args)]

    if null:
      init = tuple(args[j] for j in varied)
      return lax.fori_loop(0, k, lambda i, c: tuple(fresh(i)[j] for j in varied), init)
    out_shape = jax.eval_shape(fn, *args)
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
    return lax.fori_loop(0, k, lambda i, c: fn(*fresh(i)), init)

  return run


def time_fn(fn: Callable, *args, iters: int = 20, reps: int = 3, loop: bool = True,
            loop_below_us: float = 100.0, loop_target_us: float = 4000.0,
            max_seconds: float = 2.0) -> Timing:
  """Times ``fn(*args)`` (``fn`` is jitted here if it is not already)."""
  if not hasattr(fn, "lower"):
    fn = jax.jit(fn)
  _block(fn(*args))  # compile
  _block(fn(*args))  # warm
  call_times = []
  for _ in range(min(iters, 10)):
    t0 = time.perf_counter()
    _block(fn(*args))
    call_times.append(time.perf_counter() - t0)
  us_call = 1e6 * statistics.median(call_times)

  # Long calls: fewer repetitions so one point stays within ~max_seconds.
  calls = int(max(3, min(iters, max_seconds * 1e6 / (reps * max(us_call, 1.0)))))
  per_call = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = None
    for _ in range(calls):
      out = fn(*args)
    _block(out)
    per_call.append((time.perf_counter() - t0) / calls)
  us_pipelined = 1e6 * statistics.median(per_call)

  us_loop = None
  if loop and us_pipelined < loop_below_us:
    k = int(min(2000, max(8, math.ceil(loop_target_us / max(us_pipelined, 1.0)))))
    looped, null = _looped(fn, k, args), _looped(fn, k, args, null=True)
    _block(looped(*args))
    _block(null(*args))
    loop_times, null_times = [], []
    for _ in range(reps):
      t0 = time.perf_counter()
      _block(looped(*args))
      loop_times.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      _block(null(*args))
      null_times.append(time.perf_counter() - t0)
    us_loop = 1e6 * (statistics.median(loop_times) - statistics.median(null_times)) / k
    if us_loop <= 0:  # noise: the loop told us nothing
      us_loop = None
  best = min(us_pipelined, us_loop) if us_loop is not None else us_pipelined
  return Timing(best, us_call, us_pipelined, us_loop, calls)


def time_stateful(step: Callable, state, *args, iters: int = 20, reps: int = 3) -> tuple[
    Timing, Any]:
  """Times ``state = step(state, *args)`` where ``step`` donates ``state`` (in-place
  kernels). Calls are chained through the state; returns (timing, final state)."""
  state = _block(step(state, *args))  # compile
  state = _block(step(state, *args))
  call_times = []
  for _ in range(min(iters, 10)):
    t0 = time.perf_counter()
    state = _block(step(state, *args))
    call_times.append(time.perf_counter() - t0)
  us_call = 1e6 * statistics.median(call_times)
  per_call = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(iters):
      state = step(state, *args)
    state = _block(state)
    per_call.append((time.perf_counter() - t0) / iters)
  us_pipelined = 1e6 * statistics.median(per_call)
  return Timing(us_pipelined, us_call, us_pipelined, None, iters), state


def bandwidth(nbytes: float, us: float, ceiling: float | None) -> dict[str, Any]:
  """Achieved TB/s on ``nbytes`` and % of the copy ceiling (bytes/s)."""
  tbps = nbytes / (us * 1e-6) / 1e12 if us else float("nan")
  pct = 100.0 * tbps * 1e12 / ceiling if ceiling else float("nan")
  return dict(bytes=int(nbytes), tb_s=round(tbps, 3), pct_ceiling=round(pct, 1))


class Budget:
  """Wall-clock budget of one benchmark script: optional work is skipped once spent."""

  def __init__(self, seconds: float):
    self.start = time.perf_counter()
    self.seconds = seconds

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def left(self) -> float:
    return self.seconds - self.elapsed()

  def spent(self, reserve: float = 0.0) -> bool:
    return self.left() < reserve


def guarded(label: str, fn: Callable, *args, **kwargs):
  """Runs ``fn``; on failure prints the error and returns (None, error string)."""
  try:
    return fn(*args, **kwargs), None
  except Exception as e:  # a failing baseline must not lose the rest of the run
    message = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    print(f"  ! {label}: {message}", flush=True)
    return None, message


def _fmt(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    if math.isnan(value):
      return "-"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
  return str(value)


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str = "") -> None:
  if title:
    print(f"\n## {title}")
  cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
  widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  print("  ".join("-" * w for w in widths))
  for r in cells:
    print("  ".join(v.ljust(w) for v, w in zip(r, widths)), flush=True)


def dump_json(name: str, payload: Any, out_dir: str | None = None) -> str | None:
  """Writes ``payload`` to ``<out_dir or $OUT>/<name>.json``; no-op when neither is set."""
  out_dir = out_dir or os.environ.get("OUT")
  if not out_dir:
    return None
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.json")
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=str)
  return path


def json_rows(name: str, payload: dict[str, Any], out_dir: str | None, **fields):
  """(rows, add): rows becomes payload["rows"]; add(row) appends {**fields, **row} and rewrites
  ``<name>.json`` (dump_json), so a run cut short keeps every row measured so far."""
  rows: list[dict[str, Any]] = []
  payload["rows"] = rows

  def add(row: dict[str, Any]) -> None:
    rows.append({**fields, **row})
    dump_json(name, payload, out_dir)

  return rows, add


def max_abs_error(out, ref) -> float:
  a = jnp.asarray(out, jnp.float32)
  b = jnp.asarray(ref, jnp.float32)
  both_inf = jnp.isinf(a) & jnp.isinf(b) & (a == b)
  return float(jnp.max(jnp.where(both_inf, 0.0, jnp.abs(a - b))))


def finish(name: str, label: str, rows: list[dict[str, Any]], columns: list[str], ceiling: float, payload: Any,
           out_dir: str | None, budget) -> int:
  """A kernel benchmark's epilogue: the whole table, the JSON, the elapsed time; returns 0."""
  print_table(rows, columns, title=f"{label} (copy ceiling {ceiling / 1e12:.2f} TB/s)")
  path = dump_json(name, payload, out_dir)
  if path:
    print(f"# wrote {path}")
  print(f"# elapsed {budget.elapsed():.0f}s")
  return 0


def random_fill_cache(cache, aux: bool = True):
  """`cache` with random normal K/V (and, with `aux`, aux) pools: one pool at a time, donated
  (two copies of a long-context pool do not fit) and kept on its own sharding."""
  fns = {}

  def one(x, seed):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    key = (jnp.dtype(x.dtype).name, x.sharding)
    if key not in fns:  # one jit per dtype and sharding (compiled once per shape)
      gen_dtype = x.dtype if jnp.dtype(x.dtype).itemsize >= 2 else jnp.bfloat16
      # keep_unused: `x` only donates its buffer; jit would otherwise prune the unused argument,
      # the donation with it, and every layer's fill would allocate a second pool (on the H100
      # with the 8B shape: 51.7 GB in use, 79.2 GB peak during the fill, then out of memory).
      fns[key] = jax.jit(lambda x, key: jax.random.normal(key, x.shape, gen_dtype).astype(x.dtype),
                         donate_argnums=0, out_shardings=x.sharding, keep_unused=True)
    return jax.block_until_ready(fns[key](x, jax.random.PRNGKey(seed)))  # one pool-sized temp at a time

  n = cache.num_layers
  k = tuple(one(x, i) for i, x in enumerate(cache.k))
  v = tuple(one(x, n + i) for i, x in enumerate(cache.v))
  if not aux:
    return cache.replace(k=k, v=v)
  pools = {name: tuple(one(x, 2 * n + 97 * j + i) for i, x in enumerate(p))
           for j, (name, p) in enumerate(sorted(cache.aux.items()))}
  return cache.replace(k=k, v=v, aux=pools)
