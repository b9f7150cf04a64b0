"""The jobs behind the ``bpp`` commands, one module each, each a public function a Python user
calls with the same arguments as the command (exported at the top of :mod:`bpp`):
:func:`bpp.prune`, :func:`bpp.baseline`, :func:`bpp.compact`, :func:`bpp.recover`,
:func:`bpp.evaluate_model`, :func:`bpp.write_report`, :func:`bpp.export_gguf`. They build on the core modules and
:mod:`bpp.methods`; :mod:`bpp.cli` is a thin layer over them."""
