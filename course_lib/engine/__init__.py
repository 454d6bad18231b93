"""The inference engine's runtime, built up one piece per module, the way vLLM's is.

* ``block_pool``: the KV-cache blocks, free, shared or cached: reference counts, prefix caching by chained
  block hashes, copy-on-write, and the watermark a scheduler admits new sequences against. It knows blocks,
  not sequences: each sequence keeps its own block table.
* ``sampling``, ``logprobs``, ``sequence``, ``scheduler``: what to sample, log-probabilities as vLLM returns them,
  a request's state, and continuous batching.
* ``batch``: one step's batch as the model runs it: token ids, positions, KV slots and block tables, checked once.
* ``model``: the Llama forward pass over a flat batch of tokens from many sequences, on a paged KV cache;
  ``linear``: its projections, ``x @ weight.T``, as one cuBLAS call (NumPy on the CPU).
* ``runner``: runs the model on a step, eagerly or by replaying a CUDA graph (``graphs``) for decode-only steps.
* ``tensor_parallel``: one model split over ranks (Megatron-style), rank 0 sending each step to the others.
* ``llm``: ``LLM(...).generate(prompts, params)`` and a token stream, wiring it all together: the engine loop.
* ``stats``: what the engine did, counted as it works.

What a checkpoint says about the model (its shape, RoPE, weights, tokenizer) is in ``course_lib.checkpoint``;
what the chapters draw and measure on the engine is in ``course_lib.labs``.
"""
