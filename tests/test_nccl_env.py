"""NCCL's environment explained: the catalogue and its sources, ``explain()``, and the NCCL_DEBUG=INFO parser.

The parser is checked on excerpts of real logs (``tests/fixtures/nccl_debug_*.txt``, each naming its source).
"""

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from course_lib.distributed import nccl_env
from course_lib.distributed.nccl_env import (
    CATALOGUE,
    ENV_DOCS,
    VARIABLES,
    AlgorithmChoice,
    CollectiveCall,
    TreePosition,
    explain,
    parse_debug_log,
    render,
    render_summary,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LOGS = sorted(FIXTURES.glob("nccl_debug_*.txt"))


def log(name: str) -> str:
    return (FIXTURES / f"nccl_debug_{name}.txt").read_text()


# --- the catalogue ---------------------------------------------------------------------------------------------

def test_the_variables_a_user_meets_are_all_in_the_catalogue():
    met = {"NCCL_DEBUG", "NCCL_DEBUG_SUBSYS", "NCCL_ALGO", "NCCL_PROTO", "NCCL_P2P_LEVEL", "NCCL_P2P_DISABLE",
           "NCCL_SHM_DISABLE", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_IB_DISABLE", "NCCL_NET_GDR_LEVEL",
           "NCCL_NVLS_ENABLE", "NCCL_MIN_NCHANNELS", "NCCL_MAX_NCHANNELS", "NCCL_BUFFSIZE", "NCCL_LAUNCH_MODE",
           "NCCL_CUMEM_ENABLE", "NCCL_TOPO_DUMP_FILE"}
    assert met <= VARIABLES.keys()
    assert len(VARIABLES) == len(CATALOGUE), "a name appears twice in the catalogue"


@pytest.mark.parametrize("variable", CATALOGUE, ids=lambda variable: variable.name)
def test_every_entry_is_complete_and_cites_its_section_of_nccls_documentation(variable):
    assert variable.name.startswith("NCCL_")
    assert all([variable.controls, variable.default, variable.typical, variable.when])
    assert variable.source.startswith(f"{ENV_DOCS}#nccl-")
    assert (variable.kind in ("choice", "list", "level")) == bool(variable.values)


def test_the_documented_defaults_are_the_ones_nccl_states():
    assert VARIABLES["NCCL_BUFFSIZE"].default.startswith("4194304")
    assert VARIABLES["NCCL_DEBUG_SUBSYS"].default == "INIT,BOOTSTRAP,ENV"
    assert VARIABLES["NCCL_LAUNCH_MODE"].default == "PARALLEL"
    assert VARIABLES["NCCL_NVLS_ENABLE"].default.startswith("2")


def test_the_nvls_entry_says_the_course_keeps_it_off():
    assert "keeps NCCL_NVLS_ENABLE=0 in every process it starts" in VARIABLES["NCCL_NVLS_ENABLE"].when


# --- explain() -------------------------------------------------------------------------------------------------

def test_explain_reads_only_nccl_variables_and_knows_their_values():
    explanation = explain({"NCCL_DEBUG": "info", "NCCL_ALGO": "allreduce:^tree;ring", "NCCL_PROTO": "^LL128",
                           "NCCL_DEBUG_SUBSYS": "INIT,ENV,TUNING", "NCCL_BUFFSIZE": "8388608",
                           "NCCL_P2P_LEVEL": "NVL", "NCCL_SOCKET_IFNAME": "=eth0", "PATH": "/usr/bin"})
    settings = {setting.name: setting for setting in explanation.settings}
    assert list(settings) == sorted(settings) and "PATH" not in settings
    assert all(settings[name].value_known for name in settings if name != "NCCL_SOCKET_IFNAME")
    assert settings["NCCL_SOCKET_IFNAME"].value_known is None  # free-form: an interface name is not checked
    assert not any(setting.suspect for setting in explanation.settings)


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("NCCL_PROTO", "LL129", "'LL129'"),
    ("NCCL_ALGO", "ring,nvls,hypercube", "'hypercube'"),
    ("NCCL_DEBUG", "VERBOSE", "VERSION | WARN"),
    ("NCCL_BUFFSIZE", "4MB", "positive integer"),
    ("NCCL_NVLS_ENABLE", "off", "0 | 1 | 2"),
    ("NCCL_P2P_LEVEL", "NVLINK", "LOC | NVL"),
])
def test_explain_flags_a_value_nccl_does_not_document(name, value, expected):
    (setting,) = explain({name: value}).settings
    assert setting.value_known is False and setting.suspect
    assert expected in setting.note


