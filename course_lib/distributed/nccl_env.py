"""NCCL's environment, read and explained: the ``NCCL_*`` variables a user meets, and what NCCL_DEBUG=INFO says.

NCCL decides almost everything by itself when a communicator starts. It reads the machine's topology (NVLink,
PCIe switches, CPU sockets, network cards), picks a *transport* for every pair of GPUs that talk (P2P: direct
loads and stores over NVLink or PCIe; SHM: staged through host memory; NET: the network), and builds rings and
trees over them in several *channels*, each channel one CUDA block moving its share of the data. Then, for
every collective, a cost model of those links picks an *algorithm* (ring, tree, NVLS, ...) and a *protocol*
(LL and LL128 for latency, Simple for bandwidth) by the message size. Environment variables override these
decisions. NCCL's own documentation sorts them in two groups: a few describe the system (which network
interface, which InfiniBand cards) and belong in job scripts; the rest are for debugging and experiments and
should not outlive them, because a value forced today stops NCCL from choosing better tomorrow.

This module has three parts:

* ``CATALOGUE``: the variables a user meets, each with what it controls, its default, typical values, when
  to touch it and the section of NCCL's documentation it was read from (``source``).
* ``explain(environ)``: the ``NCCL_*`` variables set in an environment, each with its meaning and whether its
  value is one NCCL documents. A name the catalogue does not know is flagged: NCCL reads only the names it
  knows, so a misspelt variable is silently ignored and NCCL runs with its default.
* ``parse_debug_log(text)``: what ``NCCL_DEBUG=INFO`` printed, as data: the NCCL version, the ranks and their
  GPUs, the rings and trees, the number of channels, the transport of every connection, NVLS, and (with
  ``NCCL_DEBUG_SUBSYS`` including ``TUNING`` or ``COLL``) the algorithm and protocol of each collective.

From the command line::

    python -m course_lib.distributed.nccl_env                  # the NCCL_* variables set in this shell
    python -m course_lib.distributed.nccl_env --catalogue      # every variable the course explains
    python -m course_lib.distributed.nccl_env --log nccl.log   # ... and a summary of an NCCL_DEBUG=INFO log

NCCL prints its log on standard output (``NCCL_DEBUG_FILE=nccl.%h.%p.log`` writes one file per process), so
``NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,ENV,TUNING mpiexec -n 2 python my_program.py > nccl.log 2>&1`` makes
a log to read. ``python -m course_lib.env`` shows the same explanation in its report.

The course keeps ``NCCL_NVLS_ENABLE=0`` in every process it starts: NVLink SHARP (NVLS, reductions done inside
the NVSwitches through NVLink multicast) stays off on machines shared with other jobs.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ENV_DOCS = "https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/env.html"
LOGGING_DOCS = "https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/troubleshooting/logging.html"
COURSE_NVLS_SETTING = ("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared machines


def _section(name: str) -> str:
    """The address of a variable's section in NCCL's documentation page on environment variables."""
    return f"{ENV_DOCS}#{name.lower().replace('_', '-')}"


# How a value is checked against what NCCL documents:
#   choice: one of ``values``;  list: a comma-separated list of them, ``^`` in front to exclude instead;
#   level: a path type (LOC, NVL, PIX, ...) or a legacy integer;  count: a positive integer;
#   text: free-form (interface or card names, a path), not checked.
ValueKind = Literal["choice", "list", "level", "count", "text"]


@dataclass(frozen=True)
class Variable:
    """One ``NCCL_*`` variable: what NCCL decides that it overrides, and when a user should."""

    name: str
    controls: str  # one line: what it controls
    default: str  # what NCCL does when it is unset
    typical: str  # the values people set, and what each does
    when: str  # when to touch it (and when not to)
    source: str  # where the above was read
    kind: ValueKind = "text"
    values: tuple[str, ...] = ()  # the values NCCL documents (compared without regard to case)
    secret: bool = False  # never print its value

    def judge(self, value: str) -> tuple[bool | None, str]:
        """Whether NCCL documents ``value`` for this variable (``None``: free-form, not checked), and why."""
        value = value.strip()
        if self.kind == "text":
            return None, "free-form value: not checked"
        if self.kind == "count":
            if value.isdigit() and int(value) >= 1:
                return True, "a positive integer, as NCCL expects"
            return False, f"NCCL expects a positive integer, not {value!r}"
        if self.kind == "level" and value.isdigit():
            return True, ("a legacy integer level: NCCL's documentation discourages them (their meaning changed "
                          f"between versions); prefer one of {', '.join(self.values)}")
        known = {choice.lower() for choice in self.values}
        items = _list_items(value) if self.kind == "list" else [value]
        unknown = [item for item in items if item.lower() not in known]
        if not items or unknown:
            shown = ", ".join(repr(item) for item in unknown) or "an empty list"
            return False, f"NCCL does not document {shown} here; it expects {' | '.join(self.values)}"
        return True, "a value NCCL documents"


def _list_items(value: str) -> list[str]:
    """The names in a list value: ``"^NVLS,PAT"`` -> NVLS, PAT; ``"ring;allreduce:tree"`` -> ring, tree.

    ``NCCL_ALGO`` and ``NCCL_PROTO`` take, since NCCL 2.24, ``;``-separated groups that may start with a
    collective's name and a colon (``allreduce:tree``); the names before the colon are not checked here.
    """
    items = []
    for group in value.split(";"):
        listed = group.rpartition(":")[2]
        items += [item.strip().lstrip("^") for item in listed.split(",") if item.strip().lstrip("^")]
    return items


PATH_TYPES = ("LOC", "NVL", "PIX", "PXB", "PHB", "SYS")  # from nearest (same GPU) to furthest (across sockets)

CATALOGUE: tuple[Variable, ...] = (
    Variable(
        "NCCL_DEBUG",
        controls="how much NCCL prints, on standard output unless NCCL_DEBUG_FILE is set",
        default="unset: NCCL prints nothing, not even its warnings (NCCL's src/debug.cc: the level defaults to none)",
        typical="WARN in job scripts, so a failing call says why; INFO to see the topology, channels and "
                "transports NCCL chose; VERSION for the version line only; TRACE for NCCL's developers",
        when="the first thing to set when a collective fails or hangs, or to check what NCCL chose",
        source=_section("NCCL_DEBUG"), kind="choice", values=("VERSION", "WARN", "ATTN", "INFO", "TRACE")),
    Variable(
        "NCCL_DEBUG_SUBSYS",
        controls="which parts of NCCL print at NCCL_DEBUG=INFO (or TRACE)",
        default="INIT,BOOTSTRAP,ENV",
        typical="INIT,ENV,TUNING to add the algorithm and protocol of each collective (rank 0 prints them); "
                "COLL for every call; GRAPH for the topology search; ^PROXY to drop a noisy part; ALL",
        when="with NCCL_DEBUG=INFO, to keep what you are investigating or to add TUNING and COLL, off by default",
        source=_section("NCCL_DEBUG_SUBSYS"), kind="list",
        values=("INIT", "COLL", "P2P", "SHM", "NET", "GRAPH", "TUNING", "ENV", "ALLOC", "ALLOC_HOST", "CALL",
                "PROXY", "NVLS", "BOOTSTRAP", "REG", "PROFILE", "RAS", "DESTROY", "ALL")),
    Variable(
        "NCCL_DEBUG_FILE",
        controls="the file NCCL's log goes to; %h becomes the host name and %p the process id",
        default="unset: standard output",
        typical="nccl.%h.%p.log (one file per process, so ranks do not interleave their lines)",
        when="jobs with many ranks; the name must differ between processes or lines are lost",
        source=_section("NCCL_DEBUG_FILE")),
    Variable(
        "NCCL_ALGO",
        controls="which algorithms NCCL's tuner may choose from (Ring, Tree, NVLS, ...), for all or some collectives",
        default="unset: NCCL chooses, call by call, among every algorithm the topology supports",
        typical="Ring (to measure the network's bandwidth on two nodes, where Tree can exceed it); ^NVLS,NVLSTree "
                "to exclude; allreduce:tree,ring (since 2.24, per collective)",
        when="benchmarks and experiments only: NCCL lists it under 'Debugging', not for production",
        source=_section("NCCL_ALGO"), kind="list",
        values=("Ring", "Tree", "Collnet", "CollnetChain", "CollnetDirect", "NVLS", "NVLSTree", "PAT")),
    Variable(
        "NCCL_PROTO",
        controls="which protocols NCCL may use: LL and LL128 (low latency, small messages), Simple (bandwidth)",
        default="unset: LL,LL128,Simple where LL128 is supported, LL,Simple elsewhere",
        typical="^LL128 to rule out one protocol; Simple to see the bandwidth protocol alone",
        when="only to rule out a protocol when a bug in NCCL is suspected: NCCL warns that enabling LL128 "
             "where it is not supported can corrupt data",
        source=_section("NCCL_PROTO"), kind="list", values=("LL", "LL128", "Simple")),
    Variable(
        "NCCL_P2P_LEVEL",
        controls="the furthest two GPUs may be apart and still use P2P (direct loads and stores)",
        default="unset: NCCL picks from the architecture; beyond it, pairs go through host memory or the network",
        typical="NVL (P2P over NVLink only), PIX (same PCIe switch), PXB (PCIe switches), PHB (same CPU), "
                "SYS (across CPU sockets), LOC (never)",
        when="when P2P across the CPU is slow or broken on a platform (some virtual machines), or to compare "
             "transports",
        source=_section("NCCL_P2P_LEVEL"), kind="level", values=PATH_TYPES),
    Variable(
        "NCCL_P2P_DISABLE",
        controls="turns the P2P transport (direct access between GPUs over NVLink or PCIe) off entirely",
        default="unset: P2P is used where the topology allows it",
        typical="1 (GPUs then talk through host shared memory or the network)",
        when="to test whether a hang or wrong result comes from P2P (a virtual machine, an IOMMU setting); it "
             "costs most of the bandwidth of an NVLink machine",
        source=_section("NCCL_P2P_DISABLE"), kind="choice", values=("0", "1")),
    Variable(
        "NCCL_SHM_DISABLE",
        controls="turns the SHM transport (through host shared memory, used where P2P cannot be) off",
        default="unset: SHM is used between GPUs that cannot use P2P",
        typical="1 (NCCL then uses the network between the CPU sockets)",
        when="experiments; a container whose /dev/shm is too small for NCCL needs a larger /dev/shm, not this",
        source=_section("NCCL_SHM_DISABLE"), kind="choice", values=("0", "1")),
    Variable(
        "NCCL_SOCKET_IFNAME",
        controls="which IP interfaces NCCL uses to bootstrap and for its socket transport",
        default="unset: any interface but lo and docker*, those whose name starts with ib preferred",
        typical="eth (a prefix), =eth0 (exactly eth0), ^docker,lo (all but these)",
        when="nodes with several interfaces, where NCCL may pick one the other nodes cannot reach: a common "
             "reason for a multi-node start that hangs",
        source=_section("NCCL_SOCKET_IFNAME")),
    Variable(
        "NCCL_IB_HCA",
        controls="which InfiniBand or RoCE cards (HCAs), and which ports, NCCL may use",
        default="unset: no filter, every card NCCL detects is a candidate",
        typical="=mlx5_0:1,mlx5_1:1 (exactly these cards and ports), ^=mlx5_4 (all but this one); without '=', "
                "mlx5_1 also matches mlx5_10 to mlx5_19",
        when="nodes whose cards are not all on the compute network, or rail-optimised clusters",
        source=_section("NCCL_IB_HCA")),
    Variable(
        "NCCL_IB_DISABLE",
        controls="turns the InfiniBand/RoCE transport off; NCCL falls back to IP sockets",
        default="unset: InfiniBand/RoCE is used where a card is found",
        typical="1",
        when="to find out whether a multi-node problem lives in the RDMA stack; sockets are far slower",
        source=_section("NCCL_IB_DISABLE"), kind="choice", values=("0", "1")),
    Variable(
        "NCCL_IB_GID_INDEX",
        controls="the Global ID index NCCL uses on RoCE (Ethernet) cards",
        default="-1: NCCL selects a GID itself (see NCCL_IB_ADDR_FAMILY and NCCL_IB_ROCE_VERSION_NUM)",
        typical="the index `show_gids` lists for RoCE v2 on the card's IPv4 address (3 on many RoCE setups)",
        when="RoCE networks whose automatic choice picks the wrong GID; not used on InfiniBand",
        source=_section("NCCL_IB_GID_INDEX")),
    Variable(
        "NCCL_IB_TIMEOUT",
        controls="how long an InfiniBand transfer waits for an acknowledgement: 4.096 us * 2^value",
        default="20 (about 4 s, 30 s with the 7 retries; since 2.23, 18 before)",
        typical="18 to 22; 0 or 32 and above wait for ever",
        when="very large networks where transfers fail with error 12 in ibv_poll_cq",
        source=_section("NCCL_IB_TIMEOUT")),
    Variable(
        "NCCL_NET_GDR_LEVEL",
        controls="the furthest a network card may be from a GPU and still use GPUDirect RDMA (the card reads "
                 "and writes GPU memory itself, with no copy through host memory)",
        default="unset: NCCL picks from the architecture",
        typical="LOC (never), PIX (same PCIe switch), PXB (PCIe switches), PHB (same CPU), SYS (always)",
        when="GPUDirect RDMA broken or slow on a platform (LOC turns it off), or allowed further where it works",
        source=f"{ENV_DOCS}#nccl-net-gdr-level-formerly-nccl-ib-gdr-level", kind="level", values=PATH_TYPES),
    Variable(
        "NCCL_NET",
        controls="which network NCCL uses: its own IB or Socket, or a plugin's",
        default="unset: NCCL chooses the best network module it finds",
        typical="IB, Socket, or a plugin's name (to be sure a plugin is used, with no silent fallback)",
        when="clusters whose network needs a plugin (AWS EFA, Google's GPUDirect-TCPX) or to force sockets in a test",
        source=_section("NCCL_NET")),
    Variable(
        "NCCL_NVLS_ENABLE",
        controls="NVLink SHARP (NVLS): reductions done inside third-generation NVSwitches (Hopper and later) "
                 "through NVLink multicast",
        default="2: used where the NVSwitches support it; NCCL fails at start-up if NVLS resources cannot be "
                "allocated (since 2.29; 2.27 and 2.28 tried to fall back silently)",
        typical="0 (off: no NVLS resources are allocated), 1 (on), 2 (the default)",
        when="the course keeps NCCL_NVLS_ENABLE=0 in every process it starts: NVLink multicast stays off on "
             "machines shared with other jobs. Elsewhere, 0 when a start-up fails in NVLS (NCCL's own warning "
             "suggests it) or to save the memory NVLS reserves",
        source=_section("NCCL_NVLS_ENABLE"), kind="choice", values=("0", "1", "2")),
    Variable(
        "NCCL_MIN_NCHANNELS",
        controls="the fewest channels NCCL uses; each channel is one CUDA block, hence one SM, moving data",
        default="unset: platform dependent (deprecated since 2.17 in favour of NCCL_MIN_CTAS)",
        typical="an integer up to 32 (64 since 2.25); equal to NCCL_MAX_NCHANNELS to pin the count",
        when="benchmarks, or many small aggregated collectives on a platform where NCCL picks one channel",
        source=_section("NCCL_MIN_NCHANNELS"), kind="count"),
    Variable(
        "NCCL_MAX_NCHANNELS",
        controls="the most channels (CUDA blocks, SMs) NCCL uses for communication",
        default="unset: NCCL's own choice (deprecated since 2.17 in favour of NCCL_MAX_CTAS)",
        typical="a small integer (2, 4, 8) to leave SMs to compute kernels that overlap with communication",
        when="communication overlapped with compute that needs the SMs back; benchmarks",
        source=_section("NCCL_MAX_NCHANNELS"), kind="count"),
    Variable(
        "NCCL_MIN_CTAS",
        controls="the fewest CTAs (CUDA blocks, one a channel) NCCL uses; replaces NCCL_MIN_NCHANNELS",
        default="unset: NCCL's own choice (since 2.17)",
        typical="an integer up to 64 (32 before 2.25); equal to NCCL_MAX_CTAS to pin the count",
        when="benchmarks; NCCL warns that more CTAs than needed can slow small messages down",
        source=_section("NCCL_MIN_CTAS"), kind="count"),
    Variable(
        "NCCL_MAX_CTAS",
        controls="the most CTAs (CUDA blocks) NCCL uses; replaces NCCL_MAX_NCHANNELS",
        default="unset: NCCL's own choice (since 2.17)",
        typical="an integer up to 64 (32 before 2.25)",
        when="to leave SMs to overlapping compute, or to raise NCCL's cap in a benchmark",
        source=_section("NCCL_MAX_CTAS"), kind="count"),
    Variable(
        "NCCL_BUFFSIZE",
        controls="the size of the buffer NCCL uses for each connection between a pair of GPUs, in bytes",
        default="4194304 (4 MiB)",
        typical="powers of two: 1048576 to save memory, 8388608 or more in bandwidth experiments",
        when="memory pressure with many peers and channels (buffers add up per connection), or experiments",
        source=_section("NCCL_BUFFSIZE"), kind="count"),
    Variable(
        "NCCL_LAUNCH_MODE",
        controls="how NCCL launches its kernels when one process drives several GPUs",
        default="PARALLEL",
        typical="GROUP (cooperative groups; deprecated since 2.9)",
        when="rarely: an old workaround for one process driving several GPUs",
        source=_section("NCCL_LAUNCH_MODE"), kind="choice", values=("PARALLEL", "GROUP")),
    Variable(
        "NCCL_CUMEM_ENABLE",
        controls="whether NCCL allocates its buffers with CUDA's cuMem* (virtual memory) API; P2P between "
                 "processes then shows as 'via P2P/CUMEM' in the log, 'via P2P/IPC' without it",
        default="since 2.19, on where the system supports it (off in 2.18)",
        typical="0 (legacy cudaMalloc and CUDA IPC handles), 1",
        when="0 as a workaround when cuMem allocations or handle exchange fail (old drivers, some containers)",
        source=_section("NCCL_CUMEM_ENABLE"), kind="choice", values=("0", "1")),
    Variable(
        "NCCL_TOPO_DUMP_FILE",
        controls="a file NCCL writes the topology it detected to, as XML, after detection",
        default="unset: nothing is written",
        typical="topo.xml",
        when="to see what NCCL believes the machine is: GPUs, NVLinks, PCIe switches, NICs and each link's speed",
        source=_section("NCCL_TOPO_DUMP_FILE")),
    Variable(
        "NCCL_TOPO_FILE",
        controls="an XML topology NCCL loads before detecting the rest (the format NCCL_TOPO_DUMP_FILE writes)",
        default="/var/run/nvidia-topologyd/virtualTopology.xml if it exists",
        typical="a path to one host's topology",
        when="virtual machines that hide the real PCIe and NVLink topology from NCCL",
        source=_section("NCCL_TOPO_FILE")),
    Variable(
        "NCCL_PSK",
        controls="a pre-shared key that makes NCCL encrypt its host TCP traffic with TLS",
        default="unset: no encryption",
        typical="a key of 32 characters or more, the same in every process",
        when="when NCCL's TCP traffic must be encrypted; the report never prints its value",
        source=_section("NCCL_PSK"), secret=True),
)

VARIABLES: dict[str, Variable] = {variable.name: variable for variable in CATALOGUE}


@dataclass(frozen=True)
class Setting:
    """One ``NCCL_*`` variable set in an environment, with what the catalogue says of it."""

    name: str
    value: str  # "<hidden>" for a variable whose value is a secret
    variable: Variable | None  # None: not in the catalogue
    value_known: bool | None  # True: a value NCCL documents; False: one it does not; None: not checked
    note: str

    @property
    def suspect(self) -> bool:
        """A name NCCL may not read, or a value it does not document: worth a second look."""
        return self.variable is None or self.value_known is False


@dataclass(frozen=True)
class Explanation:
    """The ``NCCL_*`` variables of one environment, and whether the course's NVLS setting is in force."""

    settings: tuple[Setting, ...]
    nvls_off: bool  # NCCL_NVLS_ENABLE=0, as the course requires


