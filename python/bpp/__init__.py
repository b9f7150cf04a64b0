"""bpp: structured pruning of LLMs by policy gradient, without back-propagation through the model.

A newcomer's map, in layers: a module imports only from its own layer or the ones above it in
this list (tests/test_layers.py checks it by reading the imports).

1. ``errors`` (BppError), ``data`` (texts and calibration windows), ``fileio`` (atomic writes,
   JSON and JSON-lines readers), ``checkpoints`` (weights-only checkpoints, RNG states), ``locks``
   (one writer at a time), ``runs`` (run folders: manifests, what ``--force`` may replace),
   ``model_configs`` (a config's sizes checked before anything is built from it), ``modelio``
   (models in: families, loading, the shipped modeling file), ``embedded`` (the embedded models,
   converted once from the GGUF files in their packages), ``model_folders`` (model folders out,
   written atomically), ``results_cache`` (what depends only on a model, a text and options, kept
   under ``$BPP_CACHE``: the dense perplexity, BESA's allocation)
2. ``space`` (MaskSpace: a model's prunable units and their parameter costs), ``masks`` (Masks: S
   structured masks, saved with their model's fingerprint), ``budget`` (parameter budgets: the
   projection onto them and the deterministic mask within them)
3. ``models``: ``masked`` (MaskedModel: the losses of S masks in one batched pass), ``hooks``
   (the Hugging Face ground truth under multiplicative masks), ``blocks`` (decoder layers through
   the masked ops, differentiably, for methods that take gradients), ``modeling_bpp`` (the
   modeling file shipped with heterogeneous compacted models)
4. ``evaluation`` (perplexity of dense, masked and compacted models; zero-shot through
   lm-eval), ``compaction`` (a mask → smaller dense weights), ``bias_compensation`` (FLAP's input
   statistics and output biases), ``reconstruction`` (least-squares refit of pruned layers' output
   projections; its solver in ``least_squares``), ``distributed`` (masks sharded over torchrun ranks), ``plots``
   (a run's figures), ``gguf`` (the GGUF file format for llama.cpp), ``search`` (every policy
   behind one ask/tell interface, the loop that drives them, the incumbent, the objective and the
   run's configuration: see :mod:`bpp.search`)
5. ``methods`` (one module per metric or method, their shared calibration, the registry)
6. ``jobs`` (prune, baseline, compact, recover, eval, report, export: one public function each)
7. ``cli`` (one thin file per command)

The public names below load on first use, so ``import bpp`` stays light.
"""
import importlib

import bpp_kernels  # noqa: F401  (on import it raises oneDNN's kernel cache, before any bpp work runs a GEMM)

from .errors import BppError
from .masks import Masks
from .modelio import SUPPORTED_FAMILIES, load_model
from .space import MaskSpace

__version__ = "0.1.0"
__all__ = ["BppError", "MaskSpace", "MaskedModel", "Masks", "PruneConfig", "SUPPORTED_FAMILIES", "baseline",
           "compact", "evaluate_model", "export_gguf", "load_model", "prune", "recover", "write_report"]

_LAZY = {"MaskedModel": ".models.masked", "PruneConfig": ".search", "baseline": ".jobs.baseline",
         "compact": ".jobs.compact", "evaluate_model": ".jobs.eval", "prune": ".jobs.prune", "recover": ".jobs.recover",
         "write_report": ".jobs.report", "export_gguf": ".jobs.export"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'bpp' has no attribute {name!r}")
