"""Serving: the vLLM plugin (:mod:`~lte.serve.vllm_plugin`) that runs an LTE export sparse.

It imports only the export's contract (:mod:`lte.export.remote.layout`) and the kernels
(``lte_kernels``), never the training stack: a server needs neither peft nor trl.
"""
