"""bench/eval_report.py: the EVAL.md tables and the accuracy-vs-budget plot from a suite JSON."""
import json
import os

from matplotlib.collections import PolyCollection

from bench import eval_report

GRID = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "eval_grid.json")


def _point(algo, budget, task, ctx, acc):
  return dict(algorithm=algo, budget=budget, task=task, context_length=ctx, num_samples=4, accuracy=acc)


def _suite():
  pts = []
  for task, d in (("niah_single", 1.0), ("niah_multikey", 0.5)):
    pts.append(_point("dense", None, task, 8192, d))
    for b, o, q in ((128, 1.0, 0.25), (512, 1.0, 0.75)):
      pts += [_point("oracle", b, task, 8192, o * d), _point("quest", b, task, 8192, q)]
  return dict(device="cpu", date="today", model="m", seed=0, points=pts, skipped=[])


def test_tables_give_each_budget_its_mean_and_share_of_dense():
  text = eval_report.tables(_suite())
  assert "| quest | 128 | 0.25 | 0.25 | 0.25 | 33% |" in text
  assert "| oracle | **512** | 1.00 | 0.50 | 0.75 | 100% |" in text


def test_plot_shades_the_oracle_band_and_labels_budgets_as_shares_of_the_context(tmp_path):
  path = tmp_path / "plot.png"
  fig = eval_report.plot(_suite(), str(path))
  assert path.stat().st_size > 0
  ax = fig.axes[0]
  bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
  assert len(bands) == 1
  ys = bands[0].get_paths()[0].vertices[:, 1]
  assert min(ys) == 0.99 * 0.75 and max(ys) == 0.75  # the oracle's mean, and 99% of it
  assert [t.get_text() for t in ax.get_xticklabels()] == ["128\n1/64", "512\n1/16"]


def test_the_published_grid_renders():
  result = json.load(open(GRID))
  assert "### Budget sweep" in eval_report.tables(result)
  assert len(eval_report.plot(result, os.devnull).axes) == len({p["context_length"] for p in result["points"]
                                                                   if p["algorithm"] != "dense"})
