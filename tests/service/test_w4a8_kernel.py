"""The w4a8 kernel (service/engine/kernels) against the weights it stands for, in float."""

from __future__ import annotations

import pytest
import torch

from service.engine import kernels

pytestmark = pytest.mark.skipif(not kernels.supported(), reason="no AVX-512 VNNI on this CPU")


def _weights(n: int, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n * k)
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    dense = (codes.float() - 8) * scales.float().repeat_interleave(group, 0).t()  # [n, k]: w = (q - 8) * s
    return codes, scales, dense


@pytest.mark.parametrize("m", [0, 1, 3, 4, 9])
@pytest.mark.parametrize("group", [32, 128])
def test_the_product_is_the_dense_one_within_int8_activation_error(m: int, group: int) -> None:
    n, k = 48, 256
    codes, scales, dense = _weights(n, k, group)
    packed, packed_scales = kernels.pack(codes, scales, group)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    out = kernels.mm(x, packed, packed_scales, group)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    if m:
        want = x.float() @ dense.t()
        assert ((out.float() - want).norm() / want.norm()).item() < 0.02  # int8 activations: ~0.7 %


def test_rows_are_independent_of_the_batch_they_come_in() -> None:
    codes, scales, _ = _weights(32, 128, 32)
    packed, packed_scales = kernels.pack(codes, scales, 32)
    x = torch.randn(6, 128).to(torch.bfloat16)
    alone = torch.cat([kernels.mm(x[i:i + 1], packed, packed_scales, 32) for i in range(6)])
    assert torch.equal(alone, kernels.mm(x, packed, packed_scales, 32))


def test_shapes_it_cannot_take_are_refused() -> None:
    codes, scales, _ = _weights(40, 128, 32)  # 40 outputs: not blocks of 16
    with pytest.raises(ValueError, match="N % 16"):
        kernels.pack(codes, scales, 32)


def test_torch_compile_keeps_it_one_operator() -> None:
    kernels.register()  # as the engine does before vLLM compiles the model
    codes, scales, _ = _weights(32, 256, 128)
    packed, packed_scales = kernels.pack(codes, scales, 128)
    compiled = torch.compile(lambda x: kernels.mm(x, packed, packed_scales, 128) * 2, fullgraph=True)
    x = torch.randn(3, 256).to(torch.bfloat16)
    assert torch.equal(compiled(x), kernels.mm(x, packed, packed_scales, 128) * 2)
