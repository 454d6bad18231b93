"""The inference engine, built up one piece per module, the way vLLM's is.

``block_pool`` decides which KV-cache block holds which tokens: reference counts, prefix caching by
chained block hashes, copy-on-write and the watermark a scheduler admits new sequences against.
"""