def explain(environ: Mapping[str, str] = os.environ) -> Explanation:
    """Explain the ``NCCL_*`` variables of ``environ`` (this process's environment by default).

    Only the environment: NCCL also reads ``/etc/nccl.conf`` and ``NCCL_CONF_FILE`` (``~/.nccl.conf`` before
    2.23), where an administrator may have set values this does not see.
    """
    settings = []
    for name in sorted(key for key in environ if key.startswith("NCCL_")):
        variable = VARIABLES.get(name)
        value = environ[name]
        if variable is None:
            settings.append(Setting(name, value, None, None, _unknown_name_note(name)))
            continue
        value_known, note = variable.judge(value)
        settings.append(Setting(name, "<hidden>" if variable.secret else value, variable, value_known, note))
    return Explanation(tuple(settings), course_nvls_in_force(environ))


def course_nvls_in_force(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``NCCL_NVLS_ENABLE`` is 0 in ``environ``, as the course keeps it (NCCL reads it as an integer)."""
    name, wanted = COURSE_NVLS_SETTING
    value = environ.get(name, "").strip()
    return value.isdigit() and int(value) == int(wanted)


def _unknown_name_note(name: str) -> str:
    close = difflib.get_close_matches(name, VARIABLES, n=1, cutoff=0.8)
    guess = f" (did you mean {close[0]}?)" if close else ""
    return (f"not in the course's catalogue; check the spelling{guess}: NCCL silently ignores names it does not "
            f"read. Its full list: {ENV_DOCS}")


def render(explanation: Explanation) -> str:
    """The explanation as text: the NVLS line first, then one line per variable set."""
    name, wanted = COURSE_NVLS_SETTING
    if explanation.nvls_off:
        lines = [f"NVLink SHARP off: {name}={wanted}, as the course keeps it"]
    else:
        value = next((setting.value for setting in explanation.settings if setting.name == name), None)
        here = f"{name} is unset, and NCCL's default, 2," if value is None else f"{name}={value}"
        lines = [f"NVLink SHARP not switched off here: {here} uses it where the NVSwitches support it. The course "
                 f"runs NCCL with {name}={wanted} (NVLink multicast stays off on shared machines): "
                 f"export {name}={wanted} before starting NCCL programs yourself."]
    if not explanation.settings:
        lines.append("No NCCL_* variable is set: NCCL decides everything itself.")
    for setting in explanation.settings:
        if setting.variable is None:
            lines.append(f"{setting.name}={setting.value}: {setting.note}")
            continue
        verdict = "" if setting.value_known is None else f" [{setting.note}]"
        lines.append(f"{setting.name}={setting.value}: {setting.variable.controls}{verdict}")
    return "\n".join(lines)


def render_catalogue(variables: Iterable[Variable] = CATALOGUE) -> str:
    """Every variable of the catalogue, with its default, typical values, when to use it and its source."""
    blocks = []
    for variable in variables:
        blocks.append("\n".join([
            f"{variable.name}: {variable.controls}",
            f"  default: {variable.default}",
            f"  typical: {variable.typical}",
            f"  when:    {variable.when}",
            f"  source:  {variable.source}",
        ]))
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------------------------------
# Reading an NCCL_DEBUG=INFO log. Each line starts "host:pid:tid [cudaDev] NCCL INFO " (or "NCCL WARN ", after a
# file name); launchers may put more in front ("[0] " from mpirun --tag-output, a timestamp). The parser looks
# for those words anywhere in a line, reads the message after them, and skips every message it does not know.
# ---------------------------------------------------------------------------------------------------------------

# NCCL's numbering of algorithms and protocols, which older versions print in their tuning lines.
ALGORITHM_NAMES = ("TREE", "RING", "COLLNET_DIRECT", "COLLNET_CHAIN", "NVLS", "NVLS_TREE", "PAT")
PROTOCOL_NAMES = ("LL", "LL128", "SIMPLE")
# ncclDataType_t, as COLL lines print it.
DATATYPE_NAMES = ("int8", "uint8", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64", "bfloat16")

_VERSION = re.compile(r"NCCL version (?P<nccl>\d+\.\d+\.\d+)\S*?\+cuda(?P<cuda>\d+\.\d+)")
_INFO = re.compile(r"\bNCCL INFO (?P<message>.*)")
_WARN = re.compile(r"\bNCCL WARN (?P<message>.*)")
# "comm 0x55.. rank 1 nranks 4 cudaDev 1 nvmlDev 1 busId 38000 commId 0xf0.. - Init COMPLETE" (older: no nvmlDev,
# busId or commId; newer: "ncclCommInitRank " or "[Rank 0] ncclCommInitRankConfig " in front).
_INIT = re.compile(r"\bcomm \S+ rank (?P<rank>\d+) nranks (?P<nranks>\d+) cudaDev (?P<cuda_dev>\d+)"
                   r"(?: nvmlDev (?P<nvml_dev>\d+))?(?: busId (?P<bus_id>\S+))?(?: commId (?P<comm_id>\S+))?"
                   r" - Init (?P<stage>START|COMPLETE)")
# Rank 0 prints each ring: "Channel 00/02 :    0   1   2   3" (channel 0 of 2; the ranks in ring order).
_RING = re.compile(r"^Channel (?P<channel>\d+)/(?P<channels>\d+) :(?P<ranks>(?:\s+\d+)+)\s*$")
# Each rank prints its place in every channel's tree: "Trees [0] 2/-1/-1->1->0 [1] ..." reads: in channel 0,
# rank 1 has the children 2, -1, -1 (-1: none) and the parent 0 (-1: it is the root).
_TREES = re.compile(r"^Trees(?: \[\d+\] -?\d+/-?\d+/-?\d+->-?\d+->-?\d+)+\s*$")
_TREE = re.compile(r"\[(?P<channel>\d+)\] (?P<children>-?\d+/-?\d+/-?\d+)->(?P<rank>-?\d+)->(?P<parent>-?\d+)")
# Each connection: "Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM", "Channel 01/0 : 3[1] -> 1[1] [send] via
# NET/IB/2/GDRDMA". The GPU in brackets is its NVML index in recent NCCL, its PCI bus id in older versions.
_CONNECTION = re.compile(r"^Channel (?P<channel>\d+)(?:/\d+)? : (?P<source>\d+)\[(?P<source_gpu>\w+)\] -> "
                         r"(?P<target>\d+)\[(?P<target_gpu>\w+)\](?: \[(?P<direction>send|receive)\])? "
                         r"via (?P<via>.+?)\s*$")
_CHANNEL_COUNTS = re.compile(r"(?P<collective>\d+) coll channels,(?: (?P<collnet>\d+) collnet channels,)?"
                             r"(?: (?P<nvls>\d+) nvls channels,)? (?P<p2p>\d+) p2p channels,"
                             r" (?P<per_peer>\d+) p2p channels per peer")
_NVLS_SUPPORT = re.compile(r"^NVLS multicast support is (?P<absent>not )?available on dev (?P<device>\d+)")
# TUNING (rank 0, once per collective): "AllReduce: 33554432 Bytes -> Algo RING proto SIMPLE channel{Lo..Hi}={0..31}";
# older versions: "262144 Bytes -> Algo 0 proto 1 time 54.707825" (numbers, and the cost model's time in us).
_TUNING = re.compile(r"^(?P<operation>\w+): (?P<bytes>\d+) Bytes -> Algo (?P<algorithm>\w+) proto (?P<protocol>\w+)"
                     r" channel\{Lo\.\.Hi\}=\{(?P<lo>\d+)\.\.(?P<hi>\d+)\}")
_NUMBERED_TUNING = re.compile(r"^(?P<bytes>\d+) Bytes -> Algo (?P<algorithm>\d+) proto (?P<protocol>\d+)"
                              r" time (?P<time>[\d.]+)")
# COLL (every rank, every call): "AllReduce: opCount 0 sendbuff 0x.. recvbuff 0x.. count 2 datatype 7 op 0 root 0
# comm 0x.. [nranks=2] stream 0x..".
_CALL = re.compile(r"^(?P<operation>\w+): opCount (?P<op_count>[0-9a-fA-F]+) sendbuff \S+ recvbuff \S+"
                   r" count (?P<count>\d+) datatype (?P<datatype>\d+) op \d+ root \d+ comm \S+"
                   r" \[nranks=(?P<nranks>\d+)\]")
# ENV: "NCCL_SOCKET_IFNAME set by environment to bond0" (some versions end with a full stop).
_ENVIRONMENT = re.compile(r"^(?P<name>NCCL_\w+) set by environment to (?P<value>.*?)\.?\s*$")


@dataclass(frozen=True)
class RankDevice:
    """One rank of a communicator and the GPU it drives, from its "Init START/COMPLETE" line."""

    rank: int
    nranks: int
    cuda_device: int  # the index the process sees (after CUDA_VISIBLE_DEVICES)
    nvml_device: int | None  # the index nvidia-smi shows
    bus_id: str | None  # the GPU's PCI bus id, in hexadecimal
    communicator: str | None  # commId: the same on every rank of one communicator
    initialised: bool  # its "Init COMPLETE" line was seen


@dataclass(frozen=True)
class TreePosition:
    """Where one rank sits in one channel's tree: the tree carries reductions up and broadcasts down."""

    channel: int
    rank: int
    parent: int  # -1: this rank is the root
    children: tuple[int, ...]


@dataclass(frozen=True)
class Connection:
    """One connection NCCL set up: in one channel, from one rank to the next, over one transport."""

    channel: int
    source_rank: int
    target_rank: int
    source_gpu: str  # as printed in brackets: NVML index (recent NCCL) or PCI bus id (older)
    target_gpu: str
    direction: str | None  # "send" or "receive" for network connections: each side prints its half
    via: str  # "P2P/CUMEM", "SHM/direct/direct", "NET/IB/0/GDRDMA", ...

    @property
    def transport(self) -> str:
        """P2P, SHM or NET."""
        return self.via.split("/")[0]


@dataclass(frozen=True)
class ChannelCounts:
    """The "N coll channels, ... p2p channels per peer" line: how many channels of each kind NCCL built."""

    collective: int
    collnet: int | None  # absent from older versions
    nvls: int | None  # absent from versions before NVLS (2.17)
    p2p: int
    p2p_per_peer: int


@dataclass(frozen=True)
class AlgorithmChoice:
    """What NCCL's tuner chose for one collective (NCCL_DEBUG_SUBSYS=TUNING; printed by rank 0)."""

    operation: str | None  # None in older versions' numbered lines
    bytes: int
    algorithm: str
    protocol: str
    channels: tuple[int, int] | None  # the first and last channel it runs on (recent versions)
    model_time_us: float | None  # the cost model's estimate (older versions)


@dataclass(frozen=True)
class CollectiveCall:
    """One collective call as a rank made it (NCCL_DEBUG_SUBSYS=COLL)."""

    operation: str
    op_count: int  # the communicator's running count of operations
    count: int  # elements, not bytes
    datatype: str
    nranks: int


@dataclass
class DebugLogSummary:
    """What an NCCL_DEBUG=INFO log says NCCL found and chose. Fields stay empty where the log is silent."""

    nccl_version: str | None = None
    cuda_version: str | None = None  # the CUDA version NCCL was built for
    ranks: list[RankDevice] = field(default_factory=list)
    rings: dict[int, tuple[int, ...]] = field(default_factory=dict)  # channel -> ranks in ring order
    ring_channels: int | None = None  # the "of N" in "Channel 00/N : ..."
    trees: list[TreePosition] = field(default_factory=list)
    connections: list[Connection] = field(default_factory=list)
    channel_counts: ChannelCounts | None = None
    nvls_support: dict[int, bool] = field(default_factory=dict)  # device -> multicast available
    algorithm_choices: list[AlgorithmChoice] = field(default_factory=list)
    calls: list[CollectiveCall] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)  # what NCCL says it read from the environment
    warnings: list[str] = field(default_factory=list)
    nccl_lines: int = 0  # lines NCCL printed (INFO, WARN, the version)
    recognised_lines: int = 0  # of those, the ones summarised here

    @property
    def channels(self) -> int | None:
        """How many channels collectives run on."""
        return self.channel_counts.collective if self.channel_counts else self.ring_channels

    @property
    def communicators(self) -> list[str]:
        """The commIds of the ranks' Init lines: more than one means the log mixes several communicators."""
        return sorted({rank.communicator for rank in self.ranks if rank.communicator})

    @property
    def transports(self) -> Counter[str]:
        """How many connections use each transport ("P2P/CUMEM": 12, ...)."""
        return Counter(connection.via for connection in self.connections)


