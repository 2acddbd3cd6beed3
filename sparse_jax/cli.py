"""The `sparse-jax` command: one entry point for every tool.

    sparse-jax serve --model=DIR --extra_llm_api_options=configs/rocket.yaml
    sparse-jax bench --help

Each tool is also `python -m sparse_jax.<tool>`; both go through `run_tool`, which keeps JAX's
probe of absent accelerator backends out of the log and turns a user's mistake (a bad flag value,
a missing or corrupt checkpoint file, an invalid config) into one `error: ...` line and exit
status 1 instead of a traceback.
"""
from __future__ import annotations

import importlib
import logging
import sys

#: tool name -> (module, what it does)
TOOLS = {
    "serve": ("sparse_jax.serve", "OpenAI-compatible HTTP server"),
    "bench": ("sparse_jax.bench", "serving benchmark (throughput and latency)"),
    "eval": ("sparse_jax.eval", "long-context accuracy of dense and sparse attention"),
    "train": ("sparse_jax.train", "train a model from scratch"),
    "distill": ("sparse_jax.distill", "distill DSA lightning indexers into a model"),
    "demo": ("sparse_jax.demo", "dense vs. sparse answers on one needle-in-a-haystack prompt"),
}


def _quiet_backend_probe() -> None:
  # JAX logs at INFO each backend it fails to initialise ("Unable to initialize backend 'tpu'").
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def run_tool(name: str, argv: list[str] | None = None) -> None:
  """Defines the tool's flags and runs its `main` under absl (argv[0] is the program name)."""
  from absl import app, flags
  module = importlib.import_module(TOOLS[name][0])
  module.define_flags()
  _quiet_backend_probe()
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("-h", "-?", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    # absl's own --help exits with status 1 and describes the __main__ module.
    print(f"{(module.__doc__ or '').strip()}\n\nflags:\n{flags.FLAGS.module_help(module.__name__)}")
    sys.exit(0)
  try:
    flags.FLAGS(argv)
  except flags.Error as e:  # an unknown flag or a bad value: one line, not absl's two
    _fail(f"{e} (see {argv[0]} --help)")

  def guarded_main(args):
    try:
      return module.main(args)
    except app.UsageError as e:  # absl would print the usage of whatever module is __main__
      _fail(str(e))
    except (ValueError, OSError) as e:  # ConfigError and CheckpointError are ValueErrors
      _fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)

  app.run(guarded_main, argv=argv)


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def main(argv: list[str] | None = None) -> None:
  """`sparse-jax <tool> [flags]`."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    lines = [f"  {name:<8} {doc}" for name, (_, doc) in TOOLS.items()]
    print("usage: sparse-jax <tool> [--flags]   (sparse-jax <tool> --help lists a tool's flags)\n\ntools:\n" +
          "\n".join(lines))
    sys.exit(0 if len(argv) >= 2 else 2)
  if argv[1] not in TOOLS:
    print(f"error: unknown tool {argv[1]!r}; one of {', '.join(TOOLS)}", file=sys.stderr)
    sys.exit(2)
  run_tool(argv[1], [f"sparse-jax {argv[1]}", *argv[2:]])


if __name__ == "__main__":
  main()
