"""The cost of serving a model on a layout of GPUs: a roofline per operation, alpha-beta per collective, memory.

**One operation.** A GPU cannot finish an operation faster than it can move its bytes or do its arithmetic:

    time = max(bytes / memory bandwidth, flops / arithmetic rate)

The bytes are the weights it reads, the keys and values (KV cache) it reads and writes, and its activations
in and out; the flops count a multiply-add as two. A decode step multiplies each weight once per token, so at
batch ``B`` a projection of ``n`` weights does ``2 B n`` flops over ``n`` weight bytes (bf16: 2 bytes each):
``B`` flops per byte. An H100 does about 295 bf16 flops in the time it moves a byte (989.5 TFLOP/s over
3.35 TB/s, ``hardware``), so below a batch of a few hundred decode is memory-bound: its time is the weights'
bytes over the bandwidth, whatever the batch.

**One step** is the operations of every layer, summed by group (``qkv``, ``attention``, ``o_proj``, ``mlp``,
then ``lm_head`` and ``embedding`` once a step), each group's roofline taken on its own: a step cannot
overlap one layer's weights with the next layer's arithmetic, because each waits for the one before.

**Several GPUs** (``Layout``):

* *tensor parallelism* (TP) splits every weight matrix over ``tp`` GPUs: each reads ``1 / tp`` of the
  weights, and the partial results are summed by an all-reduce of the activations (``B x hidden`` values)
  twice a layer, after attention and after the MLP (``course_lib.scaling.collectives``: alpha-beta).
  Key/value heads split too; past ``num_kv_heads`` GPUs they are replicated.
* *pipeline parallelism* (PP) gives each of ``pp`` GPUs a slice of the layers. A token passes every stage in
  turn, so a token still takes all the layers' time; the batch is cut into micro-batches that fill the
  stages, and when there are fewer sequences than stages the rest of the stages wait (the *bubble*). The
  activations go from stage to stage by a send, over NVLink while one replica's ``tp * pp`` GPUs share an
  NVLink domain (data-parallel replicas do not talk to each other, so they do not count).
* *data parallelism* (DP) runs ``dp`` copies, each serving its own sequences.
* *expert parallelism* (EP, for mixture-of-experts models) gives each of ``ep = tp * dp`` GPUs a share of
  the experts, whole, instead of a slice of every expert (vLLM's expert parallelism); each token's hidden
  vector travels to its experts' GPUs and back: two all-to-alls a layer.

**Weight types.** fp8 or fp4 weights (``Assumptions.weights``) cover the projections and the experts of every
layer. The embedding table and the output projection (``lm_head``) stay bf16, as do the norms and routers:
quantisation recipes for vLLM target the layers' linear projections and leave ``lm_head`` out (LLM
Compressor's FP8 example, <https://docs.vllm.ai/projects/llm-compressor/en/stable/examples/quantization_w8a8_fp8/>:
``QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])``, read 2026-12-07; the
embedding is no Linear at all).

**Memory.** Each GPU holds its share of the weights; what is left of ``memory_utilization`` of its memory
holds keys and values. ``tokens that fit = free bytes / KV bytes per token``, so the largest batch at a
context of ``C`` tokens is ``tokens that fit // C``: longer contexts, smaller batches.

**Serving.** ``predict`` serves one batch the simplest way: all its requests arrive together, are prefilled
together, then decoded together. It reports what a user and an operator see of that one schedule: time to
first token (TTFT: the prefill of the whole batch, since the last request's first token waits for all of it),
time per output token (TPOT: one decode step of the batch, every stage of the pipeline), output tokens per
second per GPU (prefill and decode of the batch, over the time they take) and per user (1 / TPOT), and the
cost of a million output tokens at a price per GPU-hour.

The plain roofline leaves out what is not bytes or flops: each kernel's launch and ramp, the host. The
``Assumptions`` carry such terms explicitly (zero by default); ``course_lib.scaling.calibration`` sets them
from named measurements and shows how far each version lands from what the course's engine measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from course_lib.bench.roofline import roofline_time
from course_lib.scaling import collectives
from course_lib.scaling.hardware import Hardware
from course_lib.scaling.shapes import ModelShape, dtype_bytes

ATTENTION_KERNELS = ("flash", "paged_decode")
WEIGHT_TYPES = ("bfloat16", "float8", "float4")


@dataclass(frozen=True)
class Layout:
    """How a model is spread over ``tp * pp * dp`` GPUs; ``ep`` is 1 or ``tp * dp`` (experts spread whole)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "ep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.ep not in (1, self.tp * self.dp):
            raise ValueError(f"ep must be 1 (experts split like the dense MLP) or tp * dp = {self.tp * self.dp} "
                             f"(each GPU holds whole experts, as vLLM's expert parallelism does), got {self.ep}")

    @classmethod
    def split(cls, gpus: int, tp: int = 1, pp: int = 1, expert_parallel: bool = False) -> Layout:
        """The layout of ``gpus`` GPUs with this TP and PP; the rest is data parallelism."""
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
            raise ValueError(f"gpus must be a positive integer, got {gpus!r}")
        if gpus % (tp * pp):
            raise ValueError(f"{gpus} GPUs do not split into TP{tp} x PP{pp}: {gpus} is not a multiple of "
                             f"{tp * pp}")
        dp = gpus // (tp * pp)
        return cls(tp, pp, dp, tp * dp if expert_parallel else 1)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def label(self) -> str:
        return f"TP{self.tp} PP{self.pp} DP{self.dp} EP{self.ep}"

    def check(self, model: ModelShape, hw: Hardware) -> None:
        """Raise ValueError, saying why, if ``model`` cannot be laid out this way on ``hw``."""
        domain = hw.require("nvlink_domain")
        if self.tp > domain:
            raise ValueError(f"{self.label}: tensor parallelism must stay inside one NVLink domain "
                             f"({domain} GPUs on {hw.name})")
        if model.num_heads % self.tp:
            raise ValueError(f"{self.label}: {model.name}'s {model.num_heads} query heads do not split over "
                             f"{self.tp} GPUs")
        if self.pp > model.num_layers:
            raise ValueError(f"{self.label}: {model.name} has only {model.num_layers} layers for {self.pp} stages")
        if self.ep > 1 and not model.is_moe:
            raise ValueError(f"{self.label}: expert parallelism needs a mixture-of-experts model; "
                             f"{model.name} is dense")
        if model.num_experts % self.ep:
            raise ValueError(f"{self.label}: {model.name}'s {model.num_experts} experts do not split over "
                             f"{self.ep} GPUs")


