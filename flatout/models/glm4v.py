"""GLM-4.1V (`Glm4vForConditionalGeneration`: GLM-4.1V-9B-Thinking, AutoGLM-Phone-9B).

A vision tower turns each image's flattened patches into one embedding per 2x2 patch block; the
embeddings replace the image's `<|image|>` placeholder tokens in the prompt, and the GLM-4-0414
decoder of decoder.py (sandwich norms) runs over them with M-RoPE: 3-D (t, h, w) positions from
`mrope_positions`, decode positions = text position + the request's rope delta on all 3 axes.

Patch order (as Glm4vImageProcessor writes pixel_values): per image, 2x2 merge blocks row-major,
the 4 patches of a block row-major inside it; each patch is 3 x 2 x 14 x 14 = 1176 values
(channel, temporal, row, column). Parameter names are the checkpoint's (`model.visual.*`,
`model.language_model.*`, `lm_head.*`); GLM4V_WEIGHT_NAMES maps the split q/k/v.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flatout.config import ModelConfig, VisionConfig
from flatout.kernels.ops import ops_for
from flatout.layers.embedding import ParallelLMHead
from flatout.layers.linear import set_weight_loader
from flatout.layers.norm import RMSNorm
from flatout.models.decoder import DecoderModel, fuses_reduce, lm_head_quantization

Grid = tuple[int, int, int]  # (t, h, w) in 14-px patches, as image_grid_thw


def mrope_positions(
    input_ids: Sequence[int],
    grids: Sequence[Grid],
    image_token_id: int,
    spatial_merge_size: int = 2,
) -> tuple[torch.Tensor, int]:
    """3-D M-RoPE positions [3, L] (int64) of a prompt and its rope delta, as transformers'
    get_rope_index: text tokens get (p, p, p); an image starting at position s gets
    (s + t, s + row, s + col) over its merged grid and the next text starts at
    s + max(rows, cols). Each run of image tokens takes the next grid's t*h*w/merge^2 tokens.
    delta = max position + 1 - L: decode token i (0-based over the whole sequence) sits at
    i + delta on all three axes."""
    ids = list(input_ids)
    cols: list[torch.Tensor] = []
    pos, i, g = 0, 0, 0
    m = spatial_merge_size
    while i < len(ids):
        if ids[i] != image_token_id:
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            cols.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
            i = j
            continue
        if g >= len(grids):
            raise ValueError(f"prompt has more image token runs than the {len(grids)} grids given")
        t, h, w = grids[g]
        lh, lw = h // m, w // m
        n = t * lh * lw
        if ids[i : i + n] != [image_token_id] * n:
            raise ValueError(f"image {g} (grid {grids[g]}) needs {n} image tokens at {i}")
        tt, hh, ww = torch.meshgrid(
            torch.arange(t), torch.arange(lh), torch.arange(lw), indexing="ij"
        )
        cols.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
        pos += max(lh, lw)
        i += n
        g += 1
    if g != len(grids):
        raise ValueError(f"{len(grids)} grids given for {g} images in the prompt")
    positions = torch.cat(cols, dim=1) if cols else torch.zeros(3, 0, dtype=torch.long)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions.long(), delta


def image_token_count(grid: Grid, spatial_merge_size: int = 2) -> int:
    t, h, w = grid
    return t * h * w // spatial_merge_size**2


def _flat_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
    """A Conv3d kernel [out, C, T, P, P] as the matmul weight [out, C*T*P*P] it is."""
    if shard_id is not None:
        raise ValueError(f"unsharded parameter got shard id {shard_id!r}")
    if loaded.numel() != param.numel() or loaded.shape[0] != param.shape[0]:
        raise ValueError(f"shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
    param.data.copy_(loaded.reshape(param.shape))


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = the patch: one matmul over the 1176 values of each patch."""

    def __init__(self, vc: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(vc.patch_dim, vc.hidden_size, bias=True)
        weight = self.proj.weight
        assert isinstance(weight, nn.Parameter)
        set_weight_loader(weight, _flat_weight_loader)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 1176] -> [N, hidden]
        return self.proj(x.to(self.proj.weight.dtype))


