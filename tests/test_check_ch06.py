"""Chapter 06 checkers: capture on static buffers, padding to a captured size and re-pointing a graph's nodes pass
when done as the chapter does them, and each known mistake is rejected with its hint."""

from __future__ import annotations

import numpy as np
import pytest
from checker_testing import rejected_with, unwritten

from course_lib.check.ch06 import check_decode_padded, check_graphed_decode, check_repoint, padded_models
from course_lib.labs.decode_step_model import EMBED, LM_HEAD
from course_lib.labs.graph_capture import KernelNode

# --- graphed_decode ---------------------------------------------------------------------------------------------


def graphed_with(reallocate=False, read_inside=False, pageable=False, view=False, eager=False, fill=True):
    """The solution with one known mistake; the first batch's tokens are in the buffers before the capture, so a
    graph that never sees new tokens replays the first batch."""

    def graphed_decode(device, stream, weights, token_batches):
        rows = len(token_batches[0])
        vocab, hidden = weights["embedding"].array.shape
        staged = device.host_alloc("token_ids (pinned)", rows, np.int32, pinned=not pageable)
        tokens = device.malloc("token_ids", rows, np.int32)
        states, logits = device.malloc("hidden", (rows, hidden)), device.malloc("logits", (rows, vocab))
        staged.array[...] = tokens.array[...] = token_batches[0]
        with stream.capture() as captured:
            stream.copy_async(tokens, staged)
            stream.launch(EMBED, rows, tokens, weights["embedding"], states)
            stream.launch(LM_HEAD, rows, states, weights["lm_head"], logits)
            if read_inside:
                stream.read(logits)
        graph = captured.graph.instantiate()
        outputs = []
        for batch in token_batches:
            if reallocate:
                tokens = device.malloc("token_ids", rows, np.int32)
            if fill:
                staged.array[...] = tokens.array[...] = batch
            if eager:
                stream.launch(EMBED, rows, tokens, weights["embedding"], states)
                stream.launch(LM_HEAD, rows, states, weights["lm_head"], logits)
            else:
                graph.launch(stream)
            outputs.append(logits.array if view else stream.read(logits))
        return outputs

    return graphed_decode


def test_graphed_decode_accepts_the_solution(capsys):
    check_graphed_decode(graphed_with())
    assert capsys.readouterr().out.startswith("PASSED graphed_decode: 3 random cases (3 to 5 batches each")


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (graphed_with(reallocate=True), "copy each batch's values INTO it"),
        (graphed_with(read_inside=True), "read the logits after graph.launch(stream)"),
        (graphed_with(pageable=True), "allocate the staging buffer pinned"),
        (graphed_with(view=True), "Return a copy"),
        (graphed_with(fill=False), "the replay never saw the new tokens"),
        (graphed_with(eager=True), "graph launches for"),
    ],
    ids=["reallocated-input", "read-inside-capture", "pageable-staging", "view-of-static-logits", "never-filled",
         "eager"],
)
def test_graphed_decode_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_graphed_decode, wrong)
    assert hint in message and "batches of" in message


def test_graphed_decode_synchronise_inside_and_stub():
    def synchronising(device, stream, weights, token_batches):
        with stream.capture():
            stream.synchronize()

    assert "nothing to wait for" in rejected_with(check_graphed_decode, synchronising)

    def graphed_decode(device, stream, weights, token_batches):
        raise NotImplementedError("Exercise: write graphed_decode; see the text above")

    assert unwritten(check_graphed_decode, graphed_decode).startswith("graphed_decode is not written yet")


# --- decode_padded ----------------------------------------------------------------------------------------------


def padded_with(choose=lambda sizes, rows: min(s for s in sizes if s >= rows), keep_padding=False, view=False,
                eager=False):
    def decode_padded(model, token_ids, context_lens, block_tables):
        rows = len(token_ids)
        size = choose(sorted(model.steps), rows)
        step = model.steps[size]
        step.fill(token_ids, context_lens, block_tables)
        if eager:
            step.enqueue(model.stream)
        else:
            model.graphs[size].launch(model.stream)
        logits = step.logits.array if view else model.stream.read(step.logits)
        return logits if keep_padding else logits[:rows]

    return decode_padded


def test_decode_padded_accepts_the_solution(capsys):
    check_decode_padded(padded_with())
    assert capsys.readouterr().out.startswith("PASSED decode_padded: 6 random cases (captured sizes [1, ")


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (padded_with(choose=lambda sizes, rows: max(s for s in sizes if s <= rows)), "does not fit the step"),
        (padded_with(keep_padding=True), "drop them"),
        (padded_with(choose=lambda sizes, rows: sizes[-1]), "the right logits, but the graph of size"),
        (padded_with(view=True), "Return a copy"),
        (padded_with(eager=True), "no graph was launched"),
        (lambda model, tokens, lengths, tables: model.run(tokens, lengths, tables), "the chapter's own answer"),
    ],
    ids=["next-smaller", "padded-rows", "largest-graph", "view", "eager", "model-run"],
)
def test_decode_padded_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_decode_padded, wrong)
    assert hint in message and "captured sizes [" in message


def test_padded_models_are_twins(rng):
    model, twin, _ = padded_models(rng)
    assert sorted(model.steps) == sorted(twin.steps) and sorted(model.steps)[0] == 1
    np.testing.assert_array_equal(model.cache.array, twin.cache.array)


# --- repoint ----------------------------------------------------------------------------------------------------


def repoint_with(only_first=False, skip_copies=True, all_args=True):
    def repoint(graph, old, new):
        for index, node in enumerate(graph.nodes):
            if skip_copies and not isinstance(node, KernelNode):
                continue
            if not skip_copies or any(arg is old for arg in node.args):
                args = tuple(new if arg is old else arg for arg in node.args)
                graph.set_kernel_node_params(index, *(args if all_args else (new,)))
                if only_first:
                    return

    return repoint


def test_repoint_accepts_the_solution(capsys):
    check_repoint(repoint_with())
    assert capsys.readouterr().out.startswith("PASSED repoint: 3 random cases (the KV cache moved")


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (repoint_with(only_first=True), "re-point every kernel node that holds it"),
        (repoint_with(skip_copies=False), "skip copy nodes"),
        (repoint_with(all_args=False), "pass every one of them"),
        (lambda graph, old, new: None, "it still reads old"),
    ],
    ids=["first-node-only", "copy-nodes-too", "one-argument", "nothing"],
)
def test_repoint_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_repoint, wrong)
    assert hint in message and "read the KV cache" in message


def test_repoint_refuses_other_changes():
    def also_another_buffer(graph, old, new):
        repoint_with()(graph, old, new)
        index = next(i for i, node in enumerate(graph.nodes) if isinstance(node, KernelNode))
        args = graph.nodes[index].args
        graph.set_kernel_node_params(index, *args[:-1], new)

    assert "its other arguments must stay as they were" in rejected_with(check_repoint, also_another_buffer)
