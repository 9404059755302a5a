"""Integrations with other libraries; each submodule imports its library only when imported itself.

``tritonmoe.integrations.transformers``: "tritonmoe" as a Hugging Face transformers
``experts_implementation`` (needs ``transformers>=5``: ``pip install 'tritonmoe[hf]'``).
"""
