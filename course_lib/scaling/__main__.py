"""``python -m course_lib.scaling``: the hardware catalogue, the parallelism planner, the calibration report.

    python -m course_lib.scaling list [--json]
    python -m course_lib.scaling plan --model llama-3.1-70b --gpu h100-sxm --gpus 16 --tpot-ms 50 [--json] [--plot F]
    python -m course_lib.scaling calibrate [--json]

Every number printed is either a public figure with its source (``list``), a prediction of the cost model
(``plan``), or a prediction set beside a measurement of this course (``calibrate``); none is made up here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from course_lib.bench.results import save_result
from course_lib.scaling import collectives, hardware, shapes
from course_lib.scaling.calibration import calibration_report, calibration_result
from course_lib.scaling.cost import Assumptions
from course_lib.scaling.plan import Workload, plan, plot


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.scaling",
                                     description="Predict how a model serves on many GPUs: roofline per operation, "
                                     "alpha-beta per collective, memory per GPU.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listing = commands.add_parser("list", help="the GPU catalogue with the source of every figure, and the models",
                                  description="Print every GPU entry (datasheet and measured), each figure with its "
                                  "public source or the reason it is missing, then the named models.")
    listing.add_argument("--json", action="store_true", help="print JSON instead of text")

    planner = commands.add_parser("plan", help="the layouts of N GPUs that meet a TPOT target, and their Pareto front",
                                  description="Enumerate TP x PP x DP (x EP) layouts and batches that fit in memory "
                                  "and meet the time-per-output-token target; print the Pareto front of throughput "
                                  "per GPU against speed per user.")
    planner.add_argument("--model", required=True, help=f"a named model: {', '.join(shapes.MODELS)}")
    planner.add_argument("--gpu", required=True, help=f"a catalogue GPU: {', '.join(hardware.list_keys())}")
    planner.add_argument("--gpus", type=int, required=True, help="how many GPUs the layouts use")
    planner.add_argument("--tpot-ms", type=float, required=True, help="the target time per output token, ms")
    planner.add_argument("--prompt", type=int, default=1024, help="prompt tokens per request (default 1024)")
    planner.add_argument("--output", type=int, default=256, help="output tokens per request (default 256)")
    planner.add_argument("--price", type=float, help="price per GPU-hour, for the cost of a million output tokens")
    planner.add_argument("--tp", type=int, help="pin tensor parallelism to this size")
    planner.add_argument("--pp", type=int, help="pin pipeline parallelism to this size")
    planner.add_argument("--weights", default="bfloat16", choices=("bfloat16", "float8", "float4"),
                         help="weight element type (picks the tensor-core rate too)")
    planner.add_argument("--measured", action="store_true",
                         help="use the course's measured figures for this GPU where it has them (h100-sxm)")
    planner.add_argument("--json", action="store_true", help="print JSON instead of text")
    planner.add_argument("--plot", metavar="FILE", help="also draw the candidates and the front to FILE (PNG, SVG...)")

    calibrate = commands.add_parser("calibrate", help="the model against the engine's measured H100 decode and serving",
                                    description="Predict engine.json's batch-1 decode step and 64-request serving "
                                    "run from the measured H100 figures: plain roofline, + kernel floor, + host time "
                                    "per step; print the prediction errors, every input's source, the caveats, and "
                                    "the plain model against published runs of a production engine.")
    calibrate.add_argument("--json", action="store_true", help="print JSON instead of text")
    calibrate.add_argument("--write", action="store_true",
                           help="also write the errors as course_lib/results/<card>/scaling.json")

    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            return _list(args.json)
        if args.command == "plan":
            return _plan(args)
        return _calibrate(args.json, args.write)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")


def _list(as_json: bool) -> int:
    entries = hardware.all_entries()
    models = [shapes.shape(name) for name in shapes.MODELS]
    if as_json:
        print(json.dumps({"hardware": [entry.as_dict() for entry in entries],
                          "collective_alphas": collectives.alpha_sources(),
                          "models": [{"name": m.name, "parameters": m.parameters(),
                                      "active_parameters": m.active_parameters(),
                                      "kv_bytes_per_token_bf16": m.kv_bytes_per_token(), "source": m.source}
                                     for m in models]}, indent=2))
        return 0
    print("Tensor-core rates are dense (not 2:4 sparse); NVLink sums both directions, the NIC is per direction;\n"
          "memory capacity is in GiB (2**30 bytes), bandwidths in GB/s (1e9 bytes a second).\n")
    for entry in entries:
        print("\n".join(entry.describe()), end="\n\n")
    print("collective alphas (defaults of the cost model):")
    print("\n".join(f"  {line}" for line in collectives.alpha_lines()), end="\n\n")
    print("models:")
    for m in models:
        print(f"  {m.name:<16} {m.parameters() / 1e9:8.2f} B parameters ({m.active_parameters() / 1e9:.2f} B active), "
              f"{m.kv_bytes_per_token() / 1024:7.1f} KiB of bf16 KV a token  <{m.source}>")
    return 0


def _plan(args: argparse.Namespace) -> int:
    model = shapes.shape(args.model)
    gpu = hardware.hardware(args.gpu, measured=args.measured)
    result = plan(model, gpu, args.gpus, Workload(args.prompt, args.output, args.tpot_ms, args.price),
                  Assumptions(weights=args.weights), tp=args.tp, pp=args.pp)
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print("\n".join(result.table()))
        if args.plot:
            print(f"drew {args.plot}")
    return 0


def _calibrate(as_json: bool, write: bool = False) -> int:
    if write:
        print(f"wrote {save_result(calibration_result())}", file=sys.stderr)
    report = calibration_report()
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    decode, serving = report["decode_b1"], report["serving_b64"]
    print(f"LLAMA_1B_SHAPED on {report['card']} (engine.json of {report['engine_json_date']}), errors = predicted / "
          f"measured - 1 of the time")
    print(f"{'':<26}{'measured':>10}{'plain':>10}{'+kernels':>10}{'+host':>10}")
    print(f"{'decode b1 step, ms':<26}{decode['measured_s'] * 1e3:>10.3f}{decode['plain_s'] * 1e3:>10.3f}"
          f"{decode['kernel_floor_s'] * 1e3:>10.3f}{decode['calibrated_s'] * 1e3:>10.3f}")
    print(f"{'serving 64 requests, s':<26}{serving['measured_s']:>10.3f}{serving['plain_s']:>10.3f}"
          f"{serving['kernel_floor_s']:>10.3f}{serving['calibrated_s']:>10.3f}")
    for name in ("decode_b1", "serving_b64"):
        errors = [report[f"{name}_prediction_error{suffix}"] for suffix in ("_plain", "_kernel_floor", "")]
        print(f"{name + '_prediction_error':<34}" + "".join(f"{e:>+10.1%}" for e in errors))
    inputs = report["inputs"]
    print(f"kernel_s {inputs['kernel_s']['value'] * 1e6:.3f} us from {inputs['kernel_s']['source']['title']}")
    host = inputs["host_step_s"]
    print(f"host_step_s {host['value'] * 1e3:.3f} ms from {host['measurement']} ({host['decode_steps']} decode steps, "
          f"mean batch {host['mean_batch']}, predicted GPU {host['predicted_gpu_s']:.3f} s of {host['wall_s']:.3f} s)")
    print("\ncaveats:")
    print("\n".join(f"  - {caveat}" for caveat in report["caveats"]))
    print("\npublished offline runs (output tokens/s of all GPUs) against the plain model at datasheet figures:")
    print(f"  {'run':<50}{'batch':>7}{'published':>11}{'predicted':>11}{'error':>9}")
    for run in report["published"]:
        print(f"  {run['label']:<50}{run['batch']:>7}{run['published_tokens_per_s']:>11,.0f}"
              f"{run['predicted_tokens_per_s']:>11,.0f}{run['error']:>+9.1%}")
    print(f"  source: {report['published'][0]['source']['url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
