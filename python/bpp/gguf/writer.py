"""The file: a model folder read and checked whole (:func:`prepare`), then its metadata, tensor
infos and tensor data streamed to a path (:meth:`GGUFFile.write`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import gemma3
from .plan import Model, Weights, plan_layers, read_model, rope_params
from .tensors import Tensor, check_widths, encode, nbytes, plan_tensors
from .tokenizer import tokenizer_writer

DTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class GGUFFile:
    """Everything a GGUF file of the folder holds, checked; the tensors are made as they are written."""
    model: Model
    dtype: str
    tensors: list[Tensor]
    write_vocab: Callable  # writes the tokenizer's keys

    def write(self, path: Path, *, progress: bool = True) -> None:
        """Write the file to ``path`` (an existing file there is overwritten)."""
        import gguf

        writer = gguf.GGUFWriter(None, self.model.arch)
        try:
            write_metadata(writer, self.model, self.dtype)
            self.write_vocab(writer)
            for t in self.tensors:
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(t), raw_dtype=t.qtype)
            writer.write_header_to_file(path=path)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            bar = _progress(self.tensors, progress)
            for t in self.tensors:
                writer.write_tensor_data(encode(t))
                bar.update(1)
            bar.close()
            writer.flush()
        finally:
            writer.close()


def prepare(folder: Path, dtype: str) -> GGUFFile:
    """Read the model folder and check everything the file needs (config, tensor shapes, widths
    for ``dtype``, tokenizer), so that a folder llama.cpp cannot run fails before anything is
    written. ``dtype`` is one of :data:`DTYPES`."""
    model = read_model(folder)
    weights = Weights(folder)
    plan_layers(model, weights)
    tensors = plan_tensors(model, weights, dtype)
    check_widths(tensors, dtype)
    write_vocab = tokenizer_writer(model, weights)
    return GGUFFile(model, dtype, tensors, write_vocab)


def write_metadata(writer, model: Model, dtype: str) -> None:
    """The model's keys: name, file type, context, sizes (per layer for ``deci``), norm and rope."""
    import gguf

    c, layers = model.config, model.layers
    writer.add_name(str(c.get("_name_or_path") or model.folder.name) or model.folder.name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    context = int(c.get("max_position_embeddings") or 4096)
    if model.family == "mistral" and c.get("sliding_window"):
        # llama.cpp attends to the whole context; up to the window that is what Mistral computes
        context = min(context, int(c["sliding_window"]))
    writer.add_context_length(context)
    writer.add_embedding_length(model.hidden)
    writer.add_block_count(len(layers))
    if model.arch == "deci":
        writer.add_feed_forward_length([layer.n_ff for layer in layers])
        writer.add_head_count([layer.n_head for layer in layers])
        writer.add_head_count_kv([layer.n_head_kv for layer in layers])
    else:
        writer.add_feed_forward_length(layers[0].n_ff)
        writer.add_head_count(layers[0].n_head)
        writer.add_head_count_kv(layers[0].n_head_kv)
    writer.add_key_length(model.head_dim)
    writer.add_value_length(model.head_dim)
    writer.add_rope_dimension_count(model.head_dim)
    writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    if model.arch == gemma3.ARCH:
        gemma3.write_keys(writer, model, context)
        return
    rope = rope_params(c)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _progress(tensors: list[Tensor], enabled: bool):
    from tqdm import tqdm

    return tqdm(total=len(tensors), desc="GGUF", unit="tensor", disable=not enabled)
