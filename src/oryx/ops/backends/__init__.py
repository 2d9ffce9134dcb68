"""Optional fast backends (Triton kernels, FlashAttention, flex_attention, ...) register themselves here.

Importing this package must be safe everywhere, CPU-only machines included: a backend imports its optional
package lazily and answers ``supports(tensor)`` at call time (see ``oryx.ops.dispatch``).

- ``fla``  (gated_delta_rule, scalar_decay_rule): fla-core's Triton kernels on CUDA; see ``backends/fla.py`` for the
  Hopper backward trap and how it is handled.
- ``flex`` (causal_attention): block-sparse flex_attention over the attention-mode query blocks (SDPA for a few rows).
- ``triton_rows`` (causal_attention): our FlashAttention-style Triton kernels over the active query blocks, below flex's
  priority until timed on a card (``backend="triton_rows"`` picks it).

fla and flex have priority over the torch reference on CUDA tensors when their packages import; ``backend="torch"`` or
``ORYX_BACKEND=torch`` forces the reference.
"""

# Registration only; none imports triton or fla here.
from oryx.ops.backends import fla, flex, triton_rows  # noqa: F401