def parse_debug_log(text: str) -> DebugLogSummary:
    """Read the text of an NCCL_DEBUG=INFO log (all ranks' lines, in any order) into a ``DebugLogSummary``.

    Lines NCCL did not print, and NCCL messages this parser does not know, are skipped.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_debug_log expects the log's text (str), got {type(text).__name__}; "
                        "read a file first: parse_debug_log(Path('nccl.log').read_text())")
    summary = DebugLogSummary()
    ranks: dict[tuple[str | None, int], RankDevice] = {}
    trees: dict[tuple[int, int], TreePosition] = {}
    connections: dict[Connection, None] = {}  # a dict keeps the first appearance's order and drops repeats
    for line in text.splitlines():
        if version := _VERSION.search(line):
            summary.nccl_version, summary.cuda_version = version["nccl"], version["cuda"]
            summary.nccl_lines += 1
            summary.recognised_lines += 1
        elif warning := _WARN.search(line):
            summary.warnings.append(warning["message"].strip())
            summary.nccl_lines += 1
            summary.recognised_lines += 1
        elif info := _INFO.search(line):
            summary.nccl_lines += 1
            if _read_message(info["message"].strip(), summary, ranks, trees, connections):
                summary.recognised_lines += 1
    summary.ranks = sorted(ranks.values(), key=lambda rank: (rank.communicator or "", rank.rank))
    summary.trees = sorted(trees.values(), key=lambda tree: (tree.channel, tree.rank))
    summary.connections = list(connections)
    return summary


def _read_message(message: str, summary: DebugLogSummary, ranks: dict[tuple[str | None, int], RankDevice],
                  trees: dict[tuple[int, int], TreePosition], connections: dict[Connection, None]) -> bool:
    """Add what one INFO message says to the summary; False if it is not one this parser knows."""
    if init := _INIT.search(message):
        key = (init["comm_id"], int(init["rank"]))
        seen = ranks.get(key)
        complete = init["stage"] == "COMPLETE"
        ranks[key] = RankDevice(
            rank=int(init["rank"]), nranks=int(init["nranks"]), cuda_device=int(init["cuda_dev"]),
            nvml_device=_optional_int(init["nvml_dev"]), bus_id=init["bus_id"], communicator=init["comm_id"],
            initialised=complete or (seen is not None and seen.initialised))
    elif ring := _RING.match(message):
        summary.rings[int(ring["channel"])] = tuple(int(rank) for rank in ring["ranks"].split())
        summary.ring_channels = int(ring["channels"])
    elif _TREES.match(message):
        for tree in _TREE.finditer(message):
            children = tuple(int(child) for child in tree["children"].split("/") if child != "-1")
            position = TreePosition(int(tree["channel"]), int(tree["rank"]), int(tree["parent"]), children)
            trees[(position.channel, position.rank)] = position
    elif connection := _CONNECTION.match(message):
        connections[Connection(
            channel=int(connection["channel"]), source_rank=int(connection["source"]),
            target_rank=int(connection["target"]), source_gpu=connection["source_gpu"],
            target_gpu=connection["target_gpu"], direction=connection["direction"], via=connection["via"])] = None
    elif counts := _CHANNEL_COUNTS.search(message):
        summary.channel_counts = ChannelCounts(
            collective=int(counts["collective"]), collnet=_optional_int(counts["collnet"]),
            nvls=_optional_int(counts["nvls"]), p2p=int(counts["p2p"]), p2p_per_peer=int(counts["per_peer"]))
    elif nvls := _NVLS_SUPPORT.match(message):
        summary.nvls_support[int(nvls["device"])] = nvls["absent"] is None
    elif tuning := _TUNING.match(message):
        summary.algorithm_choices.append(AlgorithmChoice(
            operation=tuning["operation"], bytes=int(tuning["bytes"]), algorithm=tuning["algorithm"],
            protocol=tuning["protocol"], channels=(int(tuning["lo"]), int(tuning["hi"])), model_time_us=None))
    elif tuning := _NUMBERED_TUNING.match(message):
        summary.algorithm_choices.append(AlgorithmChoice(
            operation=None, bytes=int(tuning["bytes"]), algorithm=_name(ALGORITHM_NAMES, tuning["algorithm"]),
            protocol=_name(PROTOCOL_NAMES, tuning["protocol"]), channels=None, model_time_us=float(tuning["time"])))
    elif call := _CALL.match(message):
        summary.calls.append(CollectiveCall(
            operation=call["operation"], op_count=int(call["op_count"], 16), count=int(call["count"]),
            datatype=_name(DATATYPE_NAMES, call["datatype"]), nranks=int(call["nranks"])))
    elif setting := _ENVIRONMENT.match(message):
        summary.environment[setting["name"]] = setting["value"]
    else:
        return False
    return True


def _optional_int(text: str | None) -> int | None:
    return None if text is None else int(text)


def _name(names: tuple[str, ...], number: str) -> str:
    """NCCL's name for an enum value it printed as a number; the number itself if this list predates it."""
    index = int(number)
    return names[index] if index < len(names) else f"#{index}"


