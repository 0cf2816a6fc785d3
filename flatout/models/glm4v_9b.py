"""GLM-4V-9B (THUDM/glm-4v-9b: `ChatGLMModel` with a `vision_config`): the glm-4-9b-chat text
stack of decoder.py plus an EVA2-CLIP tower.

Tower (weights `transformer.vision.*`, as shipped): a fixed S x S image in P x P patches (a conv
with kernel = stride = P) plus a CLS token, each with a learned position; `depth` post-norm blocks
    x = x + LN1(Attn(x));  x = x + LN2(MLP(x))      (full attention, fused q|k|v with bias,
                                                     GELU MLP with biases)
then the adapter: CLS dropped, the (S/P)^2 patches as a grid through a 2x2 stride-2 conv to the
text width, a GLU (linear_proj, LayerNorm, GELU, then dense_4h_to_h(silu(gate_proj) *
dense_h_to_4h)), the learned boi and eoi vectors around the patches, all divided by
scaling_factor: 2 + (S/2P)^2 embeddings per image (1602 at 1120 / 14).

Prompt: the image span in ids is boi, one placeholder, eoi, widened to boi, placeholders, eoi
(one id per embedding) and replaced by the image's embeddings; boi keeps its position p, every
patch embedding takes p + 1, eoi p + 2 (multimodal/placement.py, as the checkpoint's code).

Under tensor parallelism the tower's blocks and the adapter's gated MLP are split over the ranks
like the text model (heads, MLP columns; a reduce after each), the rest is replicated: every rank
ends with the whole image embedding on the device of its own text embedding, so it never moves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flatout.config import EvaVisionConfig, ModelConfig
from flatout.distributed import PendingReduce
from flatout.layers.activation import SiluAndMul
from flatout.layers.embedding import ParallelLMHead
from flatout.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from flatout.layers.norm import LayerNorm
from flatout.models.decoder import DecoderModel, fuses_reduce, lm_head_quantization


class EvaPatchEmbedding(nn.Module):
    def __init__(self, eva: EvaVisionConfig) -> None:
        super().__init__()
        h = eva.hidden_size
        self.proj = nn.Conv2d(eva.in_channels, h, kernel_size=eva.patch_size,
                              stride=eva.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, h), requires_grad=False)
        self.position_embedding = nn.Embedding(eva.grid**2 + 1, h)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [N, C, S, S] -> [N, 1 + G^2, h]
        x = self.proj(images.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.cls_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


def _reduced(out: torch.Tensor | PendingReduce) -> torch.Tensor:
    assert isinstance(out, torch.Tensor), "row-parallel linears here reduce their own results"
    return out


class EvaAttention(nn.Module):
    """Heads split over the tensor-parallel ranks, like the text model's."""

    def __init__(self, eva: EvaVisionConfig, quantization: str | None = None) -> None:
        super().__init__()
        h, heads = eva.hidden_size, eva.num_heads
        self.query_key_value = QKVParallelLinear(h, h // heads, heads, heads, bias=True,
                                                 quantization=quantization)
        self.dense = RowParallelLinear(h, h, bias=True, quantization=quantization)
        self.num_heads = self.query_key_value.num_heads  # this rank's

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, L, h]
        n, length, h = x.shape
        qkv = self.query_key_value(x.reshape(n * length, h))  # q | k | v blocks of this rank
        q, k, v = qkv.view(n, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, H, L, D]: full attention per image
        out = self.dense(out.transpose(1, 2).reshape(n * length, -1))
        return _reduced(out).view(n, length, h)


class EvaMLP(nn.Module):
    def __init__(self, eva: EvaVisionConfig, quantization: str | None = None) -> None:
        super().__init__()
        self.fc1 = MergedColumnParallelLinear(eva.hidden_size, [eva.intermediate_size], bias=True,
                                              quantization=quantization)
        self.fc2 = RowParallelLinear(eva.intermediate_size, eva.hidden_size, bias=True,
                                     quantization=quantization)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = self.fc2(F.gelu(self.fc1(x.reshape(-1, shape[-1]))))
        return _reduced(out).view(shape)