def test_legacy_integer_levels_are_accepted_with_a_caution():
    (setting,) = explain({"NCCL_P2P_LEVEL": "5"}).settings
    assert setting.value_known is True and "legacy integer" in setting.note


def test_explain_flags_a_name_nccl_may_not_read_and_suggests_the_likely_one():
    typo, unknown = explain({"NCCL_DEBUG_SUBSYTEM": "INIT", "NCCL_ZZZ": "1"}).settings
    assert typo.variable is None and typo.suspect
    assert "check the spelling (did you mean NCCL_DEBUG_SUBSYS?)" in typo.note
    assert "did you mean" not in unknown.note and ENV_DOCS in unknown.note


@pytest.mark.parametrize(("environ", "off"), [
    ({"NCCL_NVLS_ENABLE": "0"}, True),
    ({"NCCL_NVLS_ENABLE": " 00 "}, True),  # NCCL reads it as an integer
    ({"NCCL_NVLS_ENABLE": "2"}, False),
    ({"NCCL_NVLS_ENABLE": "1"}, False),
    ({}, False),
])
def test_explain_says_whether_the_courses_nvls_setting_is_in_force(environ, off):
    explanation = explain(environ)
    assert explanation.nvls_off is off
    first_line = render(explanation).splitlines()[0]
    assert first_line.startswith("NVLink SHARP off" if off else "NVLink SHARP not switched off")


def test_render_explains_each_variable_and_never_shows_a_secret():
    text = render(explain({"NCCL_DEBUG": "WARN", "NCCL_PSK": "a-key-that-must-never-be-printed-0123456789",
                           "NCCL_NVLS_ENABLE": "0"}))
    assert "NCCL_DEBUG=WARN: how much NCCL prints" in text
    assert "NCCL_PSK=<hidden>" in text and "must-never-be-printed" not in text
    assert "No NCCL_* variable is set" in render(explain({}))


# --- the NCCL_DEBUG=INFO parser ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", LOGS, ids=lambda path: path.stem)
def test_every_fixture_names_where_it_was_quoted_from(path):
    header = list(itertools.takewhile(lambda line: line.startswith("# "), path.read_text().splitlines()))
    assert any("https://" in line for line in header), f"{path.name} must say where its lines come from"


def test_rings_trees_and_single_process_transports():
    summary = parse_debug_log(log("one_node_rings"))
    assert summary.rings == {0: (0, 1, 2, 3, 4, 5, 6, 7), 1: (0, 1, 2, 3, 4, 5, 6, 7)}
    assert summary.channels == 2
    assert TreePosition(channel=0, rank=0, parent=-1, children=(1,)) in summary.trees
    assert TreePosition(channel=1, rank=4, parent=3, children=(5,)) in summary.trees
    assert set(summary.transports) == {"P2P/direct pointer", "P2P/direct pointer/read", "SHM/direct/direct"}
    (shm,) = [connection for connection in summary.connections if connection.transport == "SHM"]
    assert (shm.channel, shm.source_rank, shm.target_rank, shm.direction) == (0, 3, 4, None)


