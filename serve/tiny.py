"""Tiny Llama-family checkpoints built locally from a seed: the demo's base and the tests' fixtures."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
# Text the byte-level BPE learns its merges from; any text works, this keeps merges stable.
_TOKENIZER_CORPUS = (
    "mintvcs keeps the base model resident and moves only adapter revisions. "
    "Teams fine-tune one base model many times: continuous RL, evaluation candidates, "
    "per-user policies and product branches. The answer is yes. The answer is no. "
    "Hello world! What is the capital of France? Paris is the capital of France. "
) * 4


@dataclass(frozen=True)
class TinyConfig:
    """Shape of a tiny Llama-family model; defaults build a ~0.2M-parameter Llama."""

    arch: str = "llama"
    vocab_size: int = 384
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    init_std: float = 0.08
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {sorted(ARCHITECTURES)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError("vocab_size must hold the 256 byte tokens and the special tokens")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    def hf_config(self) -> dict[str, Any]:
        """The config.json a transformers checkpoint of this shape carries."""
        config: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        }
        if self.arch == "llama":
            config.update(attention_bias=False, mlp_bias=False)
        if self.arch == "mistral":
            config["sliding_window"] = None
        if self.arch == "qwen2":
            config.update(use_sliding_window=False, sliding_window=None, max_window_layers=0)
        config.update(self.extra)
        return config


def build_tokenizer_json() -> str:
    """A byte-level BPE tokenizer.json with <unk>, <s>, </s> at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TinyConfig.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TOKENIZER_CORPUS], trainer=trainer)
    return tokenizer.to_str()


def random_state_dict(config: TinyConfig, seed: int) -> dict[str, Any]:
    """HF-named random weights for `config`, reproducible from `seed`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    std = config.init_std

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    def norm_weight() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(config.hidden_size, generator=generator)

    hidden, inter = config.hidden_size, config.intermediate_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": normal(config.vocab_size, hidden)
    }
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        tensors[f"{prefix}.input_layernorm.weight"] = norm_weight()
        tensors[f"{prefix}.self_attn.q_proj.weight"] = normal(q_out, hidden)
        tensors[f"{prefix}.self_attn.k_proj.weight"] = normal(kv_out, hidden)
        tensors[f"{prefix}.self_attn.v_proj.weight"] = normal(kv_out, hidden)
        tensors[f"{prefix}.self_attn.o_proj.weight"] = normal(hidden, q_out)
        if config.arch == "qwen2":
            tensors[f"{prefix}.self_attn.q_proj.bias"] = normal(q_out)
            tensors[f"{prefix}.self_attn.k_proj.bias"] = normal(kv_out)
            tensors[f"{prefix}.self_attn.v_proj.bias"] = normal(kv_out)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = norm_weight()
        tensors[f"{prefix}.mlp.gate_proj.weight"] = normal(inter, hidden)
        tensors[f"{prefix}.mlp.up_proj.weight"] = normal(inter, hidden)
        tensors[f"{prefix}.mlp.down_proj.weight"] = normal(hidden, inter)
    tensors["model.norm.weight"] = norm_weight()
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = normal(config.vocab_size, hidden)
    return tensors


def build_tiny_model(directory: Path, config: TinyConfig | None = None, *, seed: int = 0) -> Path:
    """Write a loadable HF checkpoint (config, safetensors, tokenizer) of `config` into `directory`."""
    from safetensors.torch import save_file

    config = config or TinyConfig()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.hf_config(), indent=2) + "\n")
    save_file(
        random_state_dict(config, seed),
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (directory / "tokenizer.json").write_text(build_tokenizer_json())
    tokenizer_config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": config.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (directory / "mintvcs-tiny.json").write_text(
        json.dumps({"seed": seed, **asdict(config)}) + "\n"
    )
    return directory