class EvaBlock(nn.Module):
    """Post-norm: the norms apply to the branch outputs, before the residual add."""

    def __init__(self, eva: EvaVisionConfig, quantization: str | None = None) -> None:
        super().__init__()
        self.input_layernorm = LayerNorm(eva.hidden_size, eva.layer_norm_eps)
        self.attention = EvaAttention(eva, quantization)
        self.mlp = EvaMLP(eva, quantization)
        self.post_attention_layernorm = LayerNorm(eva.hidden_size, eva.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class EvaTransformer(nn.Module):
    def __init__(self, eva: EvaVisionConfig, quantization: str | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EvaBlock(eva, quantization) for _ in range(eva.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class EvaGLU(nn.Module):
    """linear_proj (replicated), LayerNorm, GELU, then the gated MLP split over the ranks: the
    checkpoint's gate_proj and dense_h_to_4h load as the halves of gate_up_proj."""

    def __init__(self, eva: EvaVisionConfig, quantization: str | None = None) -> None:
        super().__init__()
        o, g = eva.out_hidden_size, eva.glu_intermediate_size
        self.linear_proj = nn.Linear(o, o, bias=False)
        self.norm1 = LayerNorm(o, 1e-5)  # torch's LayerNorm default in the checkpoint's code
        self.gate_up_proj = MergedColumnParallelLinear(o, [g, g], bias=False,
                                                       quantization=quantization)
        self.dense_4h_to_h = RowParallelLinear(g, o, bias=False, quantization=quantization)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, L, o]
        shape = x.shape
        x = F.gelu(self.norm1(self.linear_proj(x))).reshape(-1, shape[-1])
        return _reduced(self.dense_4h_to_h(self.act(self.gate_up_proj(x)))).view(shape)


class EVA2CLIP(nn.Module):
    """With `quantization` the blocks' linears and the adapter's gated MLP (the parallel
    linears: nearly all of its weights) hold that format, as the text model's do."""

    def __init__(self, eva: EvaVisionConfig, quantization: str | None = None) -> None:
        super().__init__()
        self.eva = eva
        o = eva.out_hidden_size
        self.patch_embedding = EvaPatchEmbedding(eva)
        self.transformer = EvaTransformer(eva, quantization)
        self.conv = nn.Conv2d(eva.hidden_size, o, kernel_size=2, stride=2)
        self.linear_proj = EvaGLU(eva, quantization)
        self.boi = nn.Parameter(torch.zeros(1, 1, o), requires_grad=False)
        self.eoi = nn.Parameter(torch.zeros(1, 1, o), requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, S, S] (preprocessed) -> [N, 2 + (G/2)^2, out_hidden_size]."""
        x = self.transformer(self.patch_embedding(images))[:, 1:]  # CLS dropped
        n, _, h = x.shape
        g = self.eva.grid
        x = self.conv(x.reshape(n, g, g, h).permute(0, 3, 1, 2))  # [N, o, G/2, G/2]
        x = self.linear_proj(x.flatten(2).transpose(1, 2))
        x = torch.cat([self.boi.expand(n, 1, -1), x, self.eoi.expand(n, 1, -1)], dim=1)
        return x / self.eva.scaling_factor


class _VisionHolder(nn.Module):
    """Gives the tower its checkpoint path, `transformer.vision`."""

    def __init__(self, eva: EvaVisionConfig, quantization: str | None = None) -> None:
        super().__init__()
        self.vision = EVA2CLIP(eva, quantization)


class ChatGLM4VForCausalLM(nn.Module):
    """The CausalLM interface plus images.

    encode_images(images [N, C, S, S]) -> [N, slots, hidden] (slots = boi + patches + eoi);
    forward(input_ids [T], positions [T], image_embeds [rows, hidden] or None, image_index
    [rows] or None) -> hidden [T, hidden]: image_embeds' rows replace the embeddings of the
    tokens at image_index (by default each boi's span of `slots` tokens in input_ids, the
    prompt widened as multimodal/placement.py does). The rows are moved to the text
    embedding's device and dtype first: the tower may sit anywhere."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.eva_vision is None:
            raise ValueError(f"{cfg.model}: config has no vision_config")
        self.config = cfg
        self.eva = cfg.eva_vision
        self.fuses_reduce = fuses_reduce(cfg)
        self.model = DecoderModel(cfg, self.fuses_reduce)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, lm_head_quantization(cfg))
        self.transformer = _VisionHolder(cfg.eva_vision, cfg.quantization)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.transformer.vision(images)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if image_embeds is None:
            return self.model(input_ids, positions)
        embeds: torch.Tensor = self.model.embed_tokens(input_ids)  # [T, hidden]
        if image_embeds.dim() == 3:  # [N, slots, hidden]: one image per row
            image_embeds = image_embeds.flatten(0, 1)
        if image_index is None:
            slots = self.eva.num_image_tokens
            starts = (input_ids == self.eva.boi_token_id).nonzero()[:, 0]
            image_index = (starts[:, None] + torch.arange(slots, device=starts.device)).flatten()
        if image_embeds.shape[0] != image_index.shape[0]:
            raise ValueError(f"{image_embeds.shape[0]} image embeddings for "
                             f"{image_index.shape[0]} image tokens")
        rows = image_embeds.to(device=embeds.device, dtype=embeds.dtype)
        embeds = embeds.index_copy(0, image_index.to(embeds.device), rows)
        return self.model(input_ids, positions, inputs_embeds=embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
