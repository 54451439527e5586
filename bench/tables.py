"""The docs' tables of measured numbers, generated from the result files in bench/results.

    python bench/tables.py               # rewrite every generated region in the docs from the files
    python bench/tables.py --check       # exit 1 naming each region that differs from its files,
                                         #   each unknown region and each untraced figure in prose
    python bench/tables.py --print NAME  # print one table (NAME: a key of TABLES)

A generated region is the text between ``<!-- tables:NAME -->`` and ``<!-- /tables:NAME -->`` in
README.md, docs/*.md and bench/*.md (the PAGES). A region whose markers sit on one line is an inline
value; any other region holds a block (a table, a list). Links inside a region are written relative
to the page that holds it. No figure in a region is typed by hand: edit a result file (or rerun its
benchmark), then run this script.

Prose may quote a measured figure (a ratio ``2.3×``, a percentage ``+6%``, a decimal such as
``0.046``, a time such as ``2.02 s``) only when the same figure appears in a generated region of the
same page, or when it is listed in NOT_FROM_FILES with where it comes from; ``untraced_figures``
finds the others.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from typing import Callable

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

PAGE_GLOBS = ("README.md", "docs/*.md", "bench/README.md", "bench/ROOFLINE.md")
# a marker quoted in backticks (`<!-- tables:NAME -->`) is text about markers, not a marker
REGION = re.compile(r"(?<!`)<!-- tables:([\w.-]+) -->(.*?)<!-- /tables:\1 -->", re.S)
OPEN_MARK = re.compile(r"(?<!`)<!-- tables:([\w.-]+) -->")


# --- reading result files -------------------------------------------------------------------------
class Results:
    """The result files of one folder, read once; ``link(name)`` is the file's link from the page."""

    def __init__(self, folder: str, page_dir: str):
        self.folder, self.page_dir = folder, page_dir
        self._cache: dict[str, dict] = {}

    def __call__(self, name: str) -> dict:
        if name not in self._cache:
            with open(os.path.join(self.folder, name)) as f:
                self._cache[name] = json.load(f)
        return self._cache[name]

    def link(self, name: str) -> str:
        """A markdown link to bench/results/NAME from the page (the folder is always bench/results)."""
        rel = os.path.relpath(os.path.join(ROOT, "bench", "results", name), os.path.join(ROOT, self.page_dir))
        return f"[`{name}`]({rel})"


def _pct(x: float) -> str:
    return f"{x:+.0%}"


def _ratio_row(res: dict, i: int) -> dict:
    base, r = res["rows"][0], res["rows"][i]
    return {
        "row": r,
        "base": base,
        "tox_factor": base["toxicity_mean_prob"] / r["toxicity_mean_prob"],
        "ppl_change": r["perplexity"] / base["perplexity"] - 1,
    }


# --- the tables -------------------------------------------------------------------------------------
def quality_table(name: str) -> Callable[[Results], str]:
    def make(res: Results) -> str:
        from quality_results import marked_table

        return marked_table(res(f"quality-{name}.json"))

    return make


MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma-3-270M"}


def sweep_cost(res: Results) -> str:
    """The interval sweep's cost, estimated from the single-draw sweeps' row times (bench/sweep_cost.py)."""
    from sweep_cost import table

    return table(res)


def quality_target(res: Results) -> str:
    """One bullet per row that meets the quality target, per model."""
    from lineas_fast.apps.sweep import row_label

    lines = []
    for key, model in MODEL_NAMES.items():
        data = res(f"quality-{key}.json")
        for i in data["meets_target"]:
            q = _ratio_row(data, i)
            r, b = q["row"], q["base"]
            lines.append(
                f"* {model}: {row_label(r)}, λ = {r['strength']:g}: mean toxicity "
                f"{b['toxicity_mean_prob']:.3f} → {r['toxicity_mean_prob']:.3f} "
                f"({q['tox_factor']:.1f}× lower), "
                f"toxic rate {b['toxicity_rate']:.1%} → {r['toxicity_rate']:.1%}, perplexity "
                f"{b['perplexity']:.2f} → {r['perplexity']:.2f} ({q['ppl_change']:+.1%}) "
                f"({res.link(f'quality-{key}.json')})"
            )
    return "\n".join(lines)


def quality_goal(name: str) -> Callable[[Results], str]:
    """Issue #31's goal read from an interval sweep's file (bench/quality_goal.py), and its measured cost."""

    def make(res: Results) -> str:
        from quality_goal import goal_lines, measured_cost

        data = res(f"quality-{name}.json")
        cost = measured_cost(data)
        return "\n".join(goal_lines(data)) + f"\n\nMeasured times of this sweep: {cost}."

    return make