@dataclass(frozen=True)
class Assumptions:
    """What a prediction assumes beyond the shapes and the hardware. The defaults are the plain roofline.

    * element types of the layers' weights (which also picks their tensor-core rate; the embedding and
      lm_head stay bf16, the module docstring says why) and of the KV cache;
    * ``attention_kernel``: 'flash' reads each sequence's keys and values once a step on tensor cores;
      'paged_decode' is the course engine's kernel, one row per new token: each prompt token re-reads its
      whole prefix, on CUDA cores (``course_lib.engine.model``'s docstring says why);
    * ``kernel_s`` per kernel, ``kernels_per_layer`` + ``kernels_per_step`` kernels a step: the fixed cost
      of each kernel (launch, ramp-up, tail), which a roofline has no term for;
    * ``memory_utilization``: the share of GPU memory the server may use (vLLM's default is 0.9);
    * the alpha of collectives inside an NVLink domain and across the network (``collectives``).
    """

    weights: str = "bfloat16"
    kv_cache: str = "bfloat16"
    attention_kernel: str = "flash"
    kernel_s: float = 0.0
    kernels_per_layer: int = 0
    kernels_per_step: int = 0
    memory_utilization: float = 0.9
    nvlink_alpha_s: float = collectives.NVLINK_ALPHA_S
    network_alpha_s: float = collectives.NETWORK_ALPHA_S

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_TYPES:
            raise ValueError(f"weights must be one of {WEIGHT_TYPES} (types with a tensor-core rate), "
                             f"got {self.weights!r}")
        dtype_bytes(self.kv_cache)  # raises on an unknown element type
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel must be one of {ATTENTION_KERNELS}, got {self.attention_kernel!r}")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory_utilization must be in (0, 1], got {self.memory_utilization}")
        if min(self.kernel_s, self.kernels_per_layer, self.kernels_per_step, self.nvlink_alpha_s,
               self.network_alpha_s) < 0:
            raise ValueError("kernel costs, kernel counts and alphas must be >= 0")


