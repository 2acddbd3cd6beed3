from sparse_jax.cli import run_tool

run_tool("train")
