"""The training run: data workers, background compilation, the curriculum, periodic
evaluation and checkpoints, and the final evaluation and save."""
from __future__ import annotations

import time

_T_IMPORT = time.monotonic()

import collections
import dataclasses
import functools
import json
import math
import os
import threading
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax import tasks
from sparse_jax.train.checkpoint import Saver, jsonable, write_static_files
from sparse_jax.train.config import TrainConfig
from sparse_jax.train.curriculum import Schedule, lr_at
from sparse_jax.train.data import BatchLoader, start_pool, submit_eval_rows
from sparse_jax.train.steps import (batch_spec, build_model, cudnn_attention_works, eval_step, make_optimizer, run_eval,
                                    train_step)

# Failures a run survives: a device error (out of memory) or a sample that does not fit.
RECOVERABLE = (RuntimeError, tasks.TaskError)


def process_age_s() -> float:
  """Seconds since this process started (from /proc), else since this module was imported."""
  try:
    with open("/proc/self/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    if 0 <= age < 600:
      return age
  except (OSError, ValueError, IndexError):
    pass
  return time.monotonic() - _T_IMPORT


class Clock:
  """Seconds since the process started (the time budget counts from there)."""

  def __init__(self):
    self.t0 = time.monotonic() - process_age_s()

  def __call__(self) -> float:
    return time.monotonic() - self.t0


class Log:
  """Prints progress lines (flushed) and keeps them for training_log.json."""

  def __init__(self, clock: Clock):
    self.clock = clock
    self.lines: list[str] = []

  def __call__(self, msg: str) -> None:
    line = f"[{self.clock():6.1f}s] {msg}"
    self.lines.append(line)
    print(line, flush=True)


class Compiler:
  """Compiles jobs in order, in a background thread (or inline), and hands out the executables.
  A job failing with a RuntimeError (e.g. out of memory) is `failed` and its shape skipped; any
  other error is raised by `get`."""

  def __init__(self, jobs: list[tuple[Any, Callable[[], Any]]], background: bool, log: Log):
    self.results: dict[Any, Any] = {}
    self.errors: dict[Any, Exception] = {}
    self.done = {key: threading.Event() for key, _ in jobs}
    self.log = log
    self.jobs = jobs
    if background:
      self.thread = threading.Thread(target=self._run, daemon=True)
      self.thread.start()
    else:
      self._run()

  def _run(self):
    for key, fn in self.jobs:
      t = time.monotonic()
      try:
        self.results[key] = fn()
        self.log(f"compiled {key} in {time.monotonic() - t:.1f}s")
      except Exception as e:  # kept for get() / failed(): the training thread decides
        self.errors[key] = e
        self.log(f"COMPILE FAILED for {key}: {type(e).__name__}: {e}")
      finally:
        self.done[key].set()

  def get(self, key, block: bool, timeout: float | None = None):
    """The executable for `key`, or None if it is not ready (after waiting `timeout` s when blocking)."""
    if block:
      self.done[key].wait(timeout)
    if not self.done[key].is_set():
      return None
    error = self.errors.get(key)
    if error is not None and not isinstance(error, RuntimeError):
      raise error
    return self.results.get(key)

  def failed(self, key) -> bool:
    return self.done[key].is_set() and isinstance(self.errors.get(key), RuntimeError)


class Trainer:
  """One training run (`run`); its state lives here between the steps of the loop."""

  def __init__(self, cfg: TrainConfig):
    self.cfg = cfg
    self.clock = Clock()
    self.log = Log(self.clock)
    self.on_gpu = jax.default_backend() == "gpu"
    self.compute_dtype = {"auto": jnp.bfloat16 if self.on_gpu else jnp.float32, "bfloat16": jnp.bfloat16,
                          "float32": jnp.float32}[cfg.compute_dtype]
    self.log(f"devices {jax.devices()} | model {cfg.model} ({cfg.model.num_params() / 1e6:.2f}M params) | "
             f"compute {jnp.dtype(self.compute_dtype).name}")
    self._start_data()
    self._choose_attention()
    self._plan_schedule()
    self._start_compiling()
    self.gates: list[dict[str, Any]] = []
    self.evals: list[dict[str, Any]] = []
    self.history: list[dict[str, Any]] = []
    self.record: dict[str, Any] = {
        "seed": cfg.seed, "config": jsonable(dataclasses.asdict(cfg)), "attention": self.attention,
        "device": str(jax.devices()[0]), "num_params": cfg.model.num_params(), "log": self.history,
        "evals": self.evals, "gate": self.gates}
    self.saver = Saver(cfg.output_dir, cfg.max_shard_bytes, self.log)
    self.eval_data: dict[int, dict[str, Any]] = {}
    self.gate_data: dict[int, dict[str, Any]] = {}
    self.t_start: float | None = None  # set when the first step is ready

  # -- setup ----------------------------------------------------------------------------------
  def _start_data(self) -> None:
    """Tokenizer and static checkpoint files, data workers, the first batches and the eval rows."""
    cfg = self.cfg
    tokenizer = tasks.build_tokenizer(cfg.model.vocab_size, cfg.tokenizer_corpus_seed)
    write_static_files(cfg.output_dir, cfg.model, tokenizer)
    self.counter = tasks.TokenCounter(tokenizer)
    # Leave cores for the training loop and the background compiler.
    workers = cfg.num_workers if cfg.num_workers >= 0 else max(1, (os.cpu_count() or 4) - 3)
    self.pool = start_pool(workers, tokenizer.to_str()) if workers > 0 else None
    self.log(f"tokenizer vocab {tokenizer.get_vocab_size()}; {workers} data workers")
    submit = functools.partial(submit_eval_rows, self.pool, self.counter)
    # Eval rows are built first (workers are idle while the first step compiles).
    self.eval_jobs = {(task, length): submit(task, length, cfg.slots(length), cfg.eval_samples, cfg.seed)
                      for length in cfg.eval_lengths for task in cfg.eval_tasks}
    self.loader = BatchLoader(cfg, self.counter, self.pool)
    self.lengths = [e[0] for e in cfg.curriculum]
    self.loader.prime(self.lengths[0])
    # The curriculum gates measure exact match on held-out train-split samples at the gated phases' lengths.
    nominal = Schedule(cfg.curriculum, cfg.gate_phase, cfg.gate_exact_match, cfg.gate_max_progress, cfg.gate_from)
    self.gate_lengths = [l for i, l in enumerate(self.lengths) if cfg.gate_exact_match > 0 and nominal.gated(i)]
    self.gate_jobs = {gl: {task: submit(task, gl, cfg.slots(gl), cfg.gate_samples, cfg.seed, "train", "gate:")
                           for task in cfg.gate_tasks_at(gl)} for gl in self.gate_lengths}

  def _choose_attention(self) -> None:
    """cuDNN flash attention where it works, else XLA attention (whose curriculum stops at 2K on the GPU)."""
    cfg = self.cfg
    self.backend, self.attention = "reference", "xla"
    if cfg.attention in ("auto", "cudnn") and self.on_gpu and self.compute_dtype == jnp.bfloat16:
      ok, why = cudnn_attention_works(cfg.model.num_heads, cfg.model.num_kv_heads, cfg.model.head_dim)
      if ok:
        self.backend, self.attention = "pallas", "cudnn"
      elif cfg.attention == "cudnn":
        raise RuntimeError(f"--attention=cudnn but cuDNN flash attention fails: {why}")
      else:
        self.log(f"WARNING: cuDNN flash attention unavailable ({why}); using XLA attention")
    if self.attention == "xla" and self.on_gpu and max(self.lengths) > 2048:
      # The XLA path materialises T x T scores per query chunk (and keeps them for the backward).
      self.lengths = [l for l in self.lengths if l <= 2048] or self.lengths[:1]
      self.log(f"WARNING: XLA attention on the GPU; curriculum capped at {self.lengths[-1]} tokens")
    self.log(f"attention: {self.attention} (model backend {self.backend!r})")

  def _plan_schedule(self) -> None:
    cfg = self.cfg
    self.gate_lengths = [l for l in self.gate_lengths if l in self.lengths[:-1]]
    self.use_gate = bool(self.gate_lengths)
    gated_ids = [i for i, l in enumerate(self.lengths) if l in self.gate_lengths]
    self.schedule = Schedule([(e[0], e[1]) for e in cfg.curriculum if e[0] in self.lengths],
                             max(gated_ids) if self.use_gate else cfg.gate_phase,
                             cfg.gate_exact_match if self.use_gate else cfg.gate_answer_acc, cfg.gate_max_progress,
                             gate_from=min(gated_ids) if self.use_gate else None)

  def _start_compiling(self) -> None:
    """The model and optimizer state; every training and eval shape compiles in the background."""
    cfg = self.cfg
    graphdef, params = nnx.split(build_model(cfg, self.compute_dtype), nnx.Param)
    tx = make_optimizer(cfg)
    self.state = {"params": params, "opt": tx.init(params)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.state)
    step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, backend=self.backend,
                                        lm_weight=cfg.lm_loss_weight), donate_argnums=(0,))
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, backend=self.backend))
    lr = jax.ShapeDtypeStruct((), jnp.float32)
    train_job = lambda l: lambda: step_fn.lower(abstract, batch_spec(cfg, l), lr).compile()
    eval_job = lambda l: lambda: eval_fn.lower(abstract["params"], *(batch_spec(cfg, l)[k]
                                                                     for k in ("tokens", "pos", "tgt"))).compile()
    jobs = [(("train", l), train_job(l)) for l in self.lengths] + [(("eval", l), eval_job(l)) for l in cfg.eval_lengths]
    # Each gate's eval compiles right after the training shape of its phase.
    for gl in reversed(self.gate_lengths):
      if gl not in cfg.eval_lengths:
        jobs.insert(self.lengths.index(gl) + 1, (("eval", gl), eval_job(gl)))
    self.compiler = Compiler(jobs, cfg.background_compile, self.log)

  # -- evaluation ---------------------------------------------------------------------------
  def _eval_rows(self, length: int) -> dict[str, Any]:
    if length not in self.eval_data:
      self.eval_data[length] = {t: self.eval_jobs[(t, length)]() for t in self.cfg.eval_tasks}
    return self.eval_data[length]

  def _gate_rows(self, gl: int) -> dict[str, Any]:
    if gl not in self.gate_data:
      self.gate_data[gl] = {}
      for task, job in self.gate_jobs[gl].items():
        try:
          self.gate_data[gl][task] = job()
        except tasks.TaskError as e:  # a task that does not fit the gate length is left out
          self.log(f"gate: leaving {task} out at L={gl} ({e})")
    if not self.gate_data[gl]:
      raise tasks.TaskError(f"no gate task fits the gate length {gl}")
    return self.gate_data[gl]

  def evaluate(self, params, limit: int | None = None, block: bool = False) -> dict[str, dict[str, float]]:
    """{length: {task: exact match}} at every eval length whose step has compiled (`block`:
    waiting for it while the time budget allows; saving needs ~10 s)."""
    result = {}
    for length in self.cfg.eval_lengths:
      wait = max(0.0, self.cfg.time_budget_s - 10.0 - self.clock()) if block else None
      fn = self.compiler.get(("eval", length), block=block, timeout=wait)
      if fn is None:
        if block:
          self.log(f"skipping the eval at {length}: not compiled in time")
        continue
      result[str(length)] = run_eval(fn, params, self._eval_rows(length), self.cfg.batch_size(length), limit)
    return result

  def _maybe_gate(self) -> None:
    """Measures the gate of the current phase every gate_every steps."""
    cfg, length = self.cfg, self.length
    if not (self.use_gate and self.schedule.gated(self.phase) and self.schedule.current == self.phase
            and self.step % cfg.gate_every == 0 and length in self.gate_jobs and ("eval", length) in self.compiler.done):
      return
    fn = self.compiler.get(("eval", length), block=bool(cfg.max_steps))
    if fn is None:
      return
    self._drain(0)
    try:
      result = run_eval(fn, self.state["params"], self._gate_rows(length), cfg.batch_size(length))
    except RECOVERABLE as e:  # a broken gate must not end training: the schedule falls back to time
      self.log(f"gate eval failed ({type(e).__name__}: {e}); the curriculum follows time only")
      self.record.setdefault("errors", []).append(f"gate eval at step {self.step}: {type(e).__name__}: {e}")
      self.use_gate = False
      self.schedule.gate_phase = -1
      return
    self.gate_em = float(np.mean(list(result.values())))
    self.gates.append({"step": self.step, "time_s": self.clock(), "length": length, "exact_match": self.gate_em,
                       "tasks": result})
    self.log(f"gate @ step {self.step} (L={length}): exact match {self.gate_em:.3f} {json.dumps(result)}")

  def _maybe_eval_and_save(self) -> None:
    cfg, now = self.cfg, self.clock()
    if now - self.last_eval >= cfg.eval_every_s:
      self._drain(0)
      try:
        result = self.evaluate(self.state["params"], limit=max(1, cfg.eval_samples // 2))
      except RECOVERABLE as e:  # a broken eval must not end training
        result = {}
        self.log(f"eval failed: {type(e).__name__}: {e}")
        self.record.setdefault("errors", []).append(f"eval at step {self.step}: {type(e).__name__}: {e}")
      if result:
        self.evals.append({"step": self.step, "time_s": self.clock(), "accuracy": result})
        self.log(f"eval @ step {self.step}: {json.dumps(result)}")
      self.last_eval = self.clock()
    if now - self.last_save >= cfg.save_every_s:
      self._drain(0)
      self._update_counts()
      self._save(jax.device_get(self.state["params"]), background=True)
      self.last_save = self.clock()

  def _save(self, params_host, background: bool) -> None:
    self.record["console"] = list(self.log.lines)
    self.saver.save(params_host, self.record, background)

  # -- the loop -------------------------------------------------------------------------------
  def _start_loop(self) -> None:
    cfg = self.cfg
    self.compiled = self.compiler.get(("train", self.lengths[0]), block=True)
    if self.compiled is None:
      raise RuntimeError(f"the first training step failed to compile: {self.compiler.errors}")
    self.deadline = cfg.time_budget_s - cfg.reserve_s
    self.phase, self.length = 0, self.schedule.curriculum[0][0]
    self.step, self.tokens_seen, self.answer_tokens = 0, 0, 0
    self.inflight: collections.deque = collections.deque()
    self.window = {"loss": 0.0, "acc": 0.0, "lm": 0.0, "n": 0, "tokens": 0, "wait": 0.0, "t": time.monotonic()}
    self.samples_seen: collections.Counter = collections.Counter()
    self.last_save = self.last_eval = self.clock()
    self.step_time: collections.defaultdict = collections.defaultdict(float)
    self.snapshot, self.probation = None, 0
    self.acc_ema = self.gate_em = 0.0
    self.stop_reason = "time budget"
    self.t_start = self.clock()
    self.log(f"training starts; deadline {self.deadline:.0f}s ({self.deadline - self.t_start:.0f}s of training)")

  def _progress(self) -> float:
    if self.cfg.max_steps:
      return self.step / self.cfg.max_steps
    return (self.clock() - self.t_start) / max(1e-6, self.deadline - self.t_start)

  def _drain(self, keep: int) -> None:
    """Reads the metrics of all but `keep` dispatched steps; raises FloatingPointError on a
    non-finite loss."""
    while len(self.inflight) > keep:
      s, m, n_tok, n_ans, length, _ = self.inflight.popleft()
      m = jax.device_get(m)
      self.acc_ema = 0.95 * self.acc_ema + 0.05 * float(m["acc"])
      w = self.window
      w["loss"] += float(m["loss"])
      w["lm"] += float(m["lm_loss"])
      w["acc"] += float(m["acc"])
      w["n"] += 1
      w["tokens"] += n_tok
      self.answer_tokens += n_ans
      if not math.isfinite(float(m["loss"])):
        raise FloatingPointError(f"loss is {m['loss']} at step {s}")
      if w["n"] >= self.cfg.log_every or time.monotonic() - w["t"] >= self.cfg.log_every_s:
        self._log_window(s, length, float(m["grad_norm"]))

  def _log_window(self, s: int, length: int, grad_norm: float) -> None:
    w = self.window
    dt = time.monotonic() - w["t"]
    entry = {"step": s + 1, "length": length, "loss": w["loss"] / w["n"], "lm_loss": w["lm"] / w["n"],
             "answer_token_acc": w["acc"] / w["n"], "tokens_per_s": w["tokens"] / dt,
             "lr": lr_at(self.cfg, s, self._progress()), "grad_norm": grad_norm, "tokens": self.tokens_seen,
             "time_s": self.clock(), "data_wait": w["wait"] / dt}
    self.history.append(entry)
    self.log(f"step {s + 1:5d} | L={length:5d} B={self.cfg.batch_size(length):3d} | loss {entry['loss']:.4f} | "
             f"lm {entry['lm_loss']:.3f} | ans-acc {entry['answer_token_acc']:.3f} | "
             f"{entry['tokens_per_s'] / 1e3:7.1f}k tok/s | lr {entry['lr']:.2e} | gnorm {grad_norm:.2f} | "
             f"data-wait {100 * entry['data_wait']:.0f}%")
    w.update(loss=0.0, acc=0.0, lm=0.0, n=0, tokens=0, wait=0.0, t=time.monotonic())

  def _advance_phase(self, progress: float) -> None:
    """Moves to the next curriculum phase(s) the schedule asks for whose step has compiled."""
    cfg, schedule = self.cfg, self.schedule
    while self.phase < schedule.phase(progress, self.gate_em if self.use_gate else self.acc_ema):
      nxt = schedule.curriculum[self.phase + 1][0]
      if self.compiler.failed(("train", nxt)):
        self.log(f"skipping phase L={nxt}: it did not compile")
        schedule.drop(self.phase + 1)
        continue
      fn = self.compiler.get(("train", nxt), block=bool(cfg.max_steps))
      if fn is None:
        break  # not compiled yet: keep training the current length
      self._drain(0)
      # A new shape may still fail when it first runs (e.g. out of memory): keep a host copy of
      # the state so its first steps can be undone and the previous length resumed.
      self.snapshot = (jax.device_get(self.state), self.length, self.compiled)
      self.probation = 2
      self.loader.drop(self.length)
      self.phase += 1
      self.length, self.compiled = nxt, fn
      self.loader.prime(self.length)
      self.log(f"phase {self.phase}: length {self.length}, batch {cfg.batch_size(self.length)} (progress "
               f"{progress:.2f}, answer-token acc {self.acc_ema:.2f}"
               + (f", gate exact match {self.gate_em:.2f})" if self.use_gate else ")"))
      self.gate_em = 0.0  # the next gate needs its own measurement

  def _undo_phase(self, error: Exception) -> None:
    """Back to the previous length from the snapshot taken when the failing phase began."""
    host_state, prev_length, prev_compiled = self.snapshot
    self.log(f"WARNING: the first steps at length {self.length} failed ({type(error).__name__}: {error}); "
             f"resuming length {prev_length}")
    self.state = jax.device_put(host_state)
    self.inflight.clear()
    self.loader.drop(self.length)
    self.schedule.drop(self.phase)
    self.phase -= 1
    self.length, self.compiled = prev_length, prev_compiled
    self.snapshot, self.probation = None, 0

  def _train_step(self, progress: float) -> bool:
    """Dispatches one optimizer step; False where the new phase's first steps failed and were undone."""
    t_wait = time.monotonic()
    batch = self.loader.next(self.length)
    self.window["wait"] += time.monotonic() - t_wait
    self.samples_seen.update(batch.pop("samples"))
    n_ans = int(batch["w"].sum())
    t0 = time.monotonic()
    lr = np.float32(lr_at(self.cfg, self.step, progress))
    try:
      self.state, metrics = self.compiled(self.state, jax.device_put(batch), lr)
      self.inflight.append((self.step, metrics, batch["tokens"].size, n_ans, self.length, t0))
      if self.probation:
        self._drain(0)
    except (RuntimeError, FloatingPointError) as e:
      if not self.probation or self.snapshot is None:
        raise
      self._undo_phase(e)
      return False
    if self.probation:
      self.probation -= 1
      if not self.probation:
        self.snapshot = None
    self.tokens_seen += batch["tokens"].size
    self.step += 1
    self._drain(2)
    # Rolling per-length step time (dispatch-to-dispatch with 2 steps in flight ~ device time).
    dt = time.monotonic() - t0
    self.step_time[self.length] = 0.8 * self.step_time[self.length] + 0.2 * dt if self.step_time[self.length] else dt
    return True

  def _loop(self) -> None:
    cfg = self.cfg
    while True:
      progress = self._progress()
      if cfg.max_steps and self.step >= cfg.max_steps:
        self.stop_reason = "max_steps"
        break
      if not cfg.max_steps and self.clock() + self.step_time[self.length] * 1.5 >= self.deadline:
        break
      self._advance_phase(progress)
      if self._train_step(progress):
        self._maybe_gate()
        self._maybe_eval_and_save()
    self._drain(0)

  # -- the end --------------------------------------------------------------------------------
  def _update_counts(self) -> None:
    self.record.update(steps=self.step, tokens=self.tokens_seen, answer_tokens=self.answer_tokens,
                       samples=dict(self.samples_seen))

  def _finish(self, error: Exception | None) -> None:
    """Final evaluation and save of what was trained (after an `error`: where the parameters survived)."""
    train_time = self.clock() - self.t_start
    self._update_counts()
    self.record.update(train_time_s=train_time, stop_reason=self.stop_reason,
                       tokens_per_s=self.tokens_seen / max(train_time, 1e-6), final_length=self.length)
    self.log(f"trained {self.step} steps, {self.tokens_seen / 1e6:.1f}M tokens in {train_time:.0f}s "
             f"({self.tokens_seen / max(train_time, 1e-6) / 1e3:.0f}k tok/s); stop: {self.stop_reason}")
    params_host = None
    if not isinstance(error, FloatingPointError):
      try:
        params_host = jax.device_get(self.state["params"])
      except RuntimeError as e:  # e.g. donated to the step that failed
        if error is None:
          raise
        self.log(f"parameters unusable after the error ({e})")
    if params_host is None:
      self.log("the last periodic checkpoint stands")
      self.saver.join()
      self.record["console"] = list(self.log.lines)
      self.saver.write_log(self.record)
      return
    try:
      final = self.evaluate(self.state["params"], block=True)
    except RECOVERABLE as e:
      final = {}
      self.log(f"final eval failed: {type(e).__name__}: {e}")
      self.record.setdefault("errors", []).append(f"final eval: {type(e).__name__}: {e}")
    self.record["final_eval"] = final
    self.log(f"final eval (teacher-forced greedy exact match, {self.cfg.eval_samples}/task): {json.dumps(final)}")
    self._save(params_host, background=False)
    print(json.dumps({"steps": self.step, "tokens": self.tokens_seen, "train_time_s": round(train_time, 1),
                      "tokens_per_s": round(self.tokens_seen / max(train_time, 1e-6)), "final_eval": final,
                      "output_dir": self.cfg.output_dir, "elapsed_s": round(self.clock(), 1)}), flush=True)

  def run(self) -> dict[str, Any]:
    """Trains, evaluates and saves; returns the training log (also in training_log.json). An
    error that stops training is raised after what was trained has been evaluated and saved."""
    error = None
    try:
      self._start_loop()
      self._loop()
    except Exception as e:  # raised again below, once the trained parameters are saved
      self.log(f"TRAINING STOPPED by {type(e).__name__}: {e}\n{traceback.format_exc()}")
      self.stop_reason = f"error: {type(e).__name__}: {e}"
      error = e
    try:
      if self.t_start is not None:
        self._finish(error)
    finally:
      if self.pool is not None:
        self.pool.terminate()
    if error is not None:
      raise error
    return self.record


def train(cfg: TrainConfig) -> dict[str, Any]:
  """Runs training, evaluation and saving; returns the training log (also in training_log.json)."""
  return Trainer(cfg).run()