PLAIN = Assumptions()
ACTIVATION = "bfloat16"  # activations and norm weights stay bf16 whatever the weights' type


@dataclass(frozen=True)
class Batch:
    """One step's work on one DP replica: ``sequences`` sequences, each computing ``new_tokens`` tokens and
    holding ``context`` tokens of keys and values once the step has written its own (1 new token: decode)."""

    sequences: int
    new_tokens: int
    context: int

    def __post_init__(self) -> None:
        if min(self.sequences, self.new_tokens) < 1 or self.context < self.new_tokens:
            raise ValueError(f"a batch needs sequences >= 1, new_tokens >= 1 and context >= new_tokens, got {self}")

    @property
    def tokens(self) -> int:
        return self.sequences * self.new_tokens

    @property
    def attended(self) -> float:
        """Tokens attended to, summed over the new tokens of all sequences: the i-th of n new tokens (causal)
        sees ``context - n + i`` tokens, so a sequence sums ``n * context - n (n - 1) / 2``."""
        n = self.new_tokens
        return self.sequences * (n * self.context - n * (n - 1) / 2)


@dataclass(frozen=True)
class Cost:
    """One operation group of a step, summed over the layers that run it, and what bounds it."""

    name: str
    seconds: float
    bound: str  # 'memory', 'compute', 'network' or 'launch'
    weight_bytes: float = 0.0
    kv_bytes: float = 0.0
    activation_bytes: float = 0.0
    flops: float = 0.0


@dataclass(frozen=True)
class StepCost:
    """The costs of one step on one GPU of the slowest pipeline stage."""

    costs: tuple[Cost, ...]

    @property
    def seconds(self) -> float:
        return sum(cost.seconds for cost in self.costs)

    def total(self, what: str) -> float:
        """Sum of one column over the operations: 'weight_bytes', 'kv_bytes', 'activation_bytes' or 'flops'."""
        return sum(getattr(cost, what) for cost in self.costs)

    def table(self) -> list[str]:
        """One line per operation group: microseconds, what bounds it, bytes and flops."""
        return [f"{c.name:<22} {c.seconds * 1e6:>10.1f} us  {c.bound:<8} "
                f"{(c.weight_bytes + c.kv_bytes + c.activation_bytes) / 1e6:>10.2f} MB  {c.flops / 1e9:>10.2f} GFLOP"
                for c in self.costs]


def _operation(name: str, layers: float, hw: Hardware, rate: float, *, weights: float = 0.0, kv: float = 0.0,
               activations: float = 0.0, flops: float = 0.0) -> Cost:
    """``layers`` x the roofline time of an operation moving these bytes and doing these flops per layer."""
    moved, bandwidth = weights + kv + activations, hw.require("hbm_bytes_per_s")
    seconds = roofline_time(flops, moved, rate, bandwidth)
    return Cost(name, layers * seconds, "memory" if seconds == moved / bandwidth else "compute",
                layers * weights, layers * kv, layers * activations, layers * flops)


def _link(hw: Hardware, group: int, assumptions: Assumptions) -> tuple[float, float]:
    """(bytes/s each way, alpha) for a collective over ``group`` GPUs: NVLink inside one domain, else the NIC."""
    if group <= hw.require("nvlink_domain"):
        return hw.nvlink_bytes_per_s_each_way, assumptions.nvlink_alpha_s
    return hw.require("nic_bytes_per_s"), assumptions.network_alpha_s


