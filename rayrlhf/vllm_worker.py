"""Imported by every vLLM worker process of a CPU engine, before it loads the model: VLLMEngine names
`VLLMWorker` as vLLM's worker extension, which vLLM resolves in each worker, whether the worker is
the engine's own process (tensor_parallel_size 1) or one of its worker processes (tensor-parallel
engines). The import is the point: each worker's linear layers then keep their plain weights
(cpu_platform.keep_plain_linear_weights), so every worker loads each weight sync in place."""

from rayrlhf import cpu_platform

cpu_platform.keep_plain_linear_weights()


class VLLMWorker:
    """Adds nothing to vLLM's worker: see the module's docstring."""
