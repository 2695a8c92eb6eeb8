"""Serving bundles on NVIDIA Triton Inference Server (``jei-edge serve``, ``jei-edge export triton``).

- ``handler``: per-request validation and one batched ``Runtime.run`` per Triton execution (no Triton);
- ``model``: the Triton Python-backend model (``TritonPythonModel``) and its early-exit metrics;
- ``repository``: writes a model repository (config.pbtxt with dynamic batching, model.py, bundle);
- ``server``: starts and stops the ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel.

Needs the serving environment (``requirements/serve.txt``: numpy < 2, onnxruntime, nvidia-pytriton,
tritonclient) only for ``server``; nothing here imports torch.
"""