@dataclass(frozen=True)
class _PerGpu:
    """What one GPU of a layout holds of each layer."""

    heads: int
    kv_heads: int  # ceil(num_kv_heads / tp): past num_kv_heads GPUs, kv heads are replicated
    layers: int  # layers of the largest pipeline stage

    @classmethod
    def of(cls, model: ModelShape, layout: Layout) -> _PerGpu:
        return cls(model.num_heads // layout.tp, math.ceil(model.num_kv_heads / layout.tp),
                   math.ceil(model.num_layers / layout.pp))


def experts_touched(experts: int, per_token: int, tokens: int) -> float:
    """Expected distinct experts (of ``experts``) that ``tokens`` tokens, each routed to ``per_token`` of them
    uniformly, reach: each expert is missed by all with probability (1 - per_token / experts) ** tokens."""
    return experts * (1 - (1 - per_token / experts) ** tokens)


def step_cost(model: ModelShape, hw: Hardware, layout: Layout, batch: Batch,
              assumptions: Assumptions = PLAIN) -> StepCost:
    """The cost of one step of ``batch`` (one DP replica's share) on the slowest stage of ``layout``."""
    layout.check(model, hw)
    a, per = assumptions, _PerGpu.of(model, layout)
    wb, ab = dtype_bytes(a.weights), dtype_bytes(ACTIVATION)
    h, d, t, tp = model.hidden_size, model.head_dim, batch.tokens, layout.tp
    gemm_rate, table_rate = hw.flops_per_s(a.weights), hw.flops_per_s(ACTIVATION)  # tables stay bf16
    layers = per.layers
    costs = []

    qkv_params = h * (per.heads + 2 * per.kv_heads) * d
    costs.append(_operation("qkv", layers, hw, gemm_rate, weights=qkv_params * wb + h * ab, flops=2 * t * qkv_params,
                           activations=t * (h + (per.heads + 2 * per.kv_heads) * d) * ab))

    kv_per_token = model.kv_bytes_per_layer(a.kv_cache, per.kv_heads)  # one token, one layer, this GPU
    per_token_reads = a.attention_kernel == "paged_decode" and batch.new_tokens > 1
    kv_read = (batch.attended if per_token_reads else batch.sequences * batch.context) * kv_per_token
    attention_rate = hw.flops_per_s("float32" if a.attention_kernel == "paged_decode" else "bfloat16")
    costs.append(_operation("attention", layers, hw, attention_rate, kv=kv_read + t * kv_per_token,
                           activations=2 * t * per.heads * d * ab, flops=4 * per.heads * d * batch.attended))

    o_params = per.heads * d * h
    costs.append(_operation("o_proj", layers, hw, gemm_rate, weights=o_params * wb, flops=2 * t * o_params,
                           activations=t * (per.heads * d + h) * ab))
    costs.append(_mlp(model, hw, layout, t, layers, gemm_rate, wb, ab))
    costs.extend(_layer_collectives(model, hw, layout, t, layers, a))

    head_params = model.vocab_size * h / tp  # the output projection, split over the vocabulary
    costs.append(_operation("lm_head", 1, hw, table_rate, weights=head_params * ab + h * ab,
                           flops=2 * batch.sequences * head_params,
                           activations=batch.sequences * (h * ab + model.vocab_size / tp * 4)))
    if layout.pp == 1:
        costs.append(_operation("embedding", 1, hw, table_rate, weights=t * h * ab, activations=t * h * ab))
    else:  # the stages of one replica talk; DP replicas do not, so only its tp * pp GPUs decide the link
        link, alpha = _link(hw, layout.tp * layout.pp, a)
        costs.append(Cost("pipeline send", collectives.send_s(t * h * ab, link, alpha), "network",
                          activation_bytes=t * h * ab))
    kernels = layers * a.kernels_per_layer + a.kernels_per_step
    if a.kernel_s and kernels:
        costs.append(Cost(f"{kernels} kernel launches", kernels * a.kernel_s, "launch"))
    return StepCost(tuple(costs))


