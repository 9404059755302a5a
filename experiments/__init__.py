"""tritonmoe experiments: Hydra entry point (``python -m experiments``), benchmarks, raw results.

Data flows one way: an experiment writes raw rows with provenance to ``results/<device>/``;
notebooks read only those files.
"""
