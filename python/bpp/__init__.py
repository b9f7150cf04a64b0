"""bpp: structured pruning of LLMs by policy gradient, without back-propagation through the model.

The package is built in layers; a module imports only from its own layer or the ones above it
in this list (tests/test_layers.py checks it by reading the imports):

1. ``errors``, ``data``, ``runs`` (run folders: atomic writes, checkpoints, fingerprints),
   ``modelio`` (model folders in and out: families, loading, the shipped modeling file)
2. ``space`` (MaskSpace, Masks)
3. ``models`` (the batched masked forward, the hook ground truth), ``policy`` (θ, sampling, the
   estimator, the projection), ``allocation`` (the allocation policy: per-layer kept counts over
   a within-layer ranking)
4. ``evaluate``, ``compaction``, ``distributed``, ``compensation`` (FLAP's input statistics and
   output biases), ``reconstruction`` (least-squares refit of pruned layers' output projections),
   ``incumbent`` (the best mask so far), ``policy_gradient`` (the PG loop),
   ``allocation_loop`` (the allocation policy's loop)
5. ``methods`` (one module per metric or method, their shared calibration, the registry)
6. ``jobs`` (prune, baseline, compact, recover, evaluate, report, export: one public function each)
7. ``cli`` (one thin file per command)

The public names below load on first use, so ``import bpp`` stays light.
"""
import importlib

from .errors import BppError
from .modelio import SUPPORTED_FAMILIES, load_model
from .space import Masks, MaskSpace

__version__ = "0.1.0"
__all__ = ["BppError", "MaskSpace", "MaskedModel", "Masks", "PruneConfig", "SUPPORTED_FAMILIES", "baseline",
           "compact", "evaluate_model", "export_gguf", "load_model", "prune", "recover", "write_report"]

_LAZY = {"MaskedModel": ".models.masked", "PruneConfig": ".policy_gradient", "baseline": ".jobs.baseline",
         "compact": ".jobs.compact", "evaluate_model": ".jobs.evaluate", "prune": ".jobs.prune", "recover": ".jobs.recover",
         "write_report": ".jobs.report", "export_gguf": ".jobs.export"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'bpp' has no attribute {name!r}")