def _interval_headline(res: Results) -> list[str]:
    """A headline row per model with an interval sweep (quality-KEY-draws.json): LinEAS at the
    strength chosen on validation, with its intervals."""
    from quality_goal import best_lineas, gated

    lines = []
    for key, model in MODEL_NAMES.items():
        name = f"quality-{key}-draws.json"
        if not os.path.isfile(os.path.join(res.folder, name)):
            continue
        data = res(name)
        r, base = best_lineas(data), data["rows"][0]
        if r is None:
            continue
        t, p, n = r["ci"]["toxicity_mean_prob_ratio"], r["ci"]["perplexity_ratio"], r["n"]
        factor = base["toxicity_mean_prob"] / r["toxicity_mean_prob"]
        shut = {"wikipedia": "Wikipedia", "wikipedia+targets": "Wikipedia and the target sentences"}
        control = shut.get(r["settings"].get("gate_control"), "the control sentences") if gated(r) else ""
        gates = f", with DSAS gates shut on {control}" if control else ""
        comments, links = "", res.link(name)
        cname = f"comment-perplexity-{key}-draws.json"
        if os.path.isfile(os.path.join(res.folder, cname)):
            c = next((x for x in res(cname)["rows"] if x["recipe"] == r["recipe"]), None)
            if c is not None:
                ci = c["comment_perplexity_ratio"]
                comments = (
                    f"; on held-out comments perplexity ×{ci['mean']:.2f} [{ci['low']:.2f}, {ci['high']:.2f}]"
                )
                links += ", " + res.link(cname)
        lines.append(
            f"| steering quality with 95% intervals, {model}, LinEAS's best recipe{gates} "
            f"(strength chosen on validation within "
            f"{data['ppl_budget']:+.0%} Wikipedia perplexity; {n['draws']} draws × {n['seeds']} seeds × "
            f"{n['prompts']} test prompts, sampled) | mean toxicity ×{t['mean']:.2f} "
            f"[{t['low']:.2f}, {t['high']:.2f}] (**{factor:.1f}× "
            f"lower**) at Wikipedia perplexity ×{p['mean']:.3f} [{p['low']:.3f}, {p['high']:.3f}]"
            f"{comments} | {links} |"
        )
    return lines


def demo(res: Results) -> str:
    from lineas_fast.apps.demo import format_table

    d = res("demo-smollm2-cpu.json")
    wall = d["wall_clock"].split(" (")[0]
    head = (
        f"`{d['command']}` at commit {d['commit']} ({d['machine']}, fp32): **{wall}** wall clock, "
        f"{d['peak_rss_GiB']:.1f} GiB peak memory ({res.link('demo-smollm2-cpu.json')}):"
    )
    gated = next((r for r in d["rows"] if r.get("gate_opening")), None)
    tail = (
        f"\n\nThe DSAS gates open {gated['gate_opening']['wiki']:.2f} on Wikipedia and "
        f"{gated['gate_opening']['prompts']:.2f} on the prompts."
        if gated
        else ""
    )
    return head + "\n\n" + format_table(d["rows"]) + tail


def demo_row(res: Results, method: str, strength: float) -> dict:
    return next(
        r for r in res("demo-smollm2-cpu.json")["rows"] if r["method"] == method and r["strength"] == strength
    )


def demo_effect(res: Results) -> str:
    """The demo's λ = 3 row against its λ = 0 row, in one sentence."""
    base, top = demo_row(res, "LinEAS", 0.0), demo_row(res, "LinEAS", 3.0)
    return (
        f"λ = 3 gives {base['toxicity_mean_prob'] / top['toxicity_mean_prob']:.1f}× lower mean toxicity "
        f"({base['toxicity_rate']:.0%} → {top['toxicity_rate']:.0%} toxic) at "
        f"{_pct(top['perplexity'] / base['perplexity'] - 1)} perplexity"
    )


