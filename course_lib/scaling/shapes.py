"""Model shapes as data: the handful of numbers that decide how many bytes and FLOPs a step of a model costs.

A cost model needs no weights, only shapes: how many parameters each layer holds, how many of them a token
touches, and how many bytes of keys and values a token leaves in the cache. ``ModelShape`` holds them for
a decoder of pre-norm layers with grouped-query attention and a SwiGLU MLP (Llama's design), and for its
mixture-of-experts variant (Mixtral's): ``num_experts`` MLPs per layer, of which a router picks
``experts_per_token`` for each token. A dense model is the case of one expert, picked always.

Shapes come from a Hugging Face ``config.json`` dict (``ModelShape.from_hf``: a Llama config goes through the
engine's own ``ModelConfig.from_hf``, which refuses fields it does not understand) or by name
(``shape("llama-3.1-70b")``); the named ones carry the address of the public config.json they copy.

Parameter count of one layer (h = hidden size, I = MLP width, d = head_dim, n_q / n_kv = query / kv heads):

    attention   h*n_q*d (q) + 2*h*n_kv*d (k, v) + n_q*d*h (o)
    MLP         3*h*I per expert (gate, up, down), times num_experts, plus an h*num_experts router
    norms       2*h

plus the embedding table (vocab * h), the output projection (another vocab * h unless tied to the
embedding) and the final norm (h). A token's keys and values take 2 * layers * n_kv * d values in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from course_lib.checkpoint.config import LLAMA_1B_SHAPED, ModelConfig
from course_lib.dtypes import ITEM_BYTES

# Element types a cost model stores weights, caches or activations in, and their bytes per value: the course's
# own types, and the 8- and 4-bit ones a server quantises weights and caches to (fp4 packs two in a byte).
DTYPE_BYTES = {**ITEM_BYTES, "float8": 1, "float4": 0.5}


def dtype_bytes(dtype: str) -> float:
    """Bytes per value of ``dtype`` (fp4 packs two values in a byte)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown element type {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama-style decoder, dense or mixture-of-experts; ``source`` says where it comes from."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the width of one expert's MLP (the MLP's, in a dense model)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    num_experts: int = 1  # MLPs per layer; 1: a dense model
    experts_per_token: int = 1  # how many of them the router sends each token to
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "num_experts", "experts_per_token"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"{self.name}: experts_per_token={self.experts_per_token} exceeds "
                             f"num_experts={self.num_experts}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def q_width(self) -> int:
        """Width of all query heads together (n_q * d); the output projection's input."""
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of all kv heads together (n_kv * d), for keys or for values."""
        return self.num_kv_heads * self.head_dim

    # ---- parameters -------------------------------------------------------------------------------------

    @property
    def attention_parameters(self) -> int:
        """One layer's q, k, v and o projections."""
        return 2 * self.hidden_size * self.q_width + 2 * self.hidden_size * self.kv_width

    @property
    def expert_parameters(self) -> int:
        """One expert's gate, up and down projections (the MLP's, in a dense model)."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def router_parameters(self) -> int:
        """One layer's router: a hidden_size x num_experts projection (none in a dense model)."""
        return self.hidden_size * self.num_experts if self.is_moe else 0

    @property
    def norm_parameters(self) -> int:
        """One layer's two RMSNorm weight vectors."""
        return 2 * self.hidden_size

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    def layer_parameters(self, experts: int | None = None) -> int:
        """One layer's parameters, counting ``experts`` of its MLPs (default: all of them)."""
        experts = self.num_experts if experts is None else experts
        return self.attention_parameters + experts * self.expert_parameters + self.router_parameters \
            + self.norm_parameters

    def parameters(self, experts: int | None = None) -> int:
        """All parameters (layers, embedding, output projection unless tied, final norm), counting ``experts``
        of each layer's MLPs (default: all of them)."""
        head = 0 if self.tie_word_embeddings else self.embedding_parameters
        return self.num_layers * self.layer_parameters(experts) + self.embedding_parameters + head + self.hidden_size

    def active_parameters(self) -> int:
        """The parameters a model card calls active: all but the experts the router does not pick for a token."""
        return self.parameters(self.experts_per_token)

    def kv_bytes_per_layer(self, dtype: str = "bfloat16", kv_heads: int | None = None) -> float:
        """Bytes of keys and values one token leaves in one layer's cache, for ``kv_heads`` of its kv heads
        (default: all; a tensor-parallel GPU holds only its share)."""
        kv_heads = self.num_kv_heads if kv_heads is None else kv_heads
        return 2 * kv_heads * self.head_dim * dtype_bytes(dtype)

    def kv_bytes_per_token(self, dtype: str = "bfloat16") -> float:
        """Bytes of keys and values one token leaves in the cache, over all layers."""
        return self.num_layers * self.kv_bytes_per_layer(dtype)

    # ---- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ModelConfig, name: str, source: str = "") -> ModelShape:
        """The shape of an engine ``ModelConfig`` (a dense Llama)."""
        return cls(name, config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers,
                   config.num_heads, config.num_kv_heads, config.head_dim, config.tie_word_embeddings, source=source)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "", source: str = "") -> ModelShape:
        """The shape in a Hugging Face ``config.json`` dict: model_type 'llama' (read by the engine's
        ``ModelConfig.from_hf``) or 'mixtral' (a Llama whose MLP is ``num_local_experts`` experts)."""
        kind = hf.get("model_type", "llama")
        name = name or hf.get("_name_or_path", kind)
        if kind == "llama":
            return cls.from_config(ModelConfig.from_hf(hf), name, source)
        if kind == "mixtral":
            need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "num_local_experts", "num_experts_per_tok")
            missing = [key for key in need if key not in hf]
            if missing:
                raise ValueError(f"the mixtral config lacks {', '.join(missing)}")
            head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
            return cls(name, hf["vocab_size"], hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"],
                       hf["num_attention_heads"], hf["num_key_value_heads"], head_dim,
                       bool(hf.get("tie_word_embeddings", False)), hf["num_local_experts"], hf["num_experts_per_tok"],
                       source)
        raise ValueError(f"model_type {kind!r} is not one this cost model reads; it reads 'llama' and 'mixtral'")


