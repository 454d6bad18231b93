"""The shape of a Llama-style model: the handful of numbers every other engine module is sized from.

The engine reads them from a Hugging Face ``config.json`` (a ``LlamaConfig``), so a checkpoint written by
the course loads in ``transformers`` and a small Llama from the Hub loads here. Validation happens once,
in the constructor: a model whose heads do not split evenly would otherwise fail deep inside a kernel.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

from course_lib.checkpoint import rope
from course_lib.checkpoint.rope import Llama3Scaling

# Hugging Face's name for each field, where it differs from ours.
HF_NAMES = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
}

# config.json fields that describe the file or training, not the forward pass: read past without a word.
# Any field neither here nor read by ``from_hf`` is refused by name: an ignored field can change the math.
HF_BOOKKEEPING = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache", "initializer_range",
    "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "output_attentions", "output_hidden_states",
    "return_dict", "is_decoder", "tokenizer_class", "name_or_path", "is_llama_config", "transformers.js_config",
}
# Fields the engine reads only to check they ask for what it implements: their one supported value.
HF_FIXED = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "pretraining_tp": 1,
            "rope_interleaved": False}  # interleaved: GGML's pairing of features (2i, 2i+1), not rotate-half
HF_ROPE = {"rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor"}


@dataclass(frozen=True)
class ModelConfig:
    """A Llama: pre-norm decoder layers of grouped-query attention with RoPE and a SwiGLU MLP."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # width of the MLP's gate and up projections
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads; num_heads // num_kv_heads query heads share each (GQA)
    head_dim: int = field(default=0)  # 0: hidden_size // num_heads, as Llama has it
    max_position_embeddings: int = 2048
    rope_theta: float = rope.DEFAULT_THETA
    rope_scaling: Llama3Scaling | None = None  # Llama 3.1's stretch of the low frequencies (see ``rope``)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False  # the output projection reuses the embedding table

    def __post_init__(self) -> None:
        counts = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_position_embeddings",
        )
        for name in counts:
            _require_positive_int(name, getattr(self, name))
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} must split evenly over num_heads={self.num_heads} "
                    f"(or give head_dim explicitly)"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _require_positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs of features), got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}: "
                f"each kv head serves the same number of query heads"
            )
        for name in ("rope_theta", "rms_norm_eps"):
            _require_positive_number(name, getattr(self, name))
        if self.rope_scaling is not None:
            _check_llama3_scaling(self.rope_scaling)
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"tie_word_embeddings must be True or False, got {self.tie_word_embeddings!r}")

    @property
    def queries_per_kv(self) -> int:
        """How many query heads read each kv head."""
        return self.num_heads // self.num_kv_heads

    def inverse_frequencies(self) -> Any:
        """RoPE's ``head_dim / 2`` frequencies in float64, scaling applied (``course_lib.checkpoint.rope``)."""
        return rope.inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face ``LlamaConfig`` dict (the contents of ``config.json``), as transformers 4 or 5 wrote it.

        Every field is either used, checked to ask for what the engine implements, or known to be bookkeeping;
        anything else is refused by name rather than silently ignored.
        """
        if hf.get("model_type", "llama") != "llama":
            raise ValueError(f"expected a Llama config (model_type 'llama'), got model_type {hf['model_type']!r}")
        for key, supported in HF_FIXED.items():
            if hf.get(key, supported) != supported:
                raise ValueError(f"{key}={hf[key]!r} is not supported by this engine (it needs {supported!r})")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")
        missing = [HF_NAMES.get(name, name) for name in required if HF_NAMES.get(name, name) not in hf]
        if missing:
            raise ValueError(f"the config lacks {', '.join(missing)}")
        values = {name: hf[HF_NAMES.get(name, name)] for name in required}
        values["num_kv_heads"] = hf.get("num_key_value_heads") or values["num_heads"]  # absent: multi-head
        optional = ("head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
        values.update({name: hf[name] for name in optional if hf.get(name) is not None})
        values["rope_theta"], values["rope_scaling"] = rope.from_hf(hf)
        read = {HF_NAMES.get(name, name) for name in (*required, "num_kv_heads", *optional)}
        unknown = sorted(key for key in hf if key not in read | HF_BOOKKEEPING | set(HF_FIXED) | HF_ROPE
                         and not key.startswith("_"))
        if unknown:
            raise ValueError(f"config field(s) {', '.join(unknown)} are not understood by this engine: refusing "
                             f"rather than ignoring what may change the model's math")
        return cls(**values)

    def to_hf(self) -> dict[str, Any]:
        """This config as a Hugging Face ``LlamaConfig`` dict, ready for ``config.json`` (transformers 5's spelling)."""
        fields = {HF_NAMES.get(name, name): value for name, value in asdict(self).items()
                  if name not in ("rope_theta", "rope_scaling")}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **HF_FIXED,
            **fields,
            **rope.to_hf(self.rope_theta, self.rope_scaling),
        }


def _require_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _require_positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_llama3_scaling(scaling: Any) -> None:
    if not isinstance(scaling, Llama3Scaling):
        raise ValueError(f"rope_scaling must be None or a Llama3Scaling, got {scaling!r}")
    for name in ("factor", "low_freq_factor", "high_freq_factor"):
        _require_positive_number(f"llama3 rope scaling's {name}", getattr(scaling, name))
    _require_positive_int("llama3 rope scaling's original_max_position_embeddings",
                          scaling.original_max_position_embeddings)
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise ValueError(f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                         f"{scaling.high_freq_factor} and {scaling.low_freq_factor}")


# A model small enough that a forward pass on a laptop CPU takes milliseconds: for tests and chapters.
# Its heads are 64 wide, a size the CUDA paged-attention kernels are built for, so it runs on a GPU too.
TINY = ModelConfig(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=512,
)

# A 1B-parameter Llama: Llama 3.2 1B's layers with a 32000-token vocabulary; the engine's targets are measured on it.
LLAMA_1B_SHAPED = ModelConfig(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    max_position_embeddings=2048,
)

# Llama 3.1 8B's shape (its layers, heads and 128256-token vocabulary) with random weights: the tensor_parallel suite's.
LLAMA_8B_SHAPED = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                              num_kv_heads=8, max_position_embeddings=8192)
