"""Where a compiled step spends its time: per-op times from a `jax.profiler` trace.

`op_times(run_once, steps)` traces `steps` calls of a jitted step, reads the Perfetto JSON that
jax.profiler writes, and adds up the duration of every XLA op event. The result is time per step,
grouped by op kind ("transpose_copy_fusion.30" counts as "transpose_copy_fusion") and by category
(convolution, transpose, reduction, other fusions and ops), and the slowest single instructions,
each with the JAX operation it came from (the `op_name` metadata of the compiled HLO, which names the
layer: "transpose(jvp(LeNet5))/c3/conv_general_dilated" is C3's backward convolution). Host frames
(Python, dispatch, runtime waits) are left out. The step's wall time comes with the result, so the
two can be compared.

On XLA:CPU each op event covers the op's run on one of the intra-op threads, so the op times add up
thread time and can exceed the wall time. Large Eigen convolutions (YNN fusions off) are the
exception: they run split over the thread pool, their event covers little more than the dispatch,
and their work is the part of the wall time that no event explains.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax

# "ffi_call" events are cnnjax's custom calls: oneDNN's convolution ("ffi_call.N__onednn$..."), and
# cnnjax/cpu_kernels.cc's weight gradient and batch norm + ReLU ("ffi_call.N" both). With the
# compiled module's text, `op_times` tells the last two apart by their targets and counts the batch
# norm's as "cnnjax_norm_act..." kinds. "conv" alone would take in XLA's "convert" fusions.
CATEGORIES = (("batch norm + ReLU (native)", ("cnnjax_norm_act",)),
              ("convolution", ("convolution", "ffi_call", "ynn_fusion")), ("transpose", ("transpose",)),
              ("reduction", ("reduce",)))


def _category(kind: str) -> str:
    for name, markers in CATEGORIES:
        if any(m in kind for m in markers):
            return name
    return "other fusions and ops"


RUNTIME_EVENTS = frozenset({"ParseArguments"})


def _is_op(name: str) -> bool:
    """An XLA op event, not a Python frame ("$..."), a runtime call ("A::B") or a jit wrapper."""
    return not (name.startswith("$") or "::" in name or "(" in name or " " in name
                or name in RUNTIME_EVENTS)


def parse_trace(events: list[dict], steps: int, top: int = 15,
                targets: dict[str, str] | None = None) -> dict[str, Any]:
    """{"ops": {kind: (ms per step, calls per step)}, "categories": {name: ms per step},
    "top_instructions": [[instruction name, ms per step, calls per step], ...]} (the `top` slowest).
    `targets` (`custom_call_targets` of the compiled module) makes a cnnjax batch-norm call's kind
    its target, so it is not counted as a convolution."""
    targets = targets or {}
    ms, calls = collections.Counter(), collections.Counter()
    by_name, name_calls = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") != "X" or not _is_op(event.get("name", "")):
            continue
        # "ffi_call.3__onednn$convolution" -> "__onednn$convolution", "fusion.12" -> "fusion"
        kind = re.sub(r"^ffi_call\.\d+(?=__)|[.\d]+$", "", event["name"]) or event["name"]
        if targets.get(event["name"], "").startswith("cnnjax_norm_act"):
            kind = targets[event["name"]]
        ms[kind] += event.get("dur", 0) / 1e3 / steps
        calls[kind] += 1
        by_name[event["name"]] += event.get("dur", 0) / 1e3 / steps
        name_calls[event["name"]] += 1
    categories = collections.Counter()
    for kind, value in ms.items():
        categories[_category(kind)] += value
    return {"ops": {kind: (value, calls[kind] / steps) for kind, value in ms.most_common()},
            "categories": dict(categories.most_common()),
            "top_instructions": [[name, value, name_calls[name] / steps]
                                 for name, value in by_name.most_common(top)]}


# `%name = shape opcode(...), ..., metadata={op_name="jit(f)/Model/layer/op" ...}` in HLO text.
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = [^\n]*?metadata=\{[^}\n]*?op_name="([^"]*)"',
                          re.MULTILINE)


def op_sources(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the JAX operation it came from (`op_name` metadata: the module path, so
    the layer), read from a compiled module's text, the leading "jit(...)/" dropped."""
    return {name: re.sub(r"^jit\([^)]*\)/", "", op_name)
            for name, op_name in _INSTRUCTION.findall(hlo_text)}


_CUSTOM_CALL = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = [^\n]*? custom-call\([^\n]*?'
                          r'custom_call_target="([^"]+)"', re.MULTILINE)


def custom_call_targets(hlo_text: str) -> dict[str, str]:
    """Instruction name -> custom-call target, for every custom call in a compiled module's text."""
    return dict(_CUSTOM_CALL.findall(hlo_text))


def op_times(run_once: Callable[[], Any], steps: int = 5, hlo_text: str = "") -> dict[str, Any]:
    """parse_trace of `steps` traced calls of `run_once` (already compiled and warmed up), plus
    "wall_ms_per_step"; with the compiled step's `hlo_text`, each top instruction also names the
    JAX operation (and so the layer) it came from."""
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(steps):
                jax.block_until_ready(run_once())
            wall = (time.perf_counter() - start) / steps
        paths = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
        if not paths:
            raise RuntimeError("jax.profiler wrote no Perfetto trace; is the profiler plugin installed?")
        with gzip.open(paths[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    profile = parse_trace(events, steps, targets=custom_call_targets(hlo_text))
    sources = op_sources(hlo_text)
    for row in profile["top_instructions"]:
        row.append(sources.get(row[0], ""))
    return {"wall_ms_per_step": 1e3 * wall, **profile}


def format_op_times(profile: dict[str, Any], top: int = 15) -> list[str]:
    """Report lines: wall time, the categories, then the `top` op kinds by time."""
    total = sum(profile["categories"].values()) or 1.0
    lines = [f"  op profile: {profile['wall_ms_per_step']:.1f} ms wall per step (traced); "
             f"op time {total:.1f} ms per step, by category:"]
    lines += [f"    {name:24s} {value:9.1f} ms  {100 * value / total:5.1f}%"
              for name, value in profile["categories"].items()]
    lines.append(f"  top {top} op kinds (ms per step, calls per step):")
    lines += [f"    {kind:40s} {value:9.2f} ms  x{count:g}"
              for kind, (value, count) in list(profile["ops"].items())[:top]]
    if profile.get("top_instructions"):
        lines.append("  slowest instructions (ms per step, calls per step, where from):")
        lines += [f"    {row[0]:32s} {row[1]:9.2f} ms  x{row[2]:g}  "
                  f"{(row[3] if len(row) > 3 else '') or '(no op_name in the HLO)'}"
                  for row in profile["top_instructions"][:top]]
    return lines