class VisionEmbeddings(nn.Module):
    """The learned (image_size/patch)^2 position table, bicubic-interpolated to each grid."""

    def __init__(self, vc: VisionConfig) -> None:
        super().__init__()
        self.position_embedding = nn.Embedding((vc.image_size // vc.patch_size) ** 2,
                                               vc.hidden_size)

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]
        hw: torch.Tensor,  # [N, 2] each patch's (row, col) in its image's grid
        grid_hw: torch.Tensor,  # [N, 2] float: that image's (h, w) in patches
    ) -> torch.Tensor:
        table = self.position_embedding.weight
        side = int(table.shape[0] ** 0.5)
        table_2d = table.view(side, side, -1).permute(2, 0, 1)[None].float()  # [1, C, S, S]
        # transformers: pixel centres normalised to [-1, 1], grid_sample bicubic, border
        norm = (hw.float() + 0.5) / grid_hw * 2 - 1  # [N, 2] (y, x)
        grid = norm.flip(-1)[None, :, None, :]  # [1, N, 1, 2] as (x, y)
        pos = F.grid_sample(table_2d, grid, mode="bicubic", align_corners=False,
                            padding_mode="border")  # [1, C, N, 1]
        return x + pos[0, :, :, 0].t().to(table.dtype)


class VisionAttention(nn.Module):
    """Full (non-causal) attention within each image of a varlen batch, 2-D rotary on q and k."""

    def __init__(self, vc: VisionConfig) -> None:
        super().__init__()
        self.num_heads = vc.num_heads
        self.head_dim = vc.hidden_size // vc.num_heads
        self.qkv = nn.Linear(vc.hidden_size, 3 * vc.hidden_size, bias=vc.attention_bias)
        self.proj = nn.Linear(vc.hidden_size, vc.hidden_size, bias=False)
        self.ops = ops_for()

    def forward(
        self, x: torch.Tensor, cos_sin: torch.Tensor, cu_seqlens: list[int]
    ) -> torch.Tensor:
        n, c = x.shape
        qkv = self.qkv(x)  # [N, 3C]: q | k | v, heads inside each
        q, k, v = qkv.split(c, dim=-1)
        token = torch.arange(n, device=x.device)
        # NeoX pairs over the whole head; cos_sin [N, D]: per-token angles (h freqs | w freqs)
        q, k = self.ops.rotary_embedding(token, q, k, cos_sin, self.head_dim, False)
        q, k, v = (t.reshape(n, self.num_heads, self.head_dim).transpose(0, 1) for t in (q, k, v))
        out = torch.empty(self.num_heads, n, self.head_dim, dtype=x.dtype, device=x.device)
        # PyTorch reference: SDPA per image (a varlen kernel replaces this loop on the GPU)
        for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True):
            out[:, s:e] = F.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e])
        return self.proj(out.transpose(0, 1).reshape(n, c))