def trainer(res: Results) -> str:
    d = res("trainer-cpu.json")
    lines = [
        "| workload | reference trainer s/step | `lf.train` s/step | speedup | by CPU time "
        "| per round | `lf.train` without packing s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in d["runs"]:
        rounds = ", ".join(f"{x:.2f}" for x in r["speedup_per_round"])
        lines.append(
            f"| {r['model']} | {r['reference_median_s']:.2f} | {r['lineas_median_s']:.2f} | "
            f"**{r['speedup']:.2f}×** | {r['speedup_cpu_time']:.2f}× | {rounds} | "
            f"{r['lineas_bucketed_median_s']:.2f} |"
        )
    return (
        "\n".join(lines)
        + f"\n\n{d['device']}, {d['runs'][0]['threads']} threads ({res.link('trainer-cpu.json')})."
    )


def generation(res: Results) -> str:
    d = res("generation-cpu.json")
    lines = [
        "| provider | batch | prefill tok/s | decode tok/s | vs unsteered (prefill / decode) "
        "| ATen ops / forward |",
        "|---|---|---|---|---|---|",
    ]
    for r in d["results"]:
        lines.append(
            f"| {r['provider']} | {r['batch']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
            f"{r['prefill_vs_unsteered']:.0%} / {r['decode_vs_unsteered']:.0%} | "
            f"{r['aten_ops_per_forward']} |"
        )
    first = d["results"][0]
    return (
        "\n".join(lines)
        + f"\n\n{first['model']}, prompt {first['prompt_len']}, {first['new_tokens']} new tokens, "
        f"{d['device']}, {d['threads']} threads ({res.link('generation-cpu.json')})."
    )


def _provider_range(rows: list[dict], provider: str, key: str = "decode_vs_unsteered") -> str:
    vals = sorted(r[key] for r in rows if r["provider"] == provider)
    lo, hi = f"{vals[0]:.0%}", f"{vals[-1]:.0%}"
    return lo if lo == hi else f"{lo[:-1]}–{hi}"


def generation_summary(res: Results) -> str:
    rows = res("generation-cpu.json")["results"]
    names = (
        ("folded", "folded"),
        ("fused_norms", "in-memory fused norms"),
        ("reference_hooks", "reference hooks"),
        ("lineas_hooks", "lineas_fast hooks"),
        ("lineas_gated", "DSAS-gated hooks"),
    )
    parts = [
        f"{label} {_provider_range(rows, p)}" for p, label in names if any(r["provider"] == p for r in rows)
    ]
    return "decode speed as a share of unsteered: " + ", ".join(parts)


def serving(res: Results) -> str:
    d = res("serving-cpu.json")
    lines = [
        "| provider | batch | prefill tok/s | decode tok/s | prefill overhead | decode overhead |",
        "|---|---|---|---|---|---|",
    ]
    for r in d["results"]:
        lines.append(
            f"| {r['provider']} | {r['batch']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
            f"{r['prefill_overhead_pct']:+.1f}% | {r['decode_overhead_pct']:+.1f}% |"
        )
    return (
        "\n".join(lines) + f"\n\n{d['model']}; vLLM {d['vllm']} {d['vllm_mode']}; {d['device']}, "
        f"1-minute load average {d['load_average_1min']:.1f} ({res.link('serving-cpu.json')})."
    )


def _span(values) -> str:
    """A range of per-round overheads, e.g. ``−3.1…+4.2%``; ``—`` for a file without rounds."""
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    return f"{lo:+.1f}…{hi:+.1f}%"


def _interval(r: dict, phase: str) -> str:
    """``mean [lo, hi]`` of the per-round overheads (the interval over start-order-balanced round
    pairs where the file has one, else over rounds), else the pooled overhead alone."""
    iv = r.get(f"{phase}_overhead_pct_interval_pairs") or r.get(f"{phase}_overhead_pct_interval")
    if iv is None:
        return f"{r[f'{phase}_overhead_pct']:+.1f}%"
    return f"{r[f'{phase}_overhead_pct_mean']:+.1f}% [{iv[0]:+.1f}, {iv[1]:+.1f}]"


def per_request(res: Results) -> str:
    lines = [
        "| vLLM mode | code | provider | batch | decode tok/s | decode overhead [95% interval] | per round "
        "| prefill overhead [95% interval] | per round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = (
        "per-request-steering-compiled-cpu.json",
        "per-request-steering-compiled-b1-cpu.json",  # batch 1 alone, the design before (opaque op)
        "per-request-steering-cpu.json",
    )
    names = tuple(n for n in names if os.path.exists(os.path.join(res.folder, n)))
    notes = []
    for name in names:
        d = res(name)
        mode = "compiled" if d["vllm_mode"] == "compiled" else "eager"
        code = d["commit"][:7]
        for r in d["results"]:
            if r["provider"] == "vllm_unsteered":
                head = f"| {mode} | {code} | vllm_unsteered | {r['batch']} | {r['decode_tok_s']:.1f}"
                lines.append(f"{head} | baseline | — | baseline | — |")
                continue
            lines.append(
                f"| {mode} | {code} | {r['provider']} | {r['batch']} | {r['decode_tok_s']:.1f} | "
                f"{_interval(r, 'decode')} | {_span(r.get('decode_overhead_pct_rounds'))} | "
                f"{_interval(r, 'prefill')} | {_span(r.get('prefill_overhead_pct_rounds'))} |"
            )
        s = d["settings"]
        blocked = any("decode_overhead_pct_interval_pairs" in r for r in d["results"])
        notes.append(
            f"{res.link(name)} ({mode}, code at {code}"
            + (", intervals over start-order-balanced round pairs" if blocked else "")
            + f"): {s.get('rounds', 1)} round(s) of "
            f"{s['repeats']} timings, prompts of {s['prompt_len']} tokens, {s['new_tokens']} new tokens, "
            f"1-minute load average {d['load_average_1min']:.1f}"
        )
    d = res(names[-1])
    return "\n".join(lines) + f"\n\n{d['model']}; vLLM {d['vllm']}; {d['device']}. " + "; ".join(notes) + "."


def slot_op(res: Results) -> str:
    """What each steered norm adds to a stack's forward, eager and compiled, one pair of columns
    per labelled run of bench/slot_op.py (the plugin's design before and after a change)."""
    d = res("slot-op-cpu.json")
    runs = d["runs"]
    modes = ("eager", "compiled")
    head = " | ".join(f"{r['label']} {m} (µs/norm)" for r in runs for m in modes)
    lines = [f"| norm, tokens, tokens steered | {head} |", "|---|" + "---|" * (len(runs) * len(modes))]
    cases = [k.split(" ", 1)[1] for k in runs[0]["per_norm"] if k.startswith("eager ") and "plain" not in k]
    for case in cases:
        per_norm = [r["per_norm"][f"{m} {case}"] for r in runs for m in modes]
        cells = [f"{v['added_us_per_norm_median']:.2f}" for v in per_norm]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    s = runs[0]["settings"]
    plain = "; ".join(
        f"{r['label']} {m} {r['per_norm'][f'{m} plain stack T=1']['forward_us_median'] / s['layers']:.0f} µs"
        for r in runs
        for m in modes
    )
    notes = "; ".join(
        f"{r['label']}: code at {r['code_commit'][:7]}, 1-minute load average {r['load_average_1min']:.1f}"
        for r in runs
    )
    return (
        "\n".join(lines)
        + f"\n\nAdded time per steered norm = (steered − plain forward) / {s['layers']} layers of "
        + f"[norm → {s['d']}×{s['d']} linear], median of {s['rounds']} interleaved rounds of {s['calls']} "
        + f"forwards, one thread; {s['slots']} slots, {s['rows']} rows; "
        + f"a plain layer at T = 1 takes {plain}; "
        + f"{runs[0]['device']}, torch {runs[0]['torch']} ({res.link('slot-op-cpu.json')}). {notes}."
    )


def _gb_span(values) -> str:
    """GB with 2 decimals; ``lo…hi`` where repeated runs differ; ``—`` for no value."""
    if not values:
        return "—"
    lo, hi = f"{min(values) / 1e9:.2f}", f"{max(values) / 1e9:.2f}"
    return lo if lo == hi else f"{lo}…{hi}"


FSDP_RUNS = {
    "fsdp-bf16": "`--fsdp --dtype bfloat16`",
    "fsdp-bf16-mmap": "`--fsdp --dtype bfloat16`, `MALLOC_MMAP_THRESHOLD_=1048576`",
    "fsdp-f32": "`--fsdp --dtype float32` (the former default)",
    "fsdp-f32ckpt": "`--fsdp`, float32 checkpoint (auto: float32)",
    "dp-bf16": "data parallel, `--dtype bfloat16`",
}


def fsdp_memory(res: Results) -> str:
    """Measured host peak per rank and phase against docs/distributed.md's arithmetic, then what
    the runs show, every figure from the file."""
    d = res("fsdp-memory-cpu.json")
    by_run: dict[str, list] = {}
    for row in d["rows"]:
        by_run.setdefault(row["run"], []).append(row)

    def ranks(run: str, r: int) -> list[dict]:
        return [row["ranks"][r] for row in by_run.get(run, [])]

    def phase(run: str, r: int, name: str, key: str = "peak_bytes") -> list[float]:
        return [x["phases"][name][key] for x in ranks(run, r) if name in x["phases"]]

    def peak(run: str, r: int) -> list[float]:
        return [x["peak_bytes"] for x in ranks(run, r)]

    def weights(run: str, r: int) -> list[float]:  # peak less the process before the model
        return [x["peak_bytes"] - x["process_before_model_bytes"] for x in ranks(run, r)]

    lines = [
        "| run | rank | before the model | load | shard + broadcast | training | **peak** | arithmetic "
        "| peak − arithmetic |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    world = d["settings"]["procs"]
    for run, rows in by_run.items():
        for r in range(world):
            got = ranks(run, r)
            lines.append(
                f"| {FSDP_RUNS.get(run, run)}{f' (×{len(rows)})' if len(rows) > 1 else ''} | {r} | "
                f"{_gb_span([x['process_before_model_bytes'] for x in got])} | "
                f"{_gb_span(phase(run, r, 'load'))} | {_gb_span(phase(run, r, 'shard'))} | "
                f"{_gb_span(phase(run, r, 'train'))} | **{_gb_span(peak(run, r))}** | "
                f"{_gb_span([x['predicted_bytes'] for x in got])} | "
                f"{_gb_span([x['peak_bytes'] - x['predicted_bytes'] for x in got])} |"
            )
    m, s, env = d["model"], d["settings"], d["environment"]
    cfg, counts = m["config"], m["parameters"]
    terms = {row["loaded_dtype"]: row["arithmetic"]["terms_bytes"] for row in d["rows"]}
    bf, f32 = terms.get("bfloat16"), terms.get("float32")

    def gb(x: float) -> str:
        return f"{x / 1e9:.2f}"

    def term(key: str, digits: int = 2) -> str:
        return " / ".join(f"{t[key] / 1e9:.{digits}f}" for t in (bf, f32) if t)

    text = [
        "\n".join(lines),
        f"Host memory (GB) of each worker of `torchrun --standalone --nproc-per-node {world}` "
        f"running `lineas-fast train` (the command's code, called in the worker process that "
        f"reads its own memory; {d['backend']}, {d['threads_per_rank']} thread per rank), "
        f"the peak resident set of each phase (`VmHWM`, reset between phases; the model's load, "
        f"`fully_shard` with the weights broadcast from rank 0, then the target reads and "
        f"{s['steps']} steps), on a Llama-shaped model of {counts['total'] / 1e6:.0f}M random "
        f"parameters (d = {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocabulary "
        f"{cfg['vocab_size']}), a bfloat16 checkpoint unless said, a batch of {s['batch']} sentences "
        f"of {s['length']} tokens, maps on every post-attention norm; {env['device']}, torch "
        f"{env['torch']}, transformers {env['transformers']}, commit {env['commit'][:7]} "
        f"({res.link('fsdp-memory-cpu.json')}). Where a run was repeated, the range over its runs. "
        f"Arithmetic: the formula above for this model and {world} ranks, plus the rank's memory "
        f"before the model; bfloat16 / float32: W = {term('weights_W')}, one layer "
        f"L = {term('one_layer_L', 3)}, activations A = {term('activations_A_per_rank', 3)} per rank, "
        f"maps {term('maps', 3)}; under FSDP each rank W/N + 2L + A + maps and rank 0 at least W "
        f"(it reads the whole model); data parallel W + A + maps.",
    ]
    shows = []
    if bf and f32 and "fsdp-bf16" in by_run and "fsdp-f32" in by_run:
        half, full = weights("fsdp-bf16", 0), weights("fsdp-f32", 0)
        ratios = sorted({f"{f / h:.1f}" for f in full for h in half})
        shows.append(
            f"* **bfloat16 against float32 (the probe's complaint).** Rank 0's peak is "
            f"{_gb_span(peak('fsdp-bf16', 0))} GB with `--dtype bfloat16` and "
            f"{_gb_span(peak('fsdp-f32', 0))} GB when the same bfloat16 checkpoint is loaded as "
            f"float32; above the process itself, {_gb_span(half)} against {_gb_span(full)} GB "
            f"({'…'.join(ratios)}×). Loading as float32 doubles every weight term: the probe's "
            f'"twice" was the dtype the command loaded in, and `--dtype` (default auto: the '
            f"checkpoint's own) removes it. In bfloat16 the peaks are still above the arithmetic, "
            f"for the two reasons below."
        )
    if "fsdp-bf16-mmap" in by_run:
        run = "fsdp-bf16-mmap"  # the shard phase as in fsdp-bf16, with a training phase below it
        shard = [p - b for p, b in zip(phase(run, 0, "shard"), phase(run, 0, "load", "VmRSS_after_bytes"))]
        shows.append(
            f"* **Rank 0 holds W + W/N, not W, while it shards**: {_gb_span(shard)} GB above its "
            f"memory before the shard phase (the `MALLOC_MMAP_THRESHOLD_` rows, where this is "
            f"rank 0's peak), W + W/N = "
            f"{gb(bf['weights_W'] * (1 + 1 / world))} GB: it allocates its shards while it still "
            f"holds the whole model for the broadcast. Loading a checkpoint in its own dtype adds "
            f"almost nothing (the load column): transformers maps the safetensors file, whose "
            f"pages are read when `fully_shard` copies them; loaded in another dtype, the "
            f"converted copy is made at load ({_gb_span(phase('fsdp-f32', 0, 'load'))} GB: the "
            f"float32 model and the bfloat16 file's pages)."
        )
        extra = [x["peak_bytes"] - x["predicted_bytes"] for x in ranks("fsdp-bf16-mmap", 1)]
        shows.append(
            f"* **Training: the ranks' allocator, not the formula.** With glibc's default "
            f"malloc, rank 1's training peak was {_gb_span(phase('fsdp-bf16', 1, 'train'))} GB "
            f"in the repeated runs: the memory of the layers FSDP all-gathers and frees again "
            f"stays in the process, up to about the whole model. With "
            f"`MALLOC_MMAP_THRESHOLD_=1048576` (each allocation of 1 MiB or more its own "
            f"mapping, returned when freed) it is {_gb_span(phase('fsdp-bf16-mmap', 1, 'train'))} "
            f"GB in both runs, {_gb_span(extra)} GB above the arithmetic, of which "
            f"{gb(bf['root_unsharded_not_in_formula'])} GB are the root's own parameters "
            f"(embeddings, final norm, LM head), which FSDP2 keeps unsharded from the root's "
            f"forward to the end of its backward and the formula leaves out (the rest is not "
            f"broken down here). On GPUs the unsharded layers live in GPU memory, under CUDA's "
            f"caching allocator, which this run does not measure."
        )
    if "dp-bf16" in by_run:
        files = [x["phases"]["train"]["RssFile_after_bytes"] for x in ranks("dp-bf16", 0)]
        shows.append(
            f"* **Data parallel** ({_gb_span(peak('dp-bf16', 0))} GB per rank, "
            f"{_gb_span([x['peak_bytes'] - x['predicted_bytes'] for x in ranks('dp-bf16', 0)])} "
            f"GB above the arithmetic): each rank's weights are pages of the one safetensors "
            f"file mapped in ({_gb_span(files)} GB of file pages after training), which the "
            f"processes share: each rank's resident set counts them, the node holds them once."
        )
    if shows:
        text.append("What the runs show:\n\n" + "\n".join(shows))
    return "\n\n".join(text)


def diffusion(res: Results) -> str:
    d = res("diffusion-cpu.json")
    gen = ", ".join(f"{k} {v:.3f} s" for k, v in d["generate_s"].items())
    return (
        f"* {d['pipeline']}, {d['n_modules']} UNet norms: one training step {d['train_step_s']:.3f} s; "
        f"one {d['denoising_steps']}-step generation: {gen} ({res.link('diffusion-cpu.json')})."
    )


def diffusion_crn(res: Results) -> str:
    d = res("diffusion-crn-cpu.json")
    lines = [
        "| noise | optimizer | lr | batch | held-out W2 before → after | change "
        "| prompt-blind modules after | map movement (prompt-blind / all) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in d["runs"]:
        lines.append(
            f"| {r['noise']} | {r['optimizer']} | {r['lr']:g} | {r['batch_size']} | "
            f"{r['held_out_w2_before']:.3f} → {r['held_out_w2_after']:.3f} | "
            f"{r['held_out_rel_change']:+.0%} | "
            f"{r['held_out_w2_early_after']:.3f} | {r['movement_early']:.2f} / {r['movement_all']:.1f} |"
        )
    return (
        "\n".join(lines) + f"\n\n{d['pipeline']}, {d['n_modules']} UNet norms ({len(d['early_modules'])} "
        f"prompt-blind), {d['runs'][0]['steps']} steps, held-out: {d['held_out']['samples']} samples "
        f"({res.link('diffusion-crn-cpu.json')})."
    )


def dsas_token(res: Results) -> str:
    d = res("dsas-token-cpu.json")
    lines = [
        "| row | λ | mean toxicity p (× lower) | toxic | PPL (Δ) | mean gate opening wiki / prompts |",
        "|---|---|---|---|---|---|",
    ]
    base = d["rows"][0]
    for r in d["rows"]:
        lower = base["toxicity_mean_prob"] / r["toxicity_mean_prob"]
        lines.append(
            f"| {r['name']} | {r['strength']:g} | {r['toxicity_mean_prob']:.3f} ({lower:.1f}×) | "
            f"{r['toxicity_rate']:.0%} | {r['perplexity']:.2f} "
            f"({_pct(r['perplexity'] / base['perplexity'] - 1)}) | "
            f"{r['opening_wiki']:.3f} / {r['opening_prompts']:.3f} |"
        )
    s = d["steering"]
    return (
        "\n".join(lines)
        + f"\n\n{d['model']}; maps: {s['steps']} {s['optimizer']} steps at lr {s['lr']:g} on "
        f"{s['n_source']} + {s['n_target']} sentences; {d['n_prompts']} prompts, {d['n_wiki']} Wikipedia "
        f"extracts ({res.link('dsas-token-cpu.json')})."
    )


def activation_scale(res: Results) -> str:
    d = res("activation-scale-cpu.json")
    lines = ["| model | modules | RMS, mean over modules | min – max |", "|---|---|---|---|"]
    for key in ("smollm2", "gemma3"):
        m = d[key]
        lines.append(
            f"| {MODEL_NAMES[key]} | `{m['modules']}` | {m['rms_mean_over_layers']:.2f} | "
            f"{m['rms_min']:.2f} – {m['rms_max']:.2f} |"
        )
    return (
        "\n".join(lines) + f"\n\nGemma-3 / SmolLM2: {d['ratio_gemma3_to_smollm2']:.1f}× "
        f"({res.link('activation-scale-cpu.json')})."
    )


def judge_pools(res: Results) -> str:
    d = res("judge-pools-cpu.json")
    lines = [
        "| texts | n | mean toxicity p | toxic (p ≥ 0.5) | median p | share below 0.5 |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in d["pools"].items():
        lines.append(
            f"| {name} | {p['n']} | {p['mean_prob']:.3f} | {p['toxic_rate']:.1%} | {p['median_prob']:.3f} | "
            f"{p['share_below_0.5']:.0%} |"
        )
    return "\n".join(lines) + f"\n\n({res.link('judge-pools-cpu.json')}, `python bench/judge_pools.py`)"


def comment_perplexity(name: str) -> Callable[[Results], str]:
    """The rows chosen on validation: toxicity, Wikipedia perplexity and the perplexity on held-out
    non-toxic comments, each as a ratio to the unsteered model with its interval."""

    def table(res: Results) -> str:
        f = f"comment-perplexity-{name}.json"
        d = res(f)
        show = lambda ci, k: f"×{ci['mean']:.{k}f} [{ci['low']:.{k}f}, {ci['high']:.{k}f}]"  # noqa: E731
        lines = [
            "| recipe (λ chosen on validation) | λ | mean toxicity × | Wikipedia PPL × | comments PPL × |",
            "|---|---|---|---|---|",
        ]
        for r in d["rows"]:
            lam = "–" if r["method"] == "prompting" else "/".join(f"{x:g}" for x in r["chosen_strengths"])
            lines.append(
                f"| {r['label']} | {lam} | {show(r['toxicity_mean_prob_ratio'], 2)} | "
                f"{show(r['wikipedia_perplexity_ratio'], 3)} | {show(r['comment_perplexity_ratio'], 3)} |"
            )
        base = d["unsteered"]["perplexity"]["mean"]
        return "\n".join(lines) + (
            f"\n\n{d['comments']['n']} comments ({d['comments']['source']}), unsteered perplexity "
            f"{base:.1f} ({res.link(f)}, `python bench/comment_perplexity.py SWEEP_DIR {name}`)"
        )

    return table


def kernel_resources(res: Results) -> str:
    lines = ["| report | triton | builds | configurations | archs | failures | over budget or spilling |"]
    lines.append("|---|---|---|---|---|---|---|")
    for name in ("kernel-resources.json", "kernel-resources-triton3.6.json"):
        d = res(name)
        configs = {k["config"] for k in d["kernels"]}
        bad = sum(1 for k in d["kernels"] if k.get("problems"))
        lines.append(
            f"| {res.link(name)} | {d['triton']} | {len(d['kernels'])} | {len(configs)} | "
            f"{', '.join(str(a) for a in d['archs'])} | {len(d['failures'])} | {bad} |"
        )
    return "\n".join(lines)


def bench_kernels_cpu(res: Results) -> str:
    d = res("bench-kernels-cpu.json")
    lines = ["| benchmark | median ms |", "|---|---|"]
    lines += [f"| `{b['name']}` | {b['stats']['median'] * 1e3:.2f} |" for b in d["benchmarks"]]
    return (
        "\n".join(lines)
        + f"\n\n({res.link('bench-kernels-cpu.json')}; both providers run PyTorch code on CPU)."
    )


def roofline(res: Results) -> str:
    import roofline as rl

    d = res("kernel-resources.json")
    return (
        f"Static estimates from {res.link('kernel-resources.json')} "
        f"(triton {d['triton']}, {d.get('date', '?')}); "
        f"not measurements.\n\n" + rl.table(d)
    )


def gpu_devices(folder: str) -> list[str]:
    """Devices with a GPU result file (kernels-, trainer- or generation-<device>.json, not cpu)."""
    found = set()
    for path in glob.glob(os.path.join(folder, "*.json")):
        m = re.match(r"(kernels|trainer|generation)-(.+)\.json$", os.path.basename(path))
        if m and m.group(2) != "cpu":
            found.add(m.group(2))
    return sorted(found)


def gpu(res: Results) -> str:
    import gpu_report

    devices = gpu_devices(res.folder)
    if not devices:
        return (
            "No GPU result file in `bench/results` yet (`kernels-<device>.json`, `trainer-<device>.json`, "
            "`generation-<device>.json`): the GPU targets are not measured."
        )
    return "\n\n".join(
        f"**{dev}**\n\n" + gpu_report.markdown(gpu_report.report(dev, res.folder)) for dev in devices
    )


def headline(res: Results) -> str:
    lines = ["| what | measured | file |", "|---|---|---|", *_interval_headline(res)]
    for key, model in MODEL_NAMES.items():
        data = res(f"quality-{key}.json")
        q = _ratio_row(data, data["best"])
        r, b = q["row"], q["base"]
        lines.append(
            f"| steering quality, one draw, greedy, {model} (λ = {r['strength']:g}, 200 prompts) | "
            f"mean toxicity "
            f"{b['toxicity_mean_prob']:.3f} → {r['toxicity_mean_prob']:.3f} "
            f"(**{q['tox_factor']:.1f}× lower**) "
            f"at {q['ppl_change']:+.1%} perplexity | {res.link(f'quality-{key}.json')} |"
        )
    t = res("trainer-cpu.json")["runs"][0]
    lines.append(
        "| one training step, real SmolLM2 on CPU, vs a reference-style trainer | "
        f"{t['lineas_median_s']:.2f} vs "
        f"{t['reference_median_s']:.2f} s/step (**{t['speedup']:.2f}×**) | {res.link('trainer-cpu.json')} |"
    )
    d = res("demo-smollm2-cpu.json")
    lines.append(
        f"| `lineas-fast demo`, CPU | {d['wall_clock'].split(' (')[0]} wall clock, "
        f"{d['peak_rss_GiB']:.1f} GiB; "
        f"{demo_effect(res)} | {res.link('demo-smollm2-cpu.json')} |"
    )
    g = res("generation-cpu.json")["results"]
    folded = next(r for r in g if r["provider"] == "folded")
    lines.append(
        f"| folded checkpoint vs unsteered, decode | {_provider_range(g, 'folded')} of unsteered speed on a "
        f"CPU; the same graph ({folded['aten_ops_per_forward']} ATen ops per forward) | "
        f"{res.link('generation-cpu.json')} |"
    )
    lines.append(
        "| GPU kernels, trainer, generation | "
        f"{'see docs/benchmarks.md' if gpu_devices(res.folder) else 'not measured yet'}"
        " | `bench/results/*-<device>.json` |"
    )
    return "\n".join(lines)


TABLES: dict[str, Callable[[Results], str]] = {
    "headline": headline,
    "demo": demo,
    "demo-effect": demo_effect,
    "quality-smollm2": quality_table("smollm2"),
    "quality-gemma3": quality_table("gemma3"),
    "quality-target": quality_target,
    "quality-smollm2-draws": quality_table("smollm2-draws"),
    "quality-goal-smollm2": quality_goal("smollm2-draws"),
    "sweep-cost": sweep_cost,
    "trainer": trainer,
    "generation": generation,
    "generation-summary": generation_summary,
    "serving": serving,
    "per-request": per_request,
    "slot-op": slot_op,
    "fsdp-memory": fsdp_memory,
    "diffusion": diffusion,
    "diffusion-crn": diffusion_crn,
    "dsas-token": dsas_token,
    "activation-scale": activation_scale,
    "judge-pools": judge_pools,
    "comment-perplexity-smollm2": comment_perplexity("smollm2-draws"),
    "kernel-resources": kernel_resources,
    "bench-kernels-cpu": bench_kernels_cpu,
    "roofline": roofline,
    "gpu": gpu,
}

# Figures quoted in prose that come from no result file: (page, figure) -> where the figure comes from.
_LR_PROBE = "a short learning-rate probe on SmolLM2 (loss over the first steps), not kept in a result file"
NOT_FROM_FILES = {
    ("docs/folding-and-serving.md", "71.4%"): "tests/serving/test_llama_cpp.py prints it: greedy agreement, "
    "unsteered GGUF vs transformers",
    ("docs/folding-and-serving.md", "92.2%"): "tests/serving/test_llama_cpp.py prints it: greedy agreement, "
    "steered GGUF vs transformers with hooks",
    (
        "docs/kernels.md",
        "2.5e-4",
    ): "tests/interpret: the loss kernel's fp16-input gradient error under loss scaling",
    ("docs/kernels.md", "0.13"): "the same check on the former fp16 gradient (767 of 2048 entries were 0)",
    ("docs/training.md", "7%"): _LR_PROBE,
    ("docs/training.md", "53%"): _LR_PROBE,
    ("docs/quality-and-sweeps.md", "0.037"): _LR_PROBE,
    ("docs/quality-and-sweeps.md", "0.068"): _LR_PROBE,
    ("docs/quality-and-sweeps.md", "−60%"): _LR_PROBE,
    ("docs/quality-and-sweeps.md", "−54%"): _LR_PROBE,
    ("docs/quality-and-sweeps.md", "−7%"): _LR_PROBE,
    ("docs/benchmarks.md", "82%"): "a torch.profiler profile of one lf.train step, not kept in a result file",
    ("docs/benchmarks.md", "~7%"): "the same profile",
    ("docs/benchmarks.md", "~9%"): "the same profile",
    ("docs/benchmarks.md", "1%"): "the same profile (sort, loss and optimizer < 1%)",
}

# Pages whose prose is not checked for figures, and why (their tables are still generated).
PROSE_EXEMPT = {
    "bench/ROOFLINE.md": "static estimates: its prose derives ratios from the generated table and quotes "
    "datasheet constants (bandwidths, SM counts, clocks), none of them measured",
}


# --- regions ---------------------------------------------------------------------------------------
def pages(root: str = ROOT) -> list[str]:
    """Paths (relative to root) of the pages that may hold generated regions."""
    out = []
    for pattern in PAGE_GLOBS:
        out += sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, pattern)))
    return out


def render(name: str, page: str, folder: str) -> str:
    """The text of region NAME on PAGE (relative to the repository), generated from FOLDER's files."""
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r} (known: {', '.join(TABLES)})")
    return TABLES[name](Results(folder, os.path.dirname(page)))


