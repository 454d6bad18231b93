"""The inference engine, built up one piece per module, the way vLLM's is.

* ``block_pool``: which KV-cache block holds which tokens: reference counts, prefix caching by chained
  block hashes, copy-on-write, and the watermark a scheduler admits new sequences against.
* ``kv_waste``: how much KV memory contiguous slabs and paging leave empty on a request mix.
* ``config``, ``weights``: a Llama model's shape and its weights (random, or a safetensors checkpoint).
* ``model``: the Llama forward pass over a flat batch of tokens from many sequences, on a paged KV cache;
  ``reference``: the same model, dense and in float64, for the tests.
* ``sampling``, ``sequence``, ``scheduler``: what to sample, a request's state, and continuous batching.
* ``llm``: ``LLM(...).generate(prompts, params)`` and a token stream, wiring it all together.
* ``pool_view``: pictures of the block pool for the lab.
"""
