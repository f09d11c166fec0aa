"""A mutation fuzzer for bnfold's load → fold → save path (``python -m fuzz --seconds N --seed S``).

- :mod:`fuzz.seeds` builds valid seed models (and external-data cases) with ``onnx.helper``;
- :mod:`fuzz.mutate` applies protobuf-level mutations, deterministically from one ``random.Random``;
- :mod:`fuzz.corpus` reads and writes stored cases and generates case ``i`` of a campaign;
- :mod:`fuzz.harness` runs one case through a pipeline and classifies the outcome;
- :mod:`fuzz.worker` is the worker process; :mod:`fuzz.runner` drives workers with a per-case timeout;
- :mod:`fuzz.minimise` shrinks every failure before it is stored under ``tests/security/regressions/``.

Run it from the repository root (``fuzz`` is not installed with bnfold). See ``docs/safety.md``.
"""
