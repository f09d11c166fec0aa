"""bnfold's model zoo: small torch definitions of real architectures, exported to ONNX with BN preserved.

Used from the repository root (this package is not installed with bnfold)::

    python -m models demo                 # rebuild the README's demo model, models/demo_resnet.onnx
    python -m models build OUT_DIR        # the whole zoo × export matrix, plus OUT_DIR/manifest.json

Modules: ``zoo`` (the catalogue), one module per family (``resnet``, ``mobilenet``, ``efficientnet``,
``densenet``, ``shufflenet``, ``unet``, ``audio``, ``video``, ``mlp``, ``levit``, ``mixnet``, ``face_head``,
``convmixer``), ``common`` (seeding, realistic BN
state), ``export`` (both torch exporters with BN kept), ``build`` (files and manifest; ``build_model`` is the
helper tests use), ``demo`` and ``third_party`` (models from other exporters found in installed packages).
See docs/models.md.
"""