def _mlp(model: ModelShape, hw: Hardware, layout: Layout, t: int, layers: int, rate: float, wb: float,
         ab: float) -> Cost:
    """The MLP of ``t`` tokens on one GPU: a dense SwiGLU split over TP, or the experts its tokens reach."""
    h, width, tp = model.hidden_size, model.intermediate_size, layout.tp
    activations = t * (2 * h + 3 * width * model.experts_per_token / tp) * ab
    if not model.is_moe:
        params = model.expert_parameters / tp
        return _operation("mlp", layers, hw, rate, weights=params * wb + h * ab, flops=2 * t * params,
                         activations=activations)
    router = model.router_parameters
    if layout.ep == 1:  # every expert split over TP like a dense MLP: read the experts this replica's tokens reach
        touched = experts_touched(model.num_experts, model.experts_per_token, t)
        expert_bytes, routed = touched * model.expert_parameters / tp, t * model.experts_per_token / tp
        flops = 2 * routed * model.expert_parameters
    else:  # whole experts, num_experts / ep per GPU; all dp replicas' tokens are routed over the ep GPUs
        touched = experts_touched(model.num_experts, model.experts_per_token, t * layout.dp) / layout.ep
        expert_bytes = touched * model.expert_parameters
        flops = 2 * (t * model.experts_per_token / tp) * model.expert_parameters
    return _operation("mlp (experts)", layers, hw, rate, weights=expert_bytes * wb + (router + h) * ab,
                     flops=flops + 2 * t * router, activations=activations)


def _layer_collectives(model: ModelShape, hw: Hardware, layout: Layout, t: int, layers: int,
                       a: Assumptions) -> list[Cost]:
    """The communication of ``layers`` layers: TP all-reduces, or EP's all-to-alls, by the alpha-beta model."""
    ab, h, costs = dtype_bytes(ACTIVATION), model.hidden_size, []
    hidden_bytes = t * h * ab
    if layout.tp > 1:
        link, alpha = _link(hw, layout.tp, a)
        reduces = 2 if layout.ep == 1 else 1  # with EP the MLP's sum travels in the all-to-all instead
        seconds = layers * reduces * collectives.ring_all_reduce_s(hidden_bytes, layout.tp, link, alpha)
        costs.append(Cost(f"TP all-reduce x{reduces}", seconds, "network", activation_bytes=layers * reduces
                          * 2 * (layout.tp - 1) / layout.tp * hidden_bytes))
    if layout.ep > 1:
        link, alpha = _link(hw, layout.ep, a)
        sent = t / layout.tp * model.experts_per_token * h * ab  # each TP rank dispatches its share of tokens
        seconds = layers * 2 * collectives.all_to_all_s(sent, layout.ep, link, alpha)  # dispatch and combine
        if layout.tp > 1:  # put each replica's tokens back together on all its TP ranks
            tp_link, tp_alpha = _link(hw, layout.tp, a)
            seconds += layers * collectives.all_to_all_s(hidden_bytes, layout.tp, tp_link, tp_alpha)
        costs.append(Cost("EP all-to-all x2", seconds, "network", activation_bytes=layers * 2 * sent))
    return costs


