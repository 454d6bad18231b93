"""Scaling out: how fast a model can be served on many GPUs, predicted from bytes, flops and links.

* ``hardware``: accelerators as data, each figure with its public source (or the course's own measurement);
* ``shapes``: model shapes (parameters, KV-cache bytes per token), from a ``config.json`` or by name;
* ``collectives``: the alpha-beta model of all-reduce, all-to-all and send;
* ``cost``: the roofline of each operation of a step, memory, and what serving looks like (TTFT, TPOT, tokens/s);
* ``plan``: the layouts (TP x PP x DP x EP) of a GPU budget that fit, and their Pareto front;
* ``calibration``: the model against the engine's measured H100 decode step and serving throughput.

``python -m course_lib.scaling --help`` runs the catalogue listing, the planner and the calibration.
"""