def _region_text(name: str, page: str, folder: str, inline: bool) -> str:
    text = render(name, page, folder)
    return text if inline else f"\n{text}\n"


def refresh(text: str, page: str, folder: str) -> str:
    """TEXT with every region regenerated."""

    def sub(m: re.Match) -> str:
        name, body = m.group(1), m.group(2)
        new = _region_text(name, page, folder, inline="\n" not in body)
        return f"<!-- tables:{name} -->{new}<!-- /tables:{name} -->"

    return REGION.sub(sub, text)


def stale(root: str = ROOT, folder: str | None = None) -> list[str]:
    """One line per problem: a region that differs from its files, an unknown or unclosed region."""
    folder = folder or os.path.join(root, "bench", "results")
    problems = []
    for page in pages(root):
        with open(os.path.join(root, page), encoding="utf-8") as f:
            text = f.read()
        closed = {m.start() for m in REGION.finditer(text)}
        for m in OPEN_MARK.finditer(text):
            if m.start() not in closed:
                problems.append(f"{page}: region {m.group(1)!r} has no closing <!-- /tables:{m.group(1)} -->")
        for m in REGION.finditer(text):
            name, body = m.group(1), m.group(2)
            line = text.count("\n", 0, m.start()) + 1
            if name not in TABLES:
                problems.append(f"{page}:{line}: unknown table {name!r}")
            elif body != _region_text(name, page, folder, inline="\n" not in body):
                problems.append(
                    f"{page}:{line}: region {name!r} differs from bench/results (run bench/tables.py)"
                )
    return problems


