"""What the chapters and labs draw and measure, built on the engine but not part of it.

The runtime lives in ``course_lib.engine``; this package holds what a reader uses to look at it:

* ``kv_waste``: how much KV memory contiguous slabs and paging leave empty on a request mix (chapter 04);
* ``pool_view``: pictures of the block pool (lab 10);
* ``graph_nodes``: a CUDA graph built node by node, and a node re-pointed in place (chapter 06);
* ``graph_capture``: a pure-Python model of stream capture: what it records, refuses and assumes (chapter 06);
* ``decode_step_model``: the engine's decode step, captured per batch size and padded, on that model (chapter 06);
* ``step_time``: where the recorded eager decode step's time goes (chapter 06);
* ``tensor_core_fragments``: which lane holds which element of an ``mma`` fragment, ``ldmatrix``, swizzles and
  shared-memory banks (chapter 02);
* ``number_formats``, ``format_accuracy``: the floating-point formats and how accurate each is in a GEMM (chapter 02);
* ``gemm_sources``, ``gemm_steps``, ``gemm_records``, ``gemm_figures``: the GEMM steps' sources, arithmetic,
  recorded speeds and figures (chapters 02, 03, 03b);
* ``copy_pipeline``: the schedule of a multi-stage copy pipeline (chapter 03);
* ``latency``: time to first token, time per output token and throughput of one batch (lab 20);
* ``prefill_intensity``, ``online_softmax``: attention's FLOP per byte for decode and prefill, and the running state
  of an online softmax (chapter 04b).
"""
