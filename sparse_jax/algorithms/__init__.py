"""Built-in sparse-attention algorithms; importing this package registers each one.

Adding an algorithm is adding a file here that calls `sparse_jax.config.register_algorithm`,
and one import line below.
"""
from sparse_jax.algorithms import rocket  # noqa: F401,E402
from sparse_jax.algorithms import dsa  # noqa: F401,E402
from sparse_jax.algorithms import oracle  # noqa: F401,E402
from sparse_jax.algorithms import quest  # noqa: F401,E402
from sparse_jax.algorithms import snapkv  # noqa: F401,E402
from sparse_jax.algorithms import streaming  # noqa: F401,E402
from sparse_jax.algorithms import indexer  # noqa: F401,E402
from sparse_jax.algorithms import hybrid  # noqa: F401,E402