# What the parts of a connection's "via" mean, first match wins; then the modifiers any of them may carry.
TRANSPORT_MEANINGS = (
    ("P2P/direct pointer", "P2P between two GPUs of one process: each reads and writes the other's memory "
                           "over NVLink or PCIe"),
    ("P2P/CUMEM", "P2P between processes: buffers made with CUDA's cuMem API, shared between the processes, then "
                  "read and written directly over NVLink or PCIe"),
    ("P2P/IPC", "P2P between processes, buffers shared through legacy CUDA IPC handles (NCCL_CUMEM_ENABLE=0, or "
                "NCCL before 2.19)"),
    ("P2P/MNNVL", "P2P over multi-node NVLink, between GPUs of different hosts in one NVLink domain"),
    ("P2P", "P2P: direct loads and stores between GPUs over NVLink or PCIe"),
    ("SHM", "through host shared memory: these GPUs cannot (or may not) use P2P, so data is staged in CPU memory"),
    ("NET/IB", "the network, through InfiniBand or RoCE verbs (the number is the card NCCL picked)"),
    ("NET/Socket", "the network, through TCP sockets: the slow path, taken when no RDMA card is usable"),
    ("NET", "the network, through a network plugin"),
)
MODIFIER_MEANINGS = (
    ("read", "the receiver reads from the sender's buffer (P2P read mode)"),
    ("CE", "the copies are made by the GPU's copy engines rather than by NCCL's kernel"),
    ("GDRDMA", "GPUDirect RDMA: the network card reads and writes GPU memory itself"),
)