def write(root: str = ROOT, folder: str | None = None) -> list[str]:
    """Regenerate every region in place; the pages changed."""
    folder = folder or os.path.join(root, "bench", "results")
    changed = []
    for page in pages(root):
        path = os.path.join(root, page)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = refresh(text, page, folder)
        if new != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
            changed.append(page)
    return changed


# --- figures in prose ------------------------------------------------------------------------------
FIGURE = re.compile(
    r"(?<![\w.])\d+(?:\.\d+)?\s(?:s/step|tok/s|GiB|GB/s|GF/s|TFLOP|ms|µs)(?!\w)"  # timings, rates
    r"|(?<![\w.])[+−~-]?\d+(?:\.\d+)?(?:e-?\d+)?\s?(?:×|%)(?!\s?\d)"  # ratios, percentages (not 8192 × 3584)
    r"|(?<![\w.\-])\d+\.\d{2,}(?:e-?\d+)?(?![\w.])"  # decimals with 2+ places: 0.046, 14.96, 2.5e-4
)
CODE_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
COMMENT = re.compile(r"<!--.*?-->", re.S)


def _norm(s: str) -> str:
    return s.replace("−", "-").replace(" ", "")


def prose(text: str) -> str:
    """TEXT without generated regions, code, link targets and comments."""
    for pattern in (REGION, CODE_FENCE, COMMENT, CODE_SPAN, LINK_TARGET):
        text = pattern.sub(" ", text)
    return text


