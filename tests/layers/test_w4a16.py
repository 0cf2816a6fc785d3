"""4-bit weights (W4A16) in the parallel linears: the method names, tensor-parallel sharding
of the packed weights with their per-group scales and zero points, the startup refusal of a
row-parallel split that cuts a group, and tiny models quantized on load against their
full-precision selves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flatout import distributed
from flatout.kernels import reference
from flatout.layers.embedding import ParallelLMHead
from flatout.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from flatout.layers.quantization import Int4Format, weight_format
from flatout.models.registry import load_model, resolve_model_config
from tests.helpers.logits import flatout_logits, random_prompts
from tests.helpers.tiny_checkpoints import ARCHITECTURES, make_tiny_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _single_rank() -> Iterator[None]:
    yield
    distributed.init_tensor_parallel(0, 1)


def test_method_names() -> None:
    assert weight_format("w4a16") == Int4Format(128, False)
    assert weight_format("w4a16-g32-asym") == Int4Format(32, True)
    assert weight_format("w4a16-channel") == Int4Format(0, False)
    assert Int4Format(64, True).method == "w4a16-g64-asym"
    assert Int4Format(0, False).method == "w4a16-channel"
    with pytest.raises(ValueError, match="not a multiple of 32"):
        weight_format("w4a16-g48")
    with pytest.raises(ValueError, match="malformed 4-bit method"):
        weight_format("w4a16-int")


@pytest.mark.parametrize("method", ["w4a16-g32", "w4a16-g32-asym", "w4a16-channel-asym"])
def test_shards_hold_the_unsplit_quantization(method: str) -> None:
    """TP = 2: column-parallel ranks hold their rows of the packed weight, scales and zero
    points; a row-parallel rank its half of the columns and the groups under them (per
    channel: the whole row's scale); the partial sums add up to the one-rank output."""
    g = torch.Generator().manual_seed(2)
    hidden, heads, kv_heads, hd, inter = 64, 4, 2, 8, 128
    q_w, k_w, v_w = (torch.randn(n * hd, hidden, generator=g) for n in (heads, kv_heads, kv_heads))
    gate_up = torch.randn(2 * inter, hidden, generator=g)
    down = torch.randn(hidden, inter, generator=g)

    def build(rank: int, size: int) -> tuple:
        distributed.init_tensor_parallel(rank, size)
        qkv = QKVParallelLinear(hidden, hd, heads, kv_heads, bias=False, quantization=method)
        for sid, w in zip("qkv", (q_w, k_w, v_w), strict=True):
            qkv.weight_loader(qkv.weight, w, sid)
        mlp = MergedColumnParallelLinear(hidden, [inter, inter], quantization=method)
        mlp.weight_loader(mlp.weight, gate_up)  # fused: split into gate | up, then sharded
        row = RowParallelLinear(inter, hidden, quantization=method)
        row.weight_loader(row.weight, down)
        return qkv, mlp, row

    one = build(0, 1)
    ranks = [build(r, 2) for r in range(2)]
    asym = method.endswith("asym")
    for layer in one:
        assert layer.weight.dtype == torch.uint8 and layer.weight_scale.dtype == torch.float32
        assert layer.weight.shape[1] * 2 == layer.in_per_rank
        assert (layer.weight_zero_point is not None) == asym

    def rows_of(t: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        return torch.cat([p.chunk(2)[rank] for p in t.split(sizes)])

    def params(layer) -> list[torch.Tensor]:  # noqa: ANN001
        return [p for p in (layer.weight, layer.weight_scale, layer.weight_zero_point)
                if p is not None]

    qkv_sizes, mlp_sizes = [heads * hd, kv_heads * hd, kv_heads * hd], [inter, inter]
    for r, (qkv, mlp, row) in enumerate(ranks):
        for got, full, sizes in ((qkv, one[0], qkv_sizes), (mlp, one[1], mlp_sizes)):
            for a, b in zip(params(got), params(full), strict=True):
                assert torch.equal(a, rows_of(b, sizes, r))
        assert torch.equal(row.weight, one[2].weight.chunk(2, dim=1)[r])
        for a, b in zip(params(row)[1:], params(one[2])[1:], strict=True):
            assert torch.equal(a, b if "channel" in method else b.chunk(2, dim=1)[r])
    distributed.init_tensor_parallel(0, 1)
    x = torch.randn(3, inter, generator=g)
    full_out = one[2](x)
    partials = [rk[2].matmul(xs, None) for rk, xs in zip(ranks, x.chunk(2, dim=1), strict=True)]
    torch.testing.assert_close(partials[0] + partials[1], full_out, atol=1e-5, rtol=1e-5)
    # the layer's product is the reference op on its own parameters
    want = reference.linear_w4a16(x, *params(one[2])[:2],
                                  one[2].weight_zero_point, None)
    assert torch.equal(full_out, want)


def test_a_split_that_cuts_a_group_is_refused_when_built() -> None:
    distributed.init_tensor_parallel(0, 2)
    with pytest.raises(ValueError, match="96 inputs per rank are not whole groups of 64"):
        RowParallelLinear(192, 64, quantization="w4a16-g64")
    RowParallelLinear(192, 64, quantization="w4a16-g32")  # 96 = 3 groups of 32
    RowParallelLinear(192, 64, quantization="w4a16-channel")
    with pytest.raises(ValueError, match="LM head cannot be held in 4 bits"):
        ParallelLMHead(32, 64, quantization="w4a16-g32")


# Teacher-forced over 38 positions of 4 prompts (fp32 CPU, tiny random checkpoints), round to
# nearest per group of 32 inputs, measured over the six architectures: symmetric: logits'
# relative error 0.160-0.202, top-1 agreement 0.658-0.816; asymmetric: 0.132-0.165, 0.684-0.816
# (random tiny weights have no outliers to spare: 4 bits cost far more than int8's 0.01).
BOUNDS = {"w4a16-g32": (0.21, 0.65), "w4a16-g32-asym": (0.17, 0.68)}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param.lower()))


