"""A weight kept quantized, used in place: a tensor whose matmuls run torch's int4/int8 CPU kernels.

:class:`QuantizedTensor` stands for a float32 ``(N, K)`` weight but holds
only the stored parts of :mod:`sparsemap.formats.quantized`: zero-copy views
of the mapped file. It goes wherever the float weight would (a parameter of
``nn.Linear``, of ``nn.Embedding``, of sparsemap's lean Llama, tied to
another), and intercepts the two functions that read weights in bulk:

- ``F.linear`` runs ``_weight_int4pack_mm_for_cpu`` (int4) or
  ``_weight_int8pack_mm`` (int8, one call per group of ``K``) on the mapped
  bytes; int8 groups of 16 values (Q6_K, Q3_K, Q2_K), groups the kernel
  cannot read (llama2.c's of 8), and any input of several rows (a prompt),
  go instead through a batched bf16 matmul over a few groups at a time
  (their values copied to bf16, exactly; the copies and products within
  4 MiB, else a call a group as before): there the per-call cost of the
  kernel's calls, one per group of a row (128 for 2048 values in groups of
  16), is most of the time (measured, ``benchmarks/RESULTS.md``). The input
  is rounded to bf16 and the result returned in the input's dtype: the
  precision of llama.cpp's own quantized dot products, which round
  activations to 8 bits.
- ``F.embedding`` decodes only the rows asked for (int8).

Any other operation gets the dequantized float32 weight (a copy, made for
that call): correct, but not what a model should do on every token.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .errors import QuantizationError
from .formats.quantized import INT4, INT8_GROUP_MULTIPLE, QuantizedWeight
from .quantize import check_layout, dequantize

_BF16 = torch.bfloat16
# The batched int8 path: the bf16 copy of a few groups' values and their products stay within this.
_BATCH_BYTES = 4 << 20
# Int8 groups this small (Q6_K, Q3_K, Q2_K: 16) go batched even for one input row.
_BATCHED_GROUP = 16


class QuantizedTensor(torch.Tensor):
    """A float32 weight ``(N, K)`` kept in its quantized parts (views of a mapped file).

    Args:
        weight: what the parts are (scheme, shape, group), from ``catalog.quantized``.
        parts: the stored parts, as :meth:`sparsemap.Checkpoint.quantized` serves them.

    Example:
        >>> ckpt = sparsemap.Checkpoint("model-q4.safetensors")                   # doctest: +SKIP
        >>> w = ckpt.tensor("model.layers.0.mlp.up_proj.weight", keep_quantized=True)
        >>> y = torch.nn.functional.linear(x, w)           # the int4 kernel, on the mapped bytes
    """

    weight: QuantizedWeight
    parts: list[torch.Tensor]

    @staticmethod
    def __new__(cls, weight: QuantizedWeight, parts: list[torch.Tensor]) -> QuantizedTensor:
        return torch.Tensor._make_wrapper_subclass(cls, weight.shape, dtype=torch.float32,  # type: ignore
                                                   device="cpu", requires_grad=False)

    def __init__(self, weight: QuantizedWeight, parts: list[torch.Tensor]) -> None:
        check_layout(weight)
        self.weight = weight
        self.parts = parts
        self._scratch: dict[str, torch.Tensor] = {}  # small per-weight constants for the int8 kernel

    def __repr__(self) -> str:  # type: ignore[override]
        w = self.weight
        return (f"QuantizedTensor({w.name!r}, {w.scheme} in groups of {w.group}, shape={list(w.shape)}, "
                f"from {w.source}, {w.nbytes:,} bytes mapped)")

    @property
    def nbytes_stored(self) -> int:
        """Bytes of the stored parts (what the weight costs in the file and the page cache)."""
        return self.weight.nbytes

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (a copy)."""
        return dequantize(self.weight, self.parts)

    # ------------------------------------------------------------ the kernels

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias)``, x: (..., K) -> (..., N), computed on the quantized parts."""
        n, k = self.weight.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k).to(_BF16).contiguous()  # (M, K): the kernels read rows of A as they lie
        if self.weight.scheme == INT4:
            q, scale_zero = self.parts  # (N, K/2) packed, (G, N, 2)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, q, self.weight.group, scale_zero)
        else:
            y = self._int8_linear(x2)
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.view(*lead, n)

    def _int8_linear(self, x2: torch.Tensor) -> torch.Tensor:
        q, scale = self.parts[0], self.parts[1]  # (G, N, group), (G, N)
        groups, _, group = q.shape
        kernel_reads = group % INT8_GROUP_MULTIPLE == 0  # 16 at a time (it crashes on other groups)
        if groups == 1 and len(self.parts) == 2 and kernel_reads:  # one scale per row: the kernel's own
            if "scale" not in self._scratch:
                self._scratch["scale"] = scale[0].to(_BF16)  # (N,)
            return torch.ops.aten._weight_int8pack_mm(x2, q[0], self._scratch["scale"])
        m = x2.shape[0]
        xg = x2.view(m, groups, group)  # (M, G, group)
        batched = m > 1 or group <= _BATCHED_GROUP or not kernel_reads
        y = self._batched_group_sums(xg) if batched else self._group_sums(xg)
        if len(self.parts) > 2:  # zeros: each group's zero times the sum of its inputs
            y.addmm_(xg.float().sum(-1), self.parts[2])  # (M, G) @ (G, N)
        return y

    def _group_sums(self, xg: torch.Tensor) -> torch.Tensor:
        """``sum_g scale[g] * (xg[:, g] @ q[g].T)``, (M, N) float32, one int8 kernel call per group."""
        q, scale = self.parts[0], self.parts[1]  # (G, N, group), (G, N)
        groups, n, _ = q.shape
        if "ones" not in self._scratch:
            self._scratch["ones"] = torch.ones(n, dtype=_BF16)
        ones = self._scratch["ones"]
        y = torch.zeros(xg.shape[0], n)  # (M, N) float32: group sums scaled in full precision
        for g in range(groups):
            # q[g] is a view of the file; a strided one (llama2.c's Q8_0 stores rows, not groups, contiguous)
            # is gathered into one group's (N, group) int8 copy, as the kernel reads only contiguous weights.
            xs, qs = xg[:, g].contiguous(), q[g].contiguous()
            part = torch.ops.aten._weight_int8pack_mm(xs, qs, ones)  # (M, N)
            y.addcmul_(part.float(), scale[g])
        return y

    def _batched_group_sums(self, xg: torch.Tensor) -> torch.Tensor:
        """What :meth:`_group_sums` computes, a few groups a ``bmm``: their int8 values copied to bf16
        (exact: integers below 256), their products rounded to bf16 as the kernel rounds them, then
        scaled and summed in float32, all within ``_BATCH_BYTES``. The two differ only in the order of
        float32 additions, and where a group's sum rounds to the other bf16: by about 1e-5 of the output.
        An input so long that one group's products take the whole budget goes a kernel call a group:
        batching would save no call, and ``bmm`` holds its products in float32 first. Groups the kernel
        cannot read (not a multiple of 16 values: llama2.c's groups of 8) always go by ``bmm``."""
        q, scale = self.parts[0], self.parts[1]  # (G, N, group), (G, N)
        groups, n, group = q.shape
        m = xg.shape[0]
        # A group costs its bf16 values, its bf16 products and their scaled float32 copy.
        step = _BATCH_BYTES // (n * (2 * group + 6 * m))  # groups a bmm
        if step < 2 and group % INT8_GROUP_MULTIPLE == 0:
            return self._group_sums(xg)
        step = max(1, step)  # groups the kernel cannot read (llama2.c's of 8): a bmm each, at worst
        xs = xg.transpose(0, 1)  # (G, M, group)
        y = torch.zeros(m, n)  # (M, N) float32
        for g in range(0, groups, step):
            part = torch.bmm(xs[g:g + step], q[g:g + step].to(_BF16).transpose(1, 2))  # (C, M, N) bf16
            y += (part * scale[g:g + step, None, :]).sum(0)  # (C, M, N) float32, summed over groups
        return y

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the weight, float32 (..., K); only those rows are read."""
        k = self.weight.shape[1]
        if self.weight.scheme == INT4:  # the packed layout cannot give back one row: decode it all
            return F.embedding(ids, self.dequantize())
        flat = ids.reshape(-1)
        q, scale = self.parts[0], self.parts[1]  # (G, N, group), (G, N)
        rows = q.index_select(1, flat).float() * scale.index_select(1, flat)[..., None]  # (G, t, group)
        if len(self.parts) > 2:
            rows += self.parts[2].index_select(1, flat)[..., None]
        return rows.transpose(0, 1).reshape(*ids.shape, k)

    # ------------------------------------------------------------ torch's protocols

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and isinstance(args[1], QuantizedTensor) \
                and not isinstance(args[0], QuantizedTensor):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return args[1].linear(args[0], bias)
        if func is F.embedding and len(args) >= 2 and isinstance(args[1], QuantizedTensor):
            rows = args[1].embedding(args[0])
            max_norm = args[3] if len(args) > 3 else kwargs.get("max_norm")
            if max_norm is not None:  # the rows renormed as F.embedding would (the mapped weight stays)
                p = args[4] if len(args) > 4 else kwargs.get("norm_type", 2.0)
                norms = rows.norm(p=p, dim=-1, keepdim=True)
                rows = torch.where(norms > max_norm, rows * (max_norm / (norms + 1e-7)), rows)
            return rows
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func is torch.ops.aten.detach.default:  # nn.Parameter and inference mode detach: same parts
            (t,) = args
            return cls(t.weight, t.parts)
        if func._schema.is_mutable:  # the change would land in a dequantized copy and be lost
            name = next((a.weight.name for a in args if isinstance(a, QuantizedTensor)), "?")
            raise QuantizationError(f"{func.__name__} would change a quantized weight, which is read-only "
                                    "(its parts are the mapped file's bytes); dequantize it first "
                                    "(w.dequantize()) or convert without --quantize", tensor=name)

        from torch.utils._pytree import tree_map

        def unwrap(a: Any) -> Any:
            return a.dequantize() if isinstance(a, QuantizedTensor) else a

        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))


__all__ = ["QuantizedTensor"]
