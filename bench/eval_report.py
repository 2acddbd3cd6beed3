"""Turns a `bench/eval_suite.py` JSON into the EVAL.md tables and the accuracy-vs-budget plot.

  python bench/eval_report.py --suite=eval.json --plot=docs/eval_budgets.png > tables.md

Tables: dense accuracy per task and context; the budget sweep, one table per context: per
algorithm and budget the accuracy of each sweep task, their mean, and that mean as a share of
dense's (dense over all samples of its point; the sweep's samples are the first of them; the
budget of 1/16 of the context in bold) and, where the suite recorded it, the attended share of
the context (`attended_fraction`, mean over the layers: dense first layers count in full, so
Quest's default of two dense layers on a 4-layer model attends to over half of it at any
budget); points the suite skipped (time limit) are listed, not invented. The plot: mean accuracy
over the sweep tasks against the token budget (each tick also as its share of the context), one
panel per context, one line per algorithm, dense as a horizontal reference line, and the band from
the oracle's accuracy down to 99% of it shaded: the goal band for a real predictor.
"""
from __future__ import annotations

import collections
import json
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("suite", None, "eval_suite.py JSON")
flags.DEFINE_string("plot", "", "PNG path for the accuracy-vs-budget plot")


def tables(result: dict) -> str:
  pts = result["points"]
  dense = {(p["task"], p["context_length"]): p for p in pts if p["algorithm"] == "dense"}
  out = [f"Device {result['device']}, {result['date']}, model `{result['model']}`, seed {result['seed']}.", "",
         "### Dense", "", "| task | " + " | ".join(f"{c // 1024}K" for c in sorted({c for _, c in dense})) + " |",
         "|---|" + "---|" * len({c for _, c in dense})]
  ctxs = sorted({c for _, c in dense})
  for task in dict.fromkeys(t for t, _ in dense):
    cells = [f"{dense[(task, c)]['accuracy']:.2f} ({dense[(task, c)]['num_samples']})" if (task, c) in dense else "-"
             for c in ctxs]
    out.append(f"| {task} | " + " | ".join(cells) + " |")
  sweep = [p for p in pts if p["algorithm"] != "dense"]
  if sweep:
    tasks = list(dict.fromkeys(p["task"] for p in sweep))
    short = [t.replace("niah_", "") for t in tasks]
    n = sorted({p["num_samples"] for p in sweep})
    attended = any("attended_fraction" in p for p in sweep)
    out += ["", f"### Budget sweep ({'/'.join(map(str, n))} samples per point; dense: all samples of the dense point; "
            + ("attended: the share of the context a decode step attends to, mean over the layers (dense layers "
               "count in full); " if attended else "")
            + "mean over the tasks, and that mean as a share of dense's; '-': not measured)"]
    at = {(p["algorithm"], p["budget"], p["task"], p["context_length"]): p for p in sweep}
    for ctx in sorted({p["context_length"] for p in sweep}):
      d = [dense[(t, ctx)]["accuracy"] if (t, ctx) in dense else float("nan") for t in tasks]
      d_mean = sum(d) / len(d)
      head = "| algorithm | budget | " + ("attended | " if attended else "") + " | ".join(short) + " | mean | of dense |"
      out += ["", f"**{ctx // 1024}K context** (1/16 of it: budget {ctx // 16})", "",
              head, "|---|---|" + "---|" * (len(tasks) + 2 + attended),
              "| dense | - | " + ("100% | " if attended else "") + " | ".join(f"{v:.2f}" for v in d) +
              f" | {d_mean:.2f} | 100% |"]
      for algo in dict.fromkeys(p["algorithm"] for p in sweep):
        for budget in sorted({p["budget"] for p in sweep if p["algorithm"] == algo}):
          row = [at.get((algo, budget, t, ctx)) for t in tasks]
          if not any(row):
            continue
          cells = [f"{r['accuracy']:.2f}" if r else "-" for r in row]
          mean = "- | -"
          if all(row):
            m = sum(r["accuracy"] for r in row) / len(row)
            mean = f"{m:.2f} | " + (f"{100 * m / d_mean:.0f}%" if d_mean > 0 else "-")  # no share of a dense 0
          mark = "**" if budget == ctx // 16 else ""
          share = ""
          if attended:
            f = [r["attended_fraction"] for r in row if r and "attended_fraction" in r]
            share = (f"{100 * sum(f) / len(f):.3g}% | " if f else "- | ")
          out.append(f"| {algo} | {mark}{budget}{mark} | {share}" + " | ".join(cells) + f" | {mean} |")
  skipped = collections.Counter((s["algorithm"], s["budget"]) for s in result.get("skipped", []))
  if skipped:
    out += ["", "Not measured (the suite's time limit ran out): " +
            ", ".join(f"{a} @ {b} ({n} points)" for (a, b), n in skipped.items()) + "."]
  return "\n".join(out)


ORACLE = "oracle"
ORACLE_SHARE = 0.99


def _fraction(budget: int, context: int) -> str:
  """`budget` as a share of `context`: "1/64" when it divides evenly, else a percentage."""
  if budget > 0 and context % budget == 0:
    return f"1/{context // budget}"
  return f"{100 * budget / context:.2g}%"


def plot(result: dict, path: str):
  """Writes the plot to `path`; returns the matplotlib figure."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  pts = result["points"]
  sweep = [p for p in pts if p["algorithm"] != "dense"]
  ctxs = sorted({p["context_length"] for p in sweep})
  tasks = sorted({p["task"] for p in sweep})
  algos = sorted({p["algorithm"] for p in sweep})
  colors = {a: f"C{i}" for i, a in enumerate(algos)}
  fig, axes = plt.subplots(1, max(1, len(ctxs)), figsize=(5 * max(1, len(ctxs)), 4), squeeze=False)
  for ax, ctx in zip(axes[0], ctxs):
    dense = [p["accuracy"] for p in pts if p["algorithm"] == "dense" and p["context_length"] == ctx and p["task"] in tasks]
    if dense:
      ax.axhline(sum(dense) / len(dense), color="k", ls="--", label="dense")
    by = collections.defaultdict(dict)
    for p in sweep:
      if p["context_length"] == ctx:
        by[p["algorithm"]].setdefault(p["budget"], []).append(p["accuracy"])
    budgets = set()
    for algo, per in sorted(by.items()):
      # only budgets where every sweep task was measured, so a line never mixes task sets
      bs = sorted(b for b, v in per.items() if len(v) == len(tasks))
      if not bs:
        continue
      budgets.update(bs)
      acc = [sum(per[b]) / len(per[b]) for b in bs]
      ax.plot(bs, acc, marker="o", label=algo, color=colors[algo])
      if algo == ORACLE:  # the band a predictor must reach: at least ORACLE_SHARE of the oracle's accuracy
        ax.fill_between(bs, [ORACLE_SHARE * a for a in acc], acc, color=colors[algo], alpha=0.18, lw=0,
                        label=f">= {ORACLE_SHARE:.0%} of the oracle")
    ax.set_xscale("log", base=2)
    if budgets:  # each budget also as its share of the context
      ticks = sorted(budgets)
      ax.set_xticks(ticks, [f"{b}\n{_fraction(b, ctx)}" for b in ticks], fontsize=7)
      ax.minorticks_off()
    ax.set_title(f"{ctx // 1024}K context, mean over {', '.join(tasks)}", fontsize=8)
    ax.set_xlabel("token budget (share of the context)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return fig


def main(_):
  result = json.load(open(FLAGS.suite))
  print(tables(result))
  if FLAGS.plot:
    plot(result, FLAGS.plot)


if __name__ == "__main__":
  app.run(main)
