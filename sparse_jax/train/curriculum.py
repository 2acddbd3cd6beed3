"""The schedules of a run: the learning rate and the curriculum phase at each moment."""
from __future__ import annotations

import math
from typing import Sequence

from sparse_jax.train.config import TrainConfig


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
  """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio over progress."""
  warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
  cos = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
  return cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def phase_at(curriculum: Sequence[tuple[int, float]], progress: float) -> int:
  """Index of the phase that `progress` (0..1) falls in; fractions are normalised."""
  total = sum(f for _, f in curriculum)
  acc = 0.0
  for i, (_, f) in enumerate(curriculum):
    acc += f / total
    if progress < acc:
      return i
  return len(curriculum) - 1


class Schedule:
  """Which curriculum phase each moment of training uses.

  Each phase gets its time fraction of the training time left when it starts (so without gates
  the phases follow their nominal fractions exactly). The gated phases, `gate_from` through
  `gate_phase` (never the last phase; gate_phase < 0 disables gating), last at least that long
  and until the gate metric passed to `phase` (the exact match of held-out retrieval samples at
  that phase's length, or the answer-token accuracy) reaches `gate_acc`, or progress reaches
  `gate_max`: the retrieval circuits must have formed first, before that longer contexts and
  harder tasks only slow learning down. A metric opens at most one gate (the next gated phase
  needs its own measurement). The phases after an opened gate share the time left in
  proportion to their fractions.
  """

  def __init__(self, curriculum: Sequence[tuple[int, float]], gate_phase: int, gate_acc: float, gate_max: float,
               gate_from: int | None = None):
    self.curriculum = [(e[0], e[1]) for e in curriculum]
    self.gate_phase = gate_phase
    self.gate_from = gate_phase if gate_from is None else gate_from
    self.gate_acc, self.gate_max = gate_acc, gate_max
    self.current = 0  # the phase training should be in
    self.start = 0.0  # progress at which it started
    self.opened_at: float | None = None  # progress at which the last gate opened

  def gated(self, index: int) -> bool:
    return 0 <= self.gate_from <= index <= self.gate_phase and index < len(self.curriculum) - 1

  def drop(self, index: int) -> None:
    """Removes phase `index` (its shape failed); later phases move up."""
    self.curriculum.pop(index)
    if index < self.current:
      self.current -= 1
    self.current = min(self.current, len(self.curriculum) - 1)
    if index <= self.gate_phase:
      self.gate_phase -= 1
    if index < self.gate_from:
      self.gate_from -= 1

  def phase(self, progress: float, metric: float) -> int:
    fresh = True
    while self.current < len(self.curriculum) - 1:
      fractions = [f for _, f in self.curriculum[self.current:]]
      end = self.start + (1.0 - self.start) * fractions[0] / sum(fractions)
      if progress < end:
        break
      if self.gated(self.current):
        if (not fresh or metric < self.gate_acc) and progress < self.gate_max:
          break
        self.start = self.opened_at = progress
        fresh = False
      else:
        self.start = end
      self.current += 1
    return self.current