# ---- memory -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Memory:
    """One GPU's memory under a layout: its weights, what is left for the KV cache, the bytes a token takes."""

    weight_bytes: float
    kv_capacity_bytes: float  # negative: the weights alone do not fit
    kv_bytes_per_token: float

    @property
    def fits(self) -> bool:
        return self.kv_capacity_bytes > 0

    def max_batch(self, context: int) -> int:
        """The most sequences of ``context`` tokens whose keys and values fit (0 if the weights do not)."""
        if context < 1:
            raise ValueError(f"context must be >= 1 token, got {context}")
        return max(0, int(self.kv_capacity_bytes // (context * self.kv_bytes_per_token)))


def memory(model: ModelShape, hw: Hardware, layout: Layout, assumptions: Assumptions = PLAIN) -> Memory:
    """Weights and KV room on one GPU of the largest stage of ``layout``."""
    layout.check(model, hw)
    per, wb, ab = _PerGpu.of(model, layout), dtype_bytes(assumptions.weights), dtype_bytes(ACTIVATION)
    h, d, tp = model.hidden_size, model.head_dim, layout.tp
    attention = (h * (per.heads + 2 * per.kv_heads) * d + per.heads * d * h) * wb
    if layout.ep > 1:
        experts = model.num_experts / layout.ep * model.expert_parameters * wb
    else:
        experts = model.num_experts * model.expert_parameters / tp * wb
    layer = attention + experts + (model.router_parameters + model.norm_parameters) * ab
    table = model.embedding_parameters / tp * ab  # embedding, and lm_head when untied: bf16, split over TP
    tables = table if (layout.pp > 1 or model.tie_word_embeddings) else 2 * table
    weights = per.layers * layer + tables + h * ab
    kv_per_token = per.layers * model.kv_bytes_per_layer(assumptions.kv_cache, per.kv_heads)
    free = hw.require("hbm_bytes") * assumptions.memory_utilization - weights
    return Memory(weights, free, kv_per_token)


def min_gpus(model: ModelShape, hw: Hardware, assumptions: Assumptions = PLAIN) -> int:
    """The fewest GPUs whose usable memory holds the weights alone (no room yet for the KV cache): all the
    weights, as one GPU would hold them (``memory`` on one GPU), over the usable memory of one."""
    usable = hw.require("hbm_bytes") * assumptions.memory_utilization
    return math.ceil(memory(model, hw, Layout(), assumptions).weight_bytes / usable)


# ---- serving ------------------------------------------------------------------------------------------------

def prefill_batches(requests: int, prompt: int, token_budget: int | None = None) -> list[Batch]:
    """The prefill steps of ``requests`` prompts of ``prompt`` tokens, at most ``token_budget`` tokens a step
    (None: all at once). Whole prompts share a step; a prompt longer than the budget is cut into chunks."""
    if min(requests, prompt) < 1 or (token_budget is not None and token_budget < 1):
        raise ValueError(f"requests, prompt and token_budget must be >= 1, got {requests}, {prompt}, {token_budget}")
    if token_budget is None or token_budget >= prompt:
        per_step = requests if token_budget is None else token_budget // prompt
        full, rest = divmod(requests, per_step)
        return [Batch(per_step, prompt, prompt)] * full + ([Batch(rest, prompt, prompt)] if rest else [])
    chunks = [Batch(1, min(token_budget, prompt - start), min(prompt, start + token_budget))
              for start in range(0, prompt, token_budget)]
    return chunks * requests


def pipelined_s(model: ModelShape, hw: Hardware, layout: Layout, batch: Batch, assumptions: Assumptions) -> float:
    """One step of ``batch`` through every pipeline stage.

    With at least ``pp`` sequences, the batch is cut into ``pp`` micro-batches that keep every stage busy:
    each stage works on one micro-batch after another, so a round takes ``pp`` times the slowest stage.
    With fewer sequences than stages the pipeline cannot fill: micro-batches of one sequence each, and the
    step lasts one sequence's trip through the stages in turn, the *sum* of the stages: every layer once,
    ``lm_head`` and the embedding once, and the ``pp - 1`` sends between stages.
    """
    if batch.sequences >= layout.pp:
        stage = Batch(math.ceil(batch.sequences / layout.pp), batch.new_tokens, batch.context)
        return layout.pp * step_cost(model, hw, layout, stage, assumptions).seconds
    one = Batch(1, batch.new_tokens, batch.context)
    send = next(c for c in step_cost(model, hw, layout, one, assumptions).costs if c.name == "pipeline send")
    return step_cost(model, hw, replace(layout, pp=1), one, assumptions).seconds + (layout.pp - 1) * send.seconds


@dataclass(frozen=True)
class Prediction:
    """What serving ``batch`` requests per DP replica of ``prompt`` + ``output`` tokens looks like.

    The requests arrive together and are served as one batch (``predict``): ``ttft_s`` is the prefill of the
    whole batch, when its last request gets its first token (a prompt alone on an idle server would see less),
    and ``tpot_s`` one decode step of the whole batch; the throughput is that same schedule's.
    """

    model: str
    hardware: str
    layout: Layout
    batch: int  # sequences per DP replica
    prompt: int
    output: int
    ttft_s: float  # the whole batch's prefill
    tpot_s: float
    serve_s: float  # prefill and decode of the whole batch
    tokens_per_s_per_gpu: float
    tokens_per_s_per_user: float
    bubble: float  # share of pipeline stage-time idle in decode
    cost_per_million_tokens: float | None  # at the given price per GPU-hour, output tokens

    def as_dict(self) -> dict[str, object]:
        return {"layout": self.layout.label, "tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp,
                "ep": self.layout.ep, "gpus": self.layout.gpus, "batch_per_replica": self.batch,
                "ttft_ms": self.ttft_s * 1e3, "ttft_is": "the whole batch's prefill", "tpot_ms": self.tpot_s * 1e3,
                "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu, "tokens_per_s_per_user": self.tokens_per_s_per_user,
                "pipeline_bubble": self.bubble, "cost_per_million_tokens": self.cost_per_million_tokens}


def serve_s(model: ModelShape, hw: Hardware, layout: Layout, requests: int, prompt: int, output: int,
            assumptions: Assumptions = PLAIN, token_budget: int | None = None) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for one replica to serve ``requests`` requests at once.

    The prefill makes each request's first token; ``output - 1`` decode steps of the whole batch follow, the
    context growing from ``prompt + 1`` to ``prompt + output - 1``. A decode step's bytes and flops grow
    linearly with the context, so those steps cost as many steps at the mean context (exact while each
    operation stays on the same side of its roofline).
    """
    if output < 1:
        raise ValueError(f"output must be >= 1 token, got {output}")
    prefill = sum(pipelined_s(model, hw, layout, step, assumptions)
                  for step in prefill_batches(requests, prompt, token_budget))
    if output == 1:
        return prefill, 0.0
    step = pipelined_s(model, hw, layout, Batch(requests, 1, mean_decode_context(prompt, output)), assumptions)
    return prefill, (output - 1) * step


def mean_decode_context(prompt: int, output: int) -> int:
    """The mean context of the decode steps of a request: prompt + 1 up to prompt + output - 1, rounded up."""
    return prompt + math.ceil(output / 2)


def predict(model: ModelShape, hw: Hardware, layout: Layout, batch: int, prompt: int, output: int,
            assumptions: Assumptions = PLAIN, price_per_gpu_hour: float | None = None,
            token_budget: int | None = None) -> Prediction:
    """TTFT, TPOT, tokens/s per GPU and per user, and cost, for ``batch`` requests per replica of ``layout``,
    all arriving together (``Prediction`` says what each figure covers)."""
    if price_per_gpu_hour is not None and price_per_gpu_hour <= 0:
        raise ValueError(f"price per GPU-hour must be > 0, got {price_per_gpu_hour}")
    tpot = pipelined_s(model, hw, layout, Batch(batch, 1, mean_decode_context(prompt, output)), assumptions)
    prefill, decode = serve_s(model, hw, layout, batch, prompt, output, assumptions, token_budget)
    per_gpu = batch * output / (prefill + decode) / (layout.tp * layout.pp)
    cost = None if price_per_gpu_hour is None else price_per_gpu_hour / 3600 / per_gpu * 1e6
    return Prediction(model.name, hw.key if hw.origin == "datasheet" else f"{hw.key} (measured)", layout, batch,
                      prompt, output, prefill, tpot, prefill + decode, per_gpu, 1 / tpot,
                      1 - min(layout.pp, batch) / layout.pp, cost)