class VisionMLP(nn.Module):
    """SwiGLU; gate/up/down named as the checkpoint (width `inner`)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inner, bias=False)
        self.up_proj = nn.Linear(dim, inner, bias=False)
        self.down_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, vc: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(vc.hidden_size, vc.rms_norm_eps)
        self.norm2 = RMSNorm(vc.hidden_size, vc.rms_norm_eps)
        self.attn = VisionAttention(vc)
        self.mlp = VisionMLP(vc.hidden_size, vc.out_hidden_size)  # sic: out_hidden_size wide

    def forward(
        self, x: torch.Tensor, cos_sin: torch.Tensor, cu_seqlens: list[int]
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos_sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, inner, bias=False)
        self.up_proj = nn.Linear(dim, inner, bias=False)
        self.down_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.post_projection_norm(self.proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionTransformer(nn.Module):
    """pixel_values [N, 1176] of a batch of images (grids [(t, h, w)], N = sum of t*h*w) ->
    [N / merge^2, out_hidden_size]: one embedding per image token, images in order."""

    def __init__(self, vc: VisionConfig) -> None:
        super().__init__()
        self.config = vc
        self.patch_embed = PatchEmbed(vc)
        self.post_conv_layernorm = RMSNorm(vc.hidden_size, vc.rms_norm_eps)
        self.embeddings = VisionEmbeddings(vc)
        self.blocks = nn.ModuleList(VisionBlock(vc) for _ in range(vc.depth))
        self.post_layernorm = RMSNorm(vc.hidden_size, vc.rms_norm_eps)
        m = vc.spatial_merge_size
        self.downsample = nn.Conv2d(vc.hidden_size, vc.out_hidden_size, kernel_size=m, stride=m)
        self.merger = PatchMerger(vc.out_hidden_size, vc.intermediate_size)
        head_dim = vc.hidden_size // vc.num_heads
        half = head_dim // 2  # h and w each turn half of the rotated pairs
        inv_freq = 1.0 / vc.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def patch_positions(self, grids: Sequence[Grid], device: torch.device) -> torch.Tensor:
        """[N, 2] (row, col) of every patch, in the block-major order of pixel_values."""
        m = self.config.spatial_merge_size
        out = []
        for t, h, w in grids:
            rows, cols = torch.meshgrid(torch.arange(h, device=device),
                                        torch.arange(w, device=device), indexing="ij")
            rc = torch.stack([rows, cols], dim=-1)  # [h, w, 2]
            rc = rc.view(h // m, m, w // m, m, 2).transpose(1, 2).reshape(-1, 2)
            out.append(rc.repeat(t, 1))
        return torch.cat(out)

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        vc = self.config
        grids = [tuple(int(v) for v in g) for g in grids]  # type: ignore[misc]
        lens = [t * h * w for t, h, w in grids]
        if pixel_values.shape != (sum(lens), vc.patch_dim):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not fit grids {grids}")
        cu_seqlens = [0]
        for n in lens:
            cu_seqlens.append(cu_seqlens[-1] + n)
        device = self.inv_freq.device
        rc = self.patch_positions(grids, device)  # [N, 2]
        grid_hw = torch.cat([
            torch.tensor([[h, w]], dtype=torch.float32, device=device).expand(n, 2)
            for (_, h, w), n in zip(grids, lens, strict=True)
        ])  # fmt: skip
        angles = (rc[:, :, None].float() * self.inv_freq).flatten(1)  # [N, D/2]: h | w
        cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)  # [N, D]

        x = self.post_conv_layernorm(self.patch_embed(pixel_values))  # [N, C]
        x = self.embeddings(x, rc, grid_hw)
        for block in self.blocks:
            x = block(x, cos_sin, cu_seqlens)
        x = self.post_layernorm(x)
        m = vc.spatial_merge_size
        x = x.view(-1, m, m, x.shape[-1]).permute(0, 3, 1, 2)  # [N/m^2, C, m, m]
        x = self.downsample(x).view(-1, vc.out_hidden_size)
        return self.merger(x)


class Glm4vModel(nn.Module):
    def __init__(self, cfg: ModelConfig, defer_reduce: bool) -> None:
        super().__init__()
        assert cfg.vision is not None
        self.visual = VisionTransformer(cfg.vision)
        self.language_model = DecoderModel(cfg, defer_reduce)


class Glm4vForConditionalGeneration(nn.Module):
    """The CausalLM interface plus images.

    encode_images(pixel_values [N, 1176], grids) -> [num image tokens, hidden];
    forward(input_ids [T], positions [3, T] (or [T] for text only), image_embeds) -> hidden [T,
    hidden], with image_embeds [number of image tokens in input_ids, hidden] written, in order,
    over the embeddings of the `<|image|>` tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vision is None or cfg.mrope_section is None:
            raise ValueError(f"{cfg.architecture}: config has no vision tower / mrope_section")
        self.config = cfg
        self.image_token_id = cfg.vision.image_token_id
        self.fuses_reduce = fuses_reduce(cfg)
        self.model = Glm4vModel(cfg, self.fuses_reduce)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, lm_head_quantization(cfg))
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def encode_images(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        return self.model.visual(pixel_values, grids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """image_index: the flat indices image_embeds' rows go to (default: the `<|image|>`
        tokens of input_ids, in order; the engine passes them, since a generated token may
        equal the placeholder id)."""
        lm = self.model.language_model
        if image_embeds is None:
            return lm(input_ids, positions)
        embeds: torch.Tensor = lm.embed_tokens(input_ids)  # [T, hidden]
        if image_index is None:
            image_index = (input_ids == self.image_token_id).nonzero()[:, 0]
        if image_embeds.shape[0] != image_index.shape[0]:
            raise ValueError(f"{image_embeds.shape[0]} image embeddings for "
                             f"{image_index.shape[0]} image tokens")
        embeds = embeds.index_copy(0, image_index, image_embeds.to(embeds.dtype))
        return lm(input_ids, positions, inputs_embeds=embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
