"""The training run's configuration: the model shape, `TrainConfig`, and the command-line flags
derived from their fields (a field with a `help` in its metadata is a flag of the same name and
default)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from absl import flags

from sparse_jax import tasks

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

#: A checkpoint larger than this is written as several safetensors files (Hugging Face's
#: default shard size).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def flag(default: Any, help: str, from_flag: Callable[[Any], Any] | None = None,
         to_flag: Callable[[Any], Any] | None = None, name: str | None = None, multi: bool = False) -> Any:
  """A dataclass field that is also a command-line flag: `to_flag(default)` is the flag's
  default (a string for tuples), `from_flag(flag value)` the field's value; `name` renames the
  flag, `multi` makes it repeatable."""
  meta = {"help": help, "from_flag": from_flag, "to_flag": to_flag, "name": name, "multi": multi}
  return dataclasses.field(default=default, metadata=meta)


def parse_pairs(text: str, cast=str) -> tuple:
  """"a:0.5,b:1" -> (("a", 0.5), ("b", 1.0)); "" -> ()."""
  out = []
  for item in text.split(",") if text else ():
    key, sep, value = item.strip().partition(":")
    if not sep:
      raise ValueError(f"expected key:value in {text!r}, got {item!r}")
    out.append((cast(key), float(value)))
  return tuple(out)


def format_pairs(pairs) -> str:
  return ",".join(f"{k}:{v}" for k, v in pairs)


def parse_curriculum(text: str) -> tuple:
  """"512:0.2:16384,2048:0.3" -> ((512, 0.2, 16384), (2048, 0.3)): length:fraction[:tokens_per_step]."""
  out = []
  for item in text.split(","):
    parts = item.strip().split(":")
    if len(parts) not in (2, 3):
      raise ValueError(f"expected length:fraction[:tokens_per_step] in {text!r}, got {item!r}")
    out.append((int(parts[0]), float(parts[1])) + ((int(parts[2]),) if len(parts) == 3 else ()))
  return tuple(out)


def format_curriculum(curriculum) -> str:
  return ",".join(":".join(str(x) for x in e) for e in curriculum)


def parse_phase_mixture(text: str) -> tuple:
  """"1=niah_multikey:0.6,kv_lookup:0.4" -> (1, (("niah_multikey", 0.6), ("kv_lookup", 0.4)))."""
  index, sep, mix = text.partition("=")
  if not sep or not index.strip().isdigit():
    raise ValueError(f"--phase_mixture expects PHASE=task:weight,..., got {text!r}")
  return int(index), parse_pairs(mix)


def _parse_ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(",") if x)


def _parse_names(text: str) -> tuple[str, ...]:
  return tuple(t for t in text.split(",") if t)


def _join(values) -> str:
  return ",".join(str(v) for v in values)


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """Architecture of the trained model (a transformers LlamaConfig)."""
  vocab_size: int = 4096
  hidden_size: int = flag(512, "Model width.")
  intermediate_size: int = flag(1024, "MLP width.")
  num_layers: int = flag(4, "Decoder layers.")
  num_heads: int = flag(8, "Attention (query) heads.")
  num_kv_heads: int = flag(4, "KV heads (GQA groups).")
  head_dim: int = flag(64, "Per-head width.")
  rope_theta: float = flag(500000.0, "RoPE base.")
  max_position_embeddings: int = 32768
  rms_norm_eps: float = 1e-5

  def __post_init__(self):
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "head_dim", "max_position_embeddings"):
      if getattr(self, f) <= 0:
        raise ValueError(f"ModelShape.{f}={getattr(self, f)} must be positive")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelShape.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")

  def hf_config(self) -> dict[str, Any]:
    """config.json: the fields transformers' LlamaConfig writes (v5 rope_parameters, plus v4 rope_theta)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "hidden_act": "silu",
        "max_position_embeddings": self.max_position_embeddings, "initializer_range": 0.02,
        "rms_norm_eps": self.rms_norm_eps, "use_cache": True, "pad_token_id": PAD_ID, "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID, "pretraining_tp": 1, "tie_word_embeddings": False,
        "rope_theta": self.rope_theta, "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "dtype": "bfloat16"}

  def num_params(self) -> int:
    h, layer = self.hidden_size, 0
    layer += h * self.num_heads * self.head_dim * 2 + h * self.num_kv_heads * self.head_dim * 2
    layer += 3 * h * self.intermediate_size + 2 * h
    return self.num_layers * layer + 2 * self.vocab_size * h + h