def test_version_and_cumem_transport():
    summary = parse_debug_log(log("one_node_cumem"))
    assert (summary.nccl_version, summary.cuda_version) == ("2.21.5", "12.4")
    assert summary.transports == {"P2P/CUMEM": 10}
    assert {(tree.channel, tree.parent, tree.children) for tree in summary.trees if tree.rank == 1} == {
        (channel, 0, (2,)) for channel in range(4)}


def test_ranks_devices_channels_and_network_transports_across_two_nodes():
    summary = parse_debug_log(log("two_nodes_ib"))
    assert [(rank.rank, rank.cuda_device, rank.nvml_device, rank.bus_id) for rank in summary.ranks] == [
        (0, 0, 0, "18000"), (1, 1, 1, "38000"), (2, 0, 0, "18000"), (3, 1, 1, "38000")]
    assert all(rank.initialised and rank.nranks == 4 for rank in summary.ranks)
    assert summary.communicators == ["0xf021d9037f9243d8"]
    counts = summary.channel_counts
    assert (counts.collective, counts.collnet, counts.nvls, counts.p2p, counts.p2p_per_peer) == (8, 0, 0, 8, 2)
    network = [connection for connection in summary.connections if connection.transport == "NET"]
    assert {(c.source_rank, c.target_rank, c.direction, c.via) for c in network} == {
        (0, 2, "receive", "NET/IB/3/GDRDMA"), (1, 3, "receive", "NET/IB/2/GDRDMA"), (3, 1, "send", "NET/IB/2/GDRDMA")}
    assert TreePosition(channel=0, rank=0, parent=-1, children=(1, 2)) in summary.trees
    assert TreePosition(channel=5, rank=1, parent=3, children=(0,)) in summary.trees
    assert summary.rings == {}  # rank 0's "Channel NN/MM : ..." lines are not in this excerpt


def test_nvls_channels_and_shared_memory():
    summary = parse_debug_log(log("nvls"))
    assert summary.channel_counts.nvls == 16 and summary.channels == 16
    assert set(summary.transports) == {"SHM/direct/direct"}


def test_init_start_only_legacy_ipc_sockets_and_no_nvls():
    summary = parse_debug_log(log("ipc_socket"))
    assert [rank.rank for rank in summary.ranks] == [8, 9, 10, 11]
    assert not any(rank.initialised for rank in summary.ranks)
    assert summary.nvls_support == {4: False, 7: False, 0: False}
    assert set(summary.transports) == {"P2P/IPC/read", "NET/Socket/3"}
    assert {c.direction for c in summary.connections if c.via == "NET/Socket/3"} == {"send"}


def test_algorithms_calls_environment_and_warnings():
    summary = parse_debug_log(log("tuning"))
    assert (summary.nccl_version, summary.cuda_version) == ("2.30.3", "13.0")
    assert summary.algorithm_choices == [AlgorithmChoice("AllReduce", 33554432, "RING", "SIMPLE", (0, 31), None)] * 3
    assert summary.calls == [CollectiveCall("AllReduce", 0, 2, "float32", 2)] * 2
    assert summary.environment == {"NCCL_SHM_DISABLE": "1"}
    assert summary.warnings == ["Failed to initialize any NET plugin"]
    (rank,) = summary.ranks
    assert (rank.rank, rank.nranks, rank.bus_id, rank.initialised) == (0, 2, "XXXX", False)
    assert summary.rings == {} and summary.trees == []  # GRAPH's "Ring 00 : 1 -> 0 -> 1" is not summarised


def test_older_numbered_tuning_lines_are_named():
    summary = parse_debug_log(log("tuning_numbered"))
    large, small, _ = summary.algorithm_choices
    assert (large.bytes, large.algorithm, large.protocol, large.model_time_us) == (8589934592, "RING", "SIMPLE",
                                                                                    86069.96875)
    assert (small.algorithm, small.protocol, small.operation, small.channels) == ("TREE", "LL128", None, None)
    assert summary.channel_counts.collnet == 16 and summary.ranks[0].initialised


