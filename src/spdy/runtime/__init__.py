"""What users deploy: run a pruned model's layers in fast sparse formats on a CPU.

Depends on torch (and spdy.units, spdy.levels) only; never on the search, database or
solver, so a deployment needs nothing else.
"""

from spdy.runtime.attention import use_kernel_attention
from spdy.runtime.convert import convert, formats_of, heuristic_format
from spdy.runtime.formats import FORMATS, block_size, kernel_status, make_format, supported_formats
from spdy.runtime.masks import magnitude_mask
from spdy.runtime.modeling.bert import (FeedForwardInput, FeedForwardOutput, ProjectedSelfAttention, ResidualNormOutput,
                                        fuse_activations, fuse_feed_forwards, fuse_residual_norms, fuse_self_attentions)
from spdy.runtime.modeling.bert_layer import FusedEncoderLayer, fuse_encoder_layers
from spdy.runtime.modeling.cnn import FusedBottleneck, FusedMBConv, fuse_cnn_blocks, fuse_sequential_activations
from spdy.runtime.fold import fold_batchnorms
from spdy.runtime.conv_kernels import SparseConvWeight
from spdy.runtime.modules import SparseConv2d, SparseLinear, sparse_module, weight_of
from spdy.runtime.select import fastest_format, format_stats

__all__ = [
    "FORMATS",
    "FeedForwardInput",
    "FeedForwardOutput",
    "FusedBottleneck",
    "FusedMBConv",
    "FusedEncoderLayer",
    "ProjectedSelfAttention",
    "ResidualNormOutput",
    "SparseConv2d",
    "SparseConvWeight",
    "SparseLinear",
    "block_size",
    "convert",
    "fastest_format",
    "format_stats",
    "formats_of",
    "fold_batchnorms",
    "fuse_activations",
    "fuse_cnn_blocks",
    "fuse_encoder_layers",
    "fuse_feed_forwards",
    "fuse_residual_norms",
    "fuse_self_attentions",
    "fuse_sequential_activations",
    "heuristic_format",
    "kernel_status",
    "magnitude_mask",
    "make_format",
    "sparse_module",
    "supported_formats",
    "use_kernel_attention",
    "weight_of",
]
