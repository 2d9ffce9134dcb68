"""Optional fast backends (Triton kernels, FlashAttention, flex_attention, ...) register themselves here.

Importing this package must be safe everywhere, CPU-only machines included: a backend imports its optional
package lazily and answers ``supports(tensor)`` at call time (see ``oryx.ops.dispatch``).
"""