def test_lines_the_parser_does_not_know_are_skipped():
    garbage = "\n".join([
        "Traceback (most recent call last):",
        "Channel 00/02 :    0   1",  # not printed by NCCL: no "NCCL INFO"
        "host:1:1 [0] NCCL INFO Channel 00/0 : garbage -> here via",
        "host:1:1 [0] NCCL INFO Trees [x] 1/2->3",
        "host:1:1 [0] NCCL INFO comm 0x1 rank two nranks 4 - Init COMPLETE",
        "host:1:1 [0] NCCL INFO AllReduce: 12 Bytes -> Algo",
        "\x00\x1b[31m binary noise \udcff",
        "",
    ])
    summary = parse_debug_log(garbage)
    assert (summary.nccl_lines, summary.recognised_lines) == (4, 0)
    assert not (summary.ranks or summary.rings or summary.trees or summary.connections or summary.algorithm_choices)
    assert summary.nccl_version is None and summary.channels is None

    interleaved = "\n".join(f"{line}\n{garbage}" for line in log("two_nodes_ib").splitlines())
    clean, noisy = parse_debug_log(log("two_nodes_ib")), parse_debug_log(interleaved)
    assert (noisy.ranks, noisy.trees, noisy.connections, noisy.channel_counts) == (
        clean.ranks, clean.trees, clean.connections, clean.channel_counts)


def test_the_parser_wants_text():
    with pytest.raises(TypeError, match="read a file first"):
        parse_debug_log(b"host:1:1 [0] NCCL INFO NCCL version 2.21.5+cuda12.4")


def test_the_summary_names_what_nccl_chose_and_what_it_means():
    text = render_summary(parse_debug_log(log("two_nodes_ib")))
    assert "rank 0 of 4: cudaDev 0, nvmlDev 0, busId 18000; initialised" in text
    assert "Channels: 8 for collectives" in text
    assert "3 -> 1 [send] via NET/IB/2/GDRDMA (channels 1, 3)" in text
    assert "GPUDirect RDMA: the network card reads and writes GPU memory itself" in text
    assert "rank 0: root, children 1 2 (channels 0, 2)" in text
    rings = render_summary(parse_debug_log(log("one_node_rings")))
    assert "channels 0-1: 0 1 2 3 4 5 6 7" in rings
    assert "No NCCL lines found" in render_summary(parse_debug_log("nothing from NCCL here"))


def test_transports_are_described_in_words():
    assert nccl_env.describe_transport("P2P/CUMEM/read").startswith("P2P between processes")
    assert "P2P read mode" in nccl_env.describe_transport("P2P/CUMEM/read")
    assert nccl_env.describe_transport("SHM/direct/direct").startswith("through host shared memory")
    assert "not known to the course" in nccl_env.describe_transport("XYZ/1")


# --- the module itself -----------------------------------------------------------------------------------------

def test_the_module_needs_no_gpu_and_nothing_else_of_the_course():
    tree = ast.parse(Path(nccl_env.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in imported if name.split(".")[0] in ("course_lib", "cupy", "numba", "numpy")}


def run_module(*args):
    return subprocess.run([sys.executable, "-m", "course_lib.distributed.nccl_env", *args],
                          capture_output=True, text=True, timeout=60)


def test_command_line():
    assert "--log FILE" in run_module("--help").stdout
    out = run_module("--log", str(FIXTURES / "nccl_debug_tuning.txt"))
    assert out.returncode == 0 and "AllReduce of 33554432 bytes: RING with SIMPLE, channels 0-31 (x3)" in out.stdout
    assert "NCCL_ALGO: which algorithms" in run_module("--catalogue").stdout
    missing = run_module("--log", str(FIXTURES / "no_such_log.txt"))
    assert missing.returncode == 2 and "cannot read the log" in missing.stderr and not missing.stdout