def _llama31(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, Any]:
    """A Llama 3.1 config.json's shape fields (all three sizes share the rest: 8 kv heads, vocab 128256, RoPE)."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "tie_word_embeddings": False,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}}


HF = "https://huggingface.co/{}/blob/main/config.json"
# Named models: a config.json dict (its public values) or an engine ModelConfig, and where the numbers come from.
MODELS: dict[str, tuple[dict[str, Any] | ModelConfig, str]] = {
    "llama-1b-shaped": (LLAMA_1B_SHAPED, "course_lib.checkpoint.config.LLAMA_1B_SHAPED (the engine suite's model)"),
    "smollm2-135m": ({"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                      "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                      "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                      "tie_word_embeddings": True}, HF.format("HuggingFaceTB/SmolLM2-135M-Instruct")),
    "llama-3.1-8b": (_llama31(4096, 14336, 32, 32), HF.format("meta-llama/Llama-3.1-8B")),
    "llama-3.1-70b": (_llama31(8192, 28672, 80, 64), HF.format("meta-llama/Llama-3.1-70B")),
    "llama-3.1-405b": (_llama31(16384, 53248, 126, 128), HF.format("meta-llama/Llama-3.1-405B")),
    "mixtral-8x7b": ({"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                      "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                      "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2,
                      "tie_word_embeddings": False}, HF.format("mistralai/Mixtral-8x7B-v0.1")),
}


def shape(name: str) -> ModelShape:
    """The named model's shape (``MODELS`` lists the names)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    config, source = MODELS[name]
    if isinstance(config, ModelConfig):
        return ModelShape.from_config(config, name, source)
    return ModelShape.from_hf(config, name, source)