def describe_transport(via: str) -> str:
    """What a connection's "via" says, in words: ``"NET/IB/0/GDRDMA"`` -> the network, through ..."""
    base = next((meaning for prefix, meaning in TRANSPORT_MEANINGS if via.startswith(prefix)), "not known to the "
                "course: see NCCL's documentation")
    parts = via.split("/")
    return "; ".join([base] + [meaning for modifier, meaning in MODIFIER_MEANINGS if modifier in parts])


def render_summary(summary: DebugLogSummary) -> str:
    """The summary as text: what NCCL found and chose, and what each transport in it means."""
    if summary.nccl_lines == 0:
        return ("No NCCL lines found. Was the program run with NCCL_DEBUG=INFO? NCCL prints on standard output "
                "unless NCCL_DEBUG_FILE is set.")
    lines = []
    if summary.nccl_version:
        lines.append(f"NCCL {summary.nccl_version}, built for CUDA {summary.cuda_version}")
    if summary.ranks:
        lines.append(f"Ranks ({len(summary.ranks)} in the log):")
        lines += [f"  {_describe_rank(rank)}" for rank in summary.ranks]
    if len(summary.communicators) > 1:
        lines.append(f"  the log mixes {len(summary.communicators)} communicators ({', '.join(summary.communicators)})"
                     ": what follows is all of them together")
    if summary.channels is not None:
        lines.append(f"Channels: {_describe_channels(summary)}")
    if summary.rings:
        lines.append("Rings (ranks in the order data travels, as rank 0 prints them):")
        lines += [f"  {_plural('channel', channels)}: {' '.join(map(str, order))}"
                  for order, channels in _group((order, channel) for channel, order in summary.rings.items()).items()]
    if summary.trees:
        lines.append("Trees (reductions flow up to the root, broadcasts down; -1 is none):")
        lines += [f"  {line}" for line in _describe_trees(summary.trees)]
    if summary.connections:
        lines.append("Connections (in each channel, a rank sends to the next over one transport):")
        routes = _group(((c.source_rank, c.target_rank, c.direction, c.via), c.channel) for c in summary.connections)
        for (source, target, direction, via), channels in routes.items():
            half = f" [{direction}]" if direction else ""
            lines.append(f"  {source} -> {target}{half} via {via} ({_plural('channel', channels)})")
        lines.append("What the transports mean:")
        lines += [f"  {via}: {describe_transport(via)}" for via in summary.transports]
    if summary.nvls_support:
        available = [device for device, supported in summary.nvls_support.items() if supported]
        missing = [device for device, supported in summary.nvls_support.items() if not supported]
        lines.append("NVLS multicast: " + "; ".join(
            text for text in (available and f"available on {_plural('device', available)}",
                              missing and f"not available on {_plural('device', missing)}") if text))
    if summary.algorithm_choices:
        lines.append("Algorithms chosen (NCCL_DEBUG_SUBSYS=TUNING; rank 0 prints them):")
        choices = Counter(summary.algorithm_choices)
        lines += [f"  {_describe_choice(choice)}{_times(n)}" for choice, n in choices.items()]
    if summary.calls:
        kinds = Counter((call.operation, call.datatype) for call in summary.calls)
        lines.append("Collective calls (NCCL_DEBUG_SUBSYS=COLL; every rank prints its own): " + ", ".join(
            f"{operation} of {datatype}{_times(n)}" for (operation, datatype), n in kinds.items()))
    if summary.environment:
        lines.append("NCCL says it read from the environment: "
                     + ", ".join(f"{name}={value}" for name, value in summary.environment.items()))
    if summary.warnings:
        lines.append(f"Warnings ({len(summary.warnings)}):")
        lines += [f"  {warning}" for warning in summary.warnings]
    lines.append(f"Read {summary.recognised_lines} of {summary.nccl_lines} NCCL lines; the others (plugins, CPU "
                 "affinity, timings, ...) are not summarised.")
    return "\n".join(lines)