DEFAULT_CURRICULUM = ((512, 0.12), (2048, 0.16), (8192, 0.2), (16384, 0.2), (32768, 0.32))
DEFAULT_MIXTURE = (("niah_single", 0.14), ("niah_multikey", 0.16), ("niah_multivalue", 0.13),
                   ("niah_multiquery", 0.13), ("variable_tracking", 0.12), ("common_words", 0.08),
                   ("kv_lookup", 0.24))
_MIX = dict(from_flag=parse_pairs, to_flag=format_pairs)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run.

  curriculum: (sequence length, fraction of the training time[, tokens per step]) per phase,
    shortest first; a step holds the phase's tokens per step, else tokens_per_step (batch =
    tokens // length, at least 1). Short phases take small batches: retrieval circuits form
    after a number of optimizer *steps*, not tokens.
  max_steps: > 0 makes the schedule step-based (phase and LR by step / max_steps; deterministic);
    0 makes it time-based (by the fraction of the time left for training).
  time_budget_s: wall-clock budget counted from process start; training stops reserve_s
    before it to evaluate and save.
  answer_slots: supervised tokens a row can hold (per length: min(answer_slots, length // 2)).
  pack_min_length: rows shorter than this hold one sample each (see make_row), longer ones are packed.
  warmup_mixture: the task mixture of the first phase (empty: `mixture`), e.g. the single-needle
    task alone, on which the copy (induction) circuits form fastest.
  phase_mixtures: (phase index, mixture) pairs overriding the mixture of those phases, e.g. a
    second, gated phase weighted towards the multi-key needles (key matching forms after the copy
    circuits, and only where it is most of what the batch asks for).
  gate_*: the curriculum gates (see Schedule): each phase gate_from..gate_phase lasts until the
    teacher-forced exact match on gate_samples held-out train-split samples of each of its gate
    tasks (gate_tasks that its mixture trains) at its length, measured every gate_every steps,
    reaches gate_exact_match (or progress reaches gate_max_progress). gate_exact_match=0 gates on
    the answer-token accuracy (gate_answer_acc) instead; gate_phase=-1 disables the gates.
  """
  output_dir: str
  seed: int = flag(0, "Seed of initialisation and training data.")
  time_budget_s: float = flag(500.0, "Wall-clock budget from process start; stops training in time to evaluate "
                              "and save before it.")
  reserve_s: float = flag(30.0, "Seconds kept for the final evaluation and save.")
  max_steps: int = flag(0, "If > 0: train this many steps (step-based schedule) instead of by time.")
  model: ModelShape = ModelShape()
  tokens_per_step: int = flag(65536, "Tokens per optimizer step at every length.")
  curriculum: tuple[tuple, ...] = flag(DEFAULT_CURRICULUM, "length:fraction_of_training_time[:tokens_per_step] per "
                                       "phase, shortest first.", parse_curriculum, format_curriculum)
  mixture: tuple[tuple[str, float], ...] = flag(DEFAULT_MIXTURE, "task:weight of training samples.", **_MIX)
  answer_slots: int = 128
  lm_loss_weight: float = flag(0.1, "Weight of the auxiliary next-token loss on all tokens.")
  lr: float = flag(1.5e-3, "Peak learning rate.")
  min_lr_ratio: float = flag(0.1, "Final learning rate as a fraction of --lr (cosine decay).")
  warmup_steps: int = flag(150, "Linear warmup steps.")
  weight_decay: float = flag(0.1, "AdamW weight decay (matrices only).")
  grad_clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.95
  compute_dtype: str = flag("auto", "auto (bf16 on GPU, f32 on CPU), bfloat16 or float32.")
  attention: str = flag("auto", "auto (cuDNN flash attention when it works), cudnn, or xla.")
  num_workers: int = flag(-1, "Data worker processes (-1: cores - 3, 0: inline).")
  eval_lengths: tuple[int, ...] = flag((4096, 16384, 32768), "Context lengths of the quick evaluation.",
                                       _parse_ints, _join)
  eval_samples: int = flag(8, "Samples per task and length in the quick evaluation.")
  eval_tasks: tuple[str, ...] = tasks.RULER_TASKS
  eval_every_s: float = flag(120.0, "Seconds between evaluations during training.")
  save_every_s: float = flag(120.0, "Seconds between checkpoints.")
  log_every: int = 500
  log_every_s: float = 5.0
  background_compile: bool = True
  max_shard_bytes: int = flag(DEFAULT_MAX_SHARD_BYTES, "Write the weights as several safetensors files of at "
                              "most this many bytes when they are larger.")
  prefetch_batches: int = 8
  pack_min_length: int = flag(0, "Rows shorter than this hold one sample each; longer rows are packed.")
  warmup_mixture: tuple[tuple[str, float], ...] = flag(
      (), "task:weight mixture of the first curriculum phase (empty: --mixture), e.g. niah_single:1, on which the "
      "retrieval circuits form fastest.", **_MIX)
  phase_mixtures: tuple[tuple[int, tuple[tuple[str, float], ...]], ...] = flag(
      (), "PHASE=task:weight,... : the task mixture of curriculum phase PHASE (0-based), e.g. "
      "1=niah_multikey:0.6,kv_lookup:0.25,niah_single:0.15.", lambda texts: tuple(map(parse_phase_mixture, texts)),
      lambda v: [f"{i}={format_pairs(m)}" for i, m in v], name="phase_mixture", multi=True)
  gate_from: int = 0
  gate_phase: int = flag(0, "Curriculum phase the gate holds training at (-1: no gate).")
  gate_answer_acc: float = flag(0.7, "With --gate_exact_match=0: stay at phases <= --gate_phase until the "
                                "answer-token accuracy reaches this (or --gate_max_progress); 0 disables that gate.")
  gate_max_progress: float = flag(0.5, "Fraction of the training time after which the gate opens anyway.")
  gate_exact_match: float = flag(0.9, "Stay at phases <= --gate_phase until the teacher-forced exact match on "
                                 "held-out samples of --gate_tasks at that phase's length reaches this (or "
                                 "--gate_max_progress); 0 falls back to --gate_answer_acc.")
  gate_tasks: tuple[str, ...] = flag(tasks.NEEDLE_TASKS, "Tasks the gate measures.", _parse_names, _join)
  gate_samples: int = 16
  gate_every: int = flag(50, "Steps between gate measurements.")
  tokenizer_corpus_seed: int = 0

  def __post_init__(self):
    self._check_curriculum()
    self._check_tasks()
    if self.gate_every < 1 or self.gate_samples < 1:
      raise ValueError(f"TrainConfig.gate_every={self.gate_every} and gate_samples={self.gate_samples} must be >= 1")
    if any(l < 256 or l % 64 for l in self.eval_lengths):
      raise ValueError(f"TrainConfig.eval_lengths={self.eval_lengths} must be multiples of 64, at least 256")
    if self.compute_dtype not in ("auto", "bfloat16", "float32"):
      raise ValueError(f"TrainConfig.compute_dtype={self.compute_dtype!r}: expected auto, bfloat16 or float32")
    if self.attention not in ("auto", "cudnn", "xla"):
      raise ValueError(f"TrainConfig.attention={self.attention!r}: expected auto, cudnn or xla")
    if self.tokens_per_step < 64:
      raise ValueError(f"TrainConfig.tokens_per_step={self.tokens_per_step} is too small")
    if self.max_shard_bytes <= 0:
      raise ValueError(f"TrainConfig.max_shard_bytes={self.max_shard_bytes} must be positive")

  def _check_curriculum(self) -> None:
    if not self.curriculum:
      raise ValueError("TrainConfig.curriculum is empty")
    if any(len(e) not in (2, 3) for e in self.curriculum):
      raise ValueError(f"TrainConfig.curriculum entries must be (length, fraction[, tokens_per_step]): "
                       f"{self.curriculum}")
    lengths = [e[0] for e in self.curriculum]
    if lengths != sorted(set(lengths)) or any(l < 64 or l % 64 for l in lengths):
      raise ValueError(f"TrainConfig.curriculum lengths {lengths} must be distinct, ascending multiples of 64")
    if any(e[1] <= 0 for e in self.curriculum):
      raise ValueError(f"TrainConfig.curriculum fractions must be positive: {self.curriculum}")
    if any(len(e) == 3 and e[2] < 64 for e in self.curriculum):
      raise ValueError(f"TrainConfig.curriculum tokens_per_step must be at least 64: {self.curriculum}")
    if max(lengths) > self.model.max_position_embeddings:
      raise ValueError(f"TrainConfig.curriculum reaches {max(lengths)} > max_position_embeddings="
                       f"{self.model.max_position_embeddings}")
    bad_phase = [i for i, _ in self.phase_mixtures if not 0 <= i < len(self.curriculum)]
    if bad_phase:
      raise ValueError(f"TrainConfig.phase_mixtures names phase(s) {bad_phase}; the curriculum has "
                       f"{len(self.curriculum)} phases")

  def _check_tasks(self) -> None:
    for name, mix in (("mixture", self.mixture), ("warmup_mixture", self.warmup_mixture or self.mixture),
                      *((f"phase_mixtures[{i}]", m) for i, m in self.phase_mixtures)):
      unknown = [t for t, _ in mix if t not in tasks.TASKS]
      if unknown or not mix or any(w < 0 for _, w in mix) or sum(w for _, w in mix) <= 0:
        raise ValueError(f"TrainConfig.{name}={mix} must weight known tasks {tasks.TASKS} positively")
    if any(t not in tasks.TASKS for t in self.gate_tasks) or (self.gate_exact_match > 0 and not self.gate_tasks):
      raise ValueError(f"TrainConfig.gate_tasks={self.gate_tasks} must be known tasks {tasks.TASKS}")
    bad_eval = [t for t in self.eval_tasks if t not in tasks.RULER_TASKS]
    if bad_eval:
      raise ValueError(f"TrainConfig.eval_tasks has unknown task(s) {bad_eval}; expected from {tasks.RULER_TASKS}")

  def step_tokens(self, length: int) -> int:
    """Tokens per step at `length`: the curriculum entry's own, else tokens_per_step."""
    for e in self.curriculum:
      if e[0] == length and len(e) == 3:
        return int(e[2])
    return self.tokens_per_step

  def batch_size(self, length: int) -> int:
    return max(1, self.step_tokens(length) // length)

  def mixture_at(self, length: int) -> tuple[tuple[str, float], ...]:
    """The task mixture of rows of `length`: its phase's entry of phase_mixtures, else
    warmup_mixture in the first phase (when set), else `mixture`."""
    lengths = [e[0] for e in self.curriculum]
    for index, mix in self.phase_mixtures:
      if lengths[index] == length:
        return mix
    if self.warmup_mixture and len(self.curriculum) > 1 and length == self.curriculum[0][0]:
      return self.warmup_mixture
    return self.mixture

  def gate_tasks_at(self, length: int) -> tuple[str, ...]:
    """Tasks the gate of the phase at `length` measures: the gate tasks its mixture trains."""
    trained = {t for t, w in self.mixture_at(length) if w > 0}
    return tuple(t for t in self.gate_tasks if t in trained) or self.gate_tasks

  def slots(self, length: int) -> int:
    return max(16, min(self.answer_slots, length // 2))


def smoke_config(output_dir: str, **overrides) -> TrainConfig:
  """A tiny model, tiny lengths, ~20 steps on the CPU: exercises the whole pipeline incl. save."""
  base = dict(output_dir=output_dir, time_budget_s=300.0, reserve_s=5.0, max_steps=20,
              model=ModelShape(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=16, max_position_embeddings=1024),
              tokens_per_step=2048, curriculum=((256, 0.5), (512, 0.5)), lr=3e-3, warmup_steps=5,
              eval_lengths=(512,), eval_samples=2, eval_every_s=1e9, save_every_s=1e9, log_every=5, num_workers=2)
  base.update(overrides)
  return TrainConfig(**base)


# -- command-line flags ----------------------------------------------------------------------

def flag_fields(cls) -> list[dataclasses.Field]:
  """The fields of `cls` that are command-line flags."""
  return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_name(field: dataclasses.Field) -> str:
  return field.metadata["name"] or field.name


def define_flags(module_name: str, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """One flag per flag field of TrainConfig and ModelShape (its default and help), for `module_name`."""
  by_type = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}
  for f in flag_fields(TrainConfig) + flag_fields(ModelShape):
    meta, name = f.metadata, flag_name(f)
    kwargs = dict(module_name=module_name, flag_values=flag_values)
    if meta["multi"]:
      flags.DEFINE_multi_string(name, meta["to_flag"](f.default), meta["help"], **kwargs)
    elif meta["to_flag"] is not None:
      flags.DEFINE_string(name, meta["to_flag"](f.default), meta["help"], **kwargs)
    else:
      by_type[type(f.default)](name, f.default, meta["help"], **kwargs)


def config_from_flag_values(output_dir: str, values: dict[str, Any]) -> TrainConfig:
  """TrainConfig from flag values {flag name: value} (every flag of define_flags)."""
  def field_values(cls):
    out = {}
    for f in flag_fields(cls):
      value = values[flag_name(f)]
      out[f.name] = f.metadata["from_flag"](value) if f.metadata["from_flag"] is not None else value
    return out
  return TrainConfig(output_dir=output_dir, model=ModelShape(**field_values(ModelShape)), **field_values(TrainConfig))
