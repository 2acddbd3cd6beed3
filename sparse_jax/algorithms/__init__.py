"""Built-in sparse-attention algorithms; importing this package registers each one.

Adding an algorithm is adding a file here that calls `sparse_jax.config.register_algorithm`,
and one import line below.
"""
from sparse_jax.algorithms import rocket  # noqa: F401,E402
from sparse_jax.algorithms import dsa  # noqa: F401,E402