def _describe_rank(rank: RankDevice) -> str:
    facts = [f"cudaDev {rank.cuda_device}"]
    facts += [f"nvmlDev {rank.nvml_device}"] if rank.nvml_device is not None else []
    facts += [f"busId {rank.bus_id}"] if rank.bus_id else []
    state = "initialised" if rank.initialised else "Init START only (not seen to complete)"
    return f"rank {rank.rank} of {rank.nranks}: {', '.join(facts)}; {state}"


def _describe_channels(summary: DebugLogSummary) -> str:
    text = f"{summary.channels} for collectives (each one CUDA block moving its share of every collective)"
    counts = summary.channel_counts
    if counts is None:
        return text
    extra = [f"{counts.nvls} NVLS"] if counts.nvls is not None else []
    extra += [f"{counts.collnet} CollNet"] if counts.collnet is not None else []
    extra += [f"{counts.p2p} point-to-point, {counts.p2p_per_peer} per peer"]
    return f"{text}; {', '.join(extra)}"


def _describe_trees(trees: list[TreePosition]) -> list[str]:
    """One line per rank: its places in the trees, each with the channels where it holds it."""
    places = _group(((tree.rank, tree.parent, tree.children), tree.channel) for tree in trees)
    by_rank: dict[int, list[str]] = {}
    for (rank, parent, children), channels in places.items():
        where = "root" if parent == -1 else f"child of {parent}"
        below = f"children {' '.join(map(str, children))}" if children else "no children"
        by_rank.setdefault(rank, []).append(f"{where}, {below} ({_plural('channel', channels)})")
    return [f"rank {rank}: " + "; ".join(descriptions) for rank, descriptions in sorted(by_rank.items())]


