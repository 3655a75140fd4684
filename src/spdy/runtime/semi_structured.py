"""2:4 semi-structured sparse Linear layers for NVIDIA sparse tensor cores (fp16 on CUDA).

``torch.sparse.to_sparse_semi_structured`` compresses a weight in which every group of 4
consecutive inputs holds at most 2 non-zeros into values + metadata; ``F.linear`` with such
a weight runs the sparse tensor-core kernel (cuSPARSELt when torch has it, else CUTLASS,
which torch runs on compute capability 8.x only). It exists only on CUDA GPUs of compute
capability 8.0+ (Ampere and later), for 2-D contiguous fp16/bf16/int8 weights whose sides
are multiples of the backend's minimum tile (cuSPARSELt fp16: 16 x 16; CUTLASS fp16: 32 rows
x 64 columns); torch pads the dense input itself. The compression does not check the pattern, so a weight that is not 2:4
would silently lose values: :func:`check_2_4` refuses it first.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from spdy.errors import InputError
from spdy.runtime.modules import set_module


def kernels_here() -> list[str]:
    """The 2:4 kernel libraries torch runs on this GPU: cuSPARSELt where torch has it, CUTLASS on
    compute capability 8.x only (torch's CUTLASS 2:4 kernels refuse Hopper, e.g. an H200)."""
    found = ["cusparselt"] if torch.backends.cusparselt.is_available() else []
    return found + ["cutlass"] if torch.cuda.get_device_capability()[0] == 8 else found


def available() -> tuple[bool, str]:
    """Whether 2:4 sparse kernels can run here, and if not, why."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU (torch.cuda.is_available() is False); 2:4 semi-structured sparsity runs only on NVIDIA GPUs"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"GPU {torch.cuda.get_device_name()} has compute capability {major}.{minor}; 2:4 sparse tensor cores need 8.0+"
    if not kernels_here():
        return False, (f"GPU {torch.cuda.get_device_name()} (compute capability {major}.{minor}) runs 2:4 only through cuSPARSELt, "
                       f"which this torch {torch.__version__} was built without")
    return True, ""


def backend() -> str:
    """The kernel library torch uses for 2:4 by default: cuSPARSELt where it runs, else CUTLASS."""
    return kernels_here()[0]


def check_2_4(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise unless every group of 4 consecutive inputs of the (out, in) ``weight`` has >= 2 zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise InputError(f"{name}: 2:4 needs an (out, in) matrix with in a multiple of 4, got shape {tuple(weight.shape)}")
    nonzeros = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
    bad = int((nonzeros > 2).sum())
    if bad:
        raise InputError(f"{name}: {bad} groups of 4 inputs hold more than 2 non-zeros; prune it to 2:4 first (spdy nm, or a 2:4 database)")


def compress(weight: torch.Tensor, name: str = "weight", kernels: str | None = None) -> torch.Tensor:
    """The 2:4 ``weight`` (out, in) as a ``SparseSemiStructuredTensor`` on the GPU, same dtype, for
    ``kernels`` (``cusparselt`` or ``cutlass``, as `kernels_here` allows; default `backend`)."""
    ok, why = available()
    if not ok:
        raise RuntimeError(f"{name}: {why}")
    check_2_4(weight, name)
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    # Choose the subclass explicitly instead of flipping torch's global _FORCE_CUTLASS flag.
    kernels = kernels or backend()
    if kernels not in kernels_here():
        raise InputError(f"{name}: 2:4 kernels {kernels!r} do not run here; this GPU runs {', '.join(kernels_here())}")
    cls = SparseSemiStructuredTensorCUSPARSELT if kernels == "cusparselt" else SparseSemiStructuredTensorCUTLASS
    try:
        return cls.from_dense(weight.detach().cuda().contiguous())
    except RuntimeError as e:
        raise InputError(f"{name}: weight {tuple(weight.shape)} {weight.dtype} cannot be 2:4-compressed with {kernels}: {e}") from None


class SemiStructuredLinear(nn.Module):
    """A frozen ``nn.Linear`` whose 2:4 weight runs on sparse tensor cores (inference only)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.float16, name: str = "linear", kernels: str | None = None):
        super().__init__()
        ok, why = available()
        if not ok:
            raise RuntimeError(f"{name}: {why}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to("cuda", dtype)
        self.kernels = kernels or backend()
        self.weight = nn.Parameter(compress(weight, name, self.kernels), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to("cuda", dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's linear for semi-structured weights flattens leading dims and pads rows itself.
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, 2:4 {self.kernels}"


def to_semi_structured(model: nn.Module, units: Iterable[str], dtype: torch.dtype = torch.float16) -> nn.Module:
    """A copy of ``model`` on the GPU in ``dtype`` with each named 2:4 ``nn.Linear`` replaced by
    a :class:`SemiStructuredLinear`; every other layer stays dense. The original is untouched."""
    ok, why = available()
    if not ok:
        raise RuntimeError(why)
    deployed = copy.deepcopy(model).to("cuda", dtype).eval()
    for name in units:
        module = deployed.get_submodule(name)
        if type(module) is not nn.Linear:
            raise InputError(f"unit {name!r} is a {type(module).__name__}; 2:4 semi-structured kernels accelerate nn.Linear only")
        set_module(deployed, name, SemiStructuredLinear(module, dtype, name))
    return deployed
