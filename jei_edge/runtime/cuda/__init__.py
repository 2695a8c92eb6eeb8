"""The CUDA runtime core: cuda-python driver wrappers, device/pinned/mapped buffers, streams and
events, the fused exit kernel (``exit_kernel.cu``, compiled with NVRTC at load time), the CUDA
``Workspace``, CUDA-graph bucketing and micro-batch pipelining.

Torch-free: importing this package imports neither torch nor the CUDA bindings (they load when a
workspace is built), and nothing here ever imports torch. Executors come from backends
(``jei_edge.backends.torch_cuda``, ``jei_edge.backends.tensorrt``) and plug in through ``backend.cuda_backend``.
See docs/cuda.md.
"""

from __future__ import annotations