def untraced_figures(root: str = ROOT, allowed: dict | None = None) -> list[str]:
    """Measured-looking figures in prose that appear neither in a generated region of the same page
    nor in ALLOWED ((page, figure) keys; default NOT_FROM_FILES); one 'page: figure' line each. A
    figure right after ≥, ≤, < or > is a target or a bound, not a measurement, and is skipped."""
    allowed = NOT_FROM_FILES if allowed is None else allowed
    ok = {(page, _norm(fig)) for page, fig in allowed}
    problems = []
    for page in pages(root):
        if page in PROSE_EXEMPT:
            continue
        with open(os.path.join(root, page), encoding="utf-8") as f:
            text = f.read()
        generated = _norm(" ".join(m.group(2) for m in REGION.finditer(text)))
        body = prose(text)
        for m in FIGURE.finditer(body):
            if re.search(r"[≥≤<>]\s?$", body[max(0, m.start() - 2) : m.start()]):
                continue
            fig = _norm(m.group(0))
            unit = re.match(r"([\d.]+)(s/step|tok/s|GiB|GB/s|GF/s|TFLOP|ms|µs)$", fig)
            seen = (fig, fig.lstrip("+-~")) + ((unit.group(1),) if unit else ())
            if (page, fig) in ok or any(x in generated for x in seen):
                continue
            problems.append(f"{page}: {m.group(0).strip()}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 naming stale regions and untraced figures")
    ap.add_argument("--print", dest="name", metavar="NAME", help="print one table")
    args = ap.parse_args(argv)
    if args.name:
        print(render(args.name, "README.md", os.path.join(ROOT, "bench", "results")))
        return 0
    if args.check:
        problems = stale() + [f"{p} (not in a generated region)" for p in untraced_figures()]
        print("\n".join(problems) or "every generated region matches bench/results")
        return 1 if problems else 0
    for page in write():
        print(f"updated {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