def _describe_choice(choice: AlgorithmChoice) -> str:
    what = f"{choice.operation} of {choice.bytes} bytes" if choice.operation else f"{choice.bytes} bytes"
    text = f"{what}: {choice.algorithm} with {choice.protocol}"
    if choice.channels:
        text += f", channels {choice.channels[0]}-{choice.channels[1]}"
    if choice.model_time_us is not None:
        text += f", modelled time {choice.model_time_us:,.1f} us"
    return text


def _group(pairs: Iterable[tuple[object, int]]) -> dict:
    """``[(key, number), ...]`` -> ``{key: sorted numbers}``, keys in order of first appearance."""
    grouped: dict = {}
    for key, number in pairs:
        grouped.setdefault(key, set()).add(number)
    return {key: sorted(numbers) for key, numbers in grouped.items()}


def _plural(noun: str, numbers: list[int]) -> str:
    """``channel [0, 1, 2, 5]`` -> ``"channels 0-2, 5"``; a single one -> ``"channel 4"``."""
    runs: list[list[int]] = []
    for number in sorted(numbers):
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    spans = ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)
    return f"{noun}{'s' if len(numbers) > 1 else ''} {spans}"


def _times(count: int) -> str:
    return f" (x{count})" if count > 1 else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.distributed.nccl_env",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Explain the NCCL_* variables set in this environment: what each controls, whether its value\n"
        "is one NCCL documents, whether NVLink SHARP is off as the course keeps it. With --log, also\n"
        "summarise an NCCL_DEBUG=INFO log: version, ranks and GPUs, rings, trees, channels, transports,\n"
        "and the algorithm and protocol of each collective (with NCCL_DEBUG_SUBSYS including TUNING).",
        epilog=f"NCCL's variables: {ENV_DOCS}\nNCCL's logs:      {LOGGING_DOCS}",
    )
    parser.add_argument("--log", metavar="FILE", help="an NCCL_DEBUG=INFO log to summarise ('-': standard input)")
    parser.add_argument("--catalogue", action="store_true", help="list every NCCL variable the course explains")
    args = parser.parse_args(argv)
    log = None
    if args.log:
        try:
            log = sys.stdin.read() if args.log == "-" else Path(args.log).read_text(errors="replace")
        except OSError as error:
            parser.error(f"cannot read the log {args.log}: {error.strerror}")
    if args.catalogue:
        print(render_catalogue(), end="\n\n")
    print(render(explain()))
    if log is not None:
        print()
        print(render_summary(parse_debug_log(log)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
