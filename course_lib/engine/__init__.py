"""The inference engine, built up one piece per module, the way vLLM's is.

* ``block_pool``: which KV-cache block holds which tokens: reference counts, prefix caching by chained
  block hashes, copy-on-write, and the watermark a scheduler admits new sequences against.
* ``kv_waste``: how much KV memory contiguous slabs and paging leave empty on a request mix.
* ``config``, ``rope``, ``weights``: a Llama model's shape, its RoPE frequencies (default or llama3) and its
  weights (random, or a safetensors checkpoint, sharded or not); ``gguf_checkpoint``: llama.cpp's GGUF files.
* ``tokenizer``: text to token ids and back, the chat template, streaming detokenization.
* ``model``: the Llama forward pass over a flat batch of tokens from many sequences, on a paged KV cache;
  ``reference``: the same model, dense and in float64, for the tests.
* ``sampling``, ``logprobs``, ``sequence``, ``scheduler``: what to sample, log-probabilities as vLLM returns them,
  a request's state, and continuous batching.
* ``runner``: runs the model on a step, eagerly or by replaying a CUDA graph (``graphs``) for decode-only steps.
* ``llm``: ``LLM(...).generate(prompts, params)`` and a token stream, wiring it all together: the engine loop.
* ``stats``: what the engine did, counted as it works.
* ``pool_view``: pictures of the block pool for the lab.
"""
