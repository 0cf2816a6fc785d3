"""Built-in model shapes for benchmarks and smoke runs without checkpoint files.

Each preset is the config.json (and generation_config.json stop ids) of a real checkpoint, parsed
by the same code as a folder, so a preset exercises the real config path. Presets load with
load_format="dummy": real shapes, random weights, no tokenizer. They carry no sampling defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GLM4_STOP_IDS = [151329, 151336, 151338]  # <|endoftext|>, <|user|>, <|observation|>

_GLM4_9B_SHAPES: dict[str, Any] = {
    "vocab_size": 151552,
    "hidden_size": 4096,
    "intermediate_size": 13696,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "eos_token_id": GLM4_STOP_IDS,
    "pad_token_id": 151329,
    "torch_dtype": "bfloat16",
}


GLM4V_STOP_IDS = [151329, 151336, 151338, 151348]  # the GLM-4.1V configs add 151348

# GLM-4.1V-9B-Thinking (reference doc 1.7, 4): GLM-4-0414 text stack with M-RoPE + the tower
_GLM41V_CONFIG: dict[str, Any] = {
    "architectures": ["Glm4vForConditionalGeneration"],
    "model_type": "glm4v",
    "text_config": {
        "model_type": "glm4v_text",
        **{k: v for k, v in _GLM4_9B_SHAPES.items() if k not in ("head_dim", "eos_token_id")},
        "eos_token_id": GLM4V_STOP_IDS,
        "rms_norm_eps": 1e-05,
        "max_position_embeddings": 65536,
        "rope_parameters": {
            "rope_type": "default", "mrope_section": [8, 12, 12],
            "partial_rotary_factor": 0.5, "rope_theta": 10000.0,
        },
    },
    "vision_config": {
        "model_type": "glm4v_vision",
        "depth": 24, "hidden_size": 1536, "num_heads": 12, "patch_size": 14,
        "temporal_patch_size": 2, "spatial_merge_size": 2, "image_size": 336, "in_channels": 3,
        "out_hidden_size": 4096, "intermediate_size": 13696, "hidden_act": "silu",
        "rms_norm_eps": 1e-05, "attention_bias": False,
        "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
    },
    "image_token_id": 151343, "image_start_token_id": 151339, "image_end_token_id": 151340,
    "video_token_id": 151344, "video_start_token_id": 151341, "video_end_token_id": 151342,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


@dataclass(frozen=True)
class Preset:
    config: dict[str, Any]  # as config.json
    generation_eos: list[int] = field(default_factory=list)  # generation_config.json eos ids
    source: str = ""


PRESETS: dict[str, Preset] = {
    "glm-4-9b": Preset(
        {
            "architectures": ["GlmForCausalLM"],
            **_GLM4_9B_SHAPES,
            "rms_norm_eps": 1.5625e-07,
            # the -hf conversion wrote 10000; the remote-code model used 10000 * rope_ratio 500
            "rope_theta": 10000.0,
            "max_position_embeddings": 131072,
        },
        GLM4_STOP_IDS,
        "THUDM/glm-4-9b-chat-hf",
    ),
    "glm-4-9b-0414": Preset(
        {
            "architectures": ["Glm4ForCausalLM"],
            **_GLM4_9B_SHAPES,
            "rms_norm_eps": 1e-05,
            "rope_parameters": {
                "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            },
            "max_position_embeddings": 32768,
        },
        GLM4_STOP_IDS,
        "THUDM/GLM-4-9B-0414",
    ),
    "chatglm3-6b": Preset(
        {
            "architectures": ["ChatGLMModel"],
            "model_type": "chatglm",
            "num_layers": 28,
            "padded_vocab_size": 65024,
            "hidden_size": 4096,
            "ffn_hidden_size": 13696,
            "kv_channels": 128,
            "num_attention_heads": 32,
            "multi_query_attention": True,
            "multi_query_group_num": 2,
            "seq_length": 8192,
            "layernorm_epsilon": 1e-05,
            "rmsnorm": True,
            "post_layer_norm": True,
            "add_bias_linear": False,
            "add_qkv_bias": True,
            "original_rope": True,
            "apply_residual_connection_post_layernorm": False,
            "tie_word_embeddings": False,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "torch_dtype": "float16",
        },
        [2, 64795, 64797],  # </s>, <|user|>, <|observation|>
        "THUDM/chatglm3-6b",
    ),
    "glm-4v-9b": Preset(
        {
            "architectures": ["ChatGLMModel"],
            "model_type": "chatglm",
            "num_layers": 40,
            "padded_vocab_size": 151552,
            "hidden_size": 4096,
            "ffn_hidden_size": 13696,
            "kv_channels": 128,
            "num_attention_heads": 32,
            "multi_query_attention": True,
            "multi_query_group_num": 2,
            "seq_length": 8192,
            "layernorm_epsilon": 1.5625e-07,
            "rmsnorm": True,
            "post_layer_norm": True,
            "add_bias_linear": False,
            "add_qkv_bias": True,
            "rope_ratio": 1,
            "original_rope": True,
            "apply_residual_connection_post_layernorm": False,
            "tie_word_embeddings": False,
            "boi_token_id": 151339,
            "eoi_token_id": 151340,
            "eos_token_id": [151329, 151336, 151338],
            "pad_token_id": 151329,
            "torch_dtype": "bfloat16",
            "vision_config": {
                "hidden_act": "gelu", "in_channels": 3, "num_hidden_layers": 63,
                "hidden_size": 1792, "patch_size": 14, "num_heads": 16,
                "intermediate_size": 15360, "layer_norm_eps": 1e-06, "num_positions": 6401,
                "image_size": 1120, "scaling_factor": 8,
            },
        },
        GLM4_STOP_IDS,
        "THUDM/glm-4v-9b",
    ),
    "chatglm-6b": Preset(
        {
            "architectures": ["ChatGLMModel"],
            "model_type": "chatglm",
            "vocab_size": 130528,
            "hidden_size": 4096,
            "num_layers": 28,
            "num_attention_heads": 32,
            "inner_hidden_size": 16384,
            "layernorm_epsilon": 1e-05,
            "max_sequence_length": 2048,
            "position_encoding_2d": True,
            "bos_token_id": 130004,  # <sop>
            "eos_token_id": 130005,  # <eop>
            "mask_token_id": 130000,
            "gmask_token_id": 130001,
            "pad_token_id": 3,
            "torch_dtype": "float16",
        },
        [130005],
        "THUDM/chatglm-6b",
    ),
    "llama-3-8b": Preset(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 128256,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05,
            "rope_theta": 500000.0,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": False,
            "bos_token_id": 128000,
            "eos_token_id": 128009,
            "torch_dtype": "bfloat16",
        },
        [128001, 128009],  # <|end_of_text|>, <|eot_id|>
        "meta-llama/Meta-Llama-3-8B-Instruct",
    ),
    "llama-3.1-8b": Preset(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 128256,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            },
            "max_position_embeddings": 131072,
            "tie_word_embeddings": False,
            "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
            "torch_dtype": "bfloat16",
        },
        [128001, 128008, 128009],
        "meta-llama/Llama-3.1-8B-Instruct",
    ),
    "qwen2.5-7b": Preset(
        {
            "architectures": ["Qwen2ForCausalLM"],
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
            "use_sliding_window": False,
            "tie_word_embeddings": False,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "torch_dtype": "bfloat16",
        },
        [151645, 151643],  # <|im_end|>, <|endoftext|>
        "Qwen/Qwen2.5-7B-Instruct",
    ),
    "qwen3-8b": Preset(
        {
            "architectures": ["Qwen3ForCausalLM"],
            "vocab_size": 151936,
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 40960,
            "attention_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "torch_dtype": "bfloat16",
        },
        [151645, 151643],
        "Qwen/Qwen3-8B",
    ),
    "glm-4.1v-9b-thinking": Preset(_GLM41V_CONFIG, GLM4V_STOP_IDS, "THUDM/GLM-4.1V-9B-Thinking"),
    # "the same architecture as GLM-4.1V-9B-Thinking" (Open-AutoGLM README); same numbers
    "autoglm-phone-9b": Preset(_GLM41V_CONFIG, GLM4V_STOP_IDS, "zai-org/AutoGLM-Phone-9B"),
}
