"""What a checkpoint says about a model: its shape, its RoPE, its weights and its tokenizer.

Everything here is read from files a model ships with, and nothing here runs the model:

* ``config``: the shape of a Llama (layers, heads, sizes), read from a Hugging Face ``config.json``;
* ``rope``: RoPE's frequencies (default or llama3) and the two ways configs spell them;
* ``weights``: weights under their Hugging Face names, random for tests or from safetensors (sharded or not);
* ``gguf``: llama.cpp's one-file format, dequantized and un-permuted into the same layout;
* ``tokenizer``: text to token ids and back, the chat template, streaming detokenization.

The engine (``course_lib.engine``) sizes and fills itself from these; this package never imports the engine.
"""