@pytest.mark.parametrize("method", list(BOUNDS))
def test_quantized_on_load_logits_close_to_full_precision(checkpoint: Path, method: str) -> None:
    prompts = random_prompts(301, [5, 1, 23, 9])
    base = load_model(resolve_model_config(str(checkpoint)), CPU)
    cfg = resolve_model_config(str(checkpoint), quantization=method)
    assert cfg.quantization == method
    model = load_model(cfg, CPU)
    ref, got = torch.cat(flatout_logits(base, prompts)), torch.cat(flatout_logits(model, prompts))
    rel = ((got - ref).norm() / ref.norm()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    max_rel, min_agree = BOUNDS[method]
    assert 0.02 < rel < max_rel and agree >= min_agree
    assert model.lm_head.weight.dtype == torch.float32


def test_dummy_weights_are_quantized(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("Glm4ForCausalLM", tmp_path / "g4")
    cfg = resolve_model_config(str(path), load_format="dummy", quantization="w4a16-g32-asym")
    model = load_model(cfg, CPU)
    proj = model.model.layers[0].mlp.down_proj
    assert proj.weight.dtype == torch.uint8 and proj.weight_scale.shape == (64, 3)
    assert (proj.weight_scale > 0).all() and (proj.weight_scale < 2e-3 / 15 + 1e-9).all()
    assert proj.weight_zero_point is not None and int(proj.weight_zero_point.max()) <= 15
    with pytest.raises(ValueError, match="not whole groups of 128"):  # tiny: 64 inputs
        load_model(resolve_model_config(str(path), load_format="dummy", quantization="w4a16"),
                   CPU)
    with pytest.raises(ValueError, match="LM head cannot be held in 4 bits"):
        resolve_model_config(str(path), quantization="w4a16", quantize_lm_head=True)
