"""The command line's error contract: a bad input exits 2 with ONE line on stderr
(``lineas-fast <cmd>: error: ...``) naming the argument or file, no traceback, nothing written,
and, when the problem is visible without a model, no model loaded and no training run.

Sentence-file format rule (``lineas_fast.cli.common.read_sentences``), checked at the end: by
content, whatever the extension: a JSON array of records, else JSON lines when every non-blank
line is a record (a JSON string or an object with a string "text"), else an error when the name
ends in .json/.jsonl or a line is a JSON object, else plain text, one sentence per line verbatim.
"""

import json
import os
import shutil

import pytest
import torch
from tiny_models import SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf
from lineas_fast.cli import common as cli_io
from lineas_fast.cli import main
from lineas_fast.cli import train as cli_train

NORM = "model.layers.{}.post_attention_layernorm"
MODULES = r"model\.layers\.\d+\.post_attention_layernorm"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One tiny model folder, a fitting steering, a junk steering, a fake pipeline folder."""
    d = tmp_path_factory.mktemp("shared")
    model = tiny_model("llama")
    model.save_pretrained(d / "model")
    tiny_tokenizer().save_pretrained(d / "model")
    fp = lf.model_fingerprint(model)
    lf.Steering(
        {NORM.format(i): (torch.full((32,), 1.1), torch.zeros(32)) for i in range(3)}, metadata={"model": fp}
    ).save(str(d / "steer.safetensors"))
    lf.Steering({NORM.format(9): (torch.ones(32), torch.zeros(32))}, metadata={"model": fp}).save(
        str(d / "other.safetensors")
    )
    # a safetensors file with the steering marker but a malformed "modules" header
    from safetensors.torch import save_file

    save_file(
        {"x.omega": torch.ones(2), "x.bias": torch.zeros(2)},
        str(d / "bad-meta.safetensors"),
        metadata={"format": "lineas_fast.steering", "modules": "{not json"},
    )
    from tiny_pipeline import tiny_pipeline

    tiny_pipeline().save_pretrained(d / "realpipe")
    (d / "pipe").mkdir()
    (d / "pipe" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (d / "src.txt").write_text("\n".join(SOURCE) + "\n")
    (d / "tgt.txt").write_text("\n".join(TARGET) + "\n")
    torch.save(
        {
            "format": "lineas_fast.checkpoint",
            "step": 1,
            "config": {"steps": 999},
            "maps": {},
            "gates": {},
            "optimizer": {},
            "scheduler": {},
            "generator": None,
            "history": [],
        },
        d / "other-run.pt",
    )
    # model folders whose config.json and weights disagree (cli/loading.py)
    for name, edit in (
        ("extra", {"num_hidden_layers": 4}),  # one more layer than the weights: missing tensors
        ("fewer", {"num_hidden_layers": 2}),  # one layer fewer: unexpected tensors
        ("wide", {"intermediate_size": 96}),  # MLP of another shape: mismatched tensors
    ):
        shutil.copytree(d / "model", d / name)
        config = json.loads((d / name / "config.json").read_text())
        (d / name / "config.json").write_text(json.dumps({**config, **edit}))
    shutil.copytree(d / "realpipe", d / "pipeextra")
    config = json.loads((d / "pipeextra" / "text_encoder" / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (d / "pipeextra" / "text_encoder" / "config.json").write_text(json.dumps(config))
    return {
        k: str(d / v)
        for k, v in dict(
            extra="extra",
            fewer="fewer",
            wide="wide",
            pipeextra="pipeextra",
            model="model",
            steer="steer.safetensors",
            other="other.safetensors",
            badmeta="bad-meta.safetensors",
            pipe="pipe",
            realpipe="realpipe",
            src="src.txt",
            tgt="tgt.txt",
            otherrun="other-run.pt",
        ).items()
    }


TRAIN = "train --model {model} --source {src} --target {tgt} --modules " + MODULES
GEN = "generate --model {model} --steering {steer}"
FUSE = "fuse --model {model} --steering {steer}"
IMG = "generate-image --pipeline {pipe} --steering {steer} --prompt cat"
LONG = "x" * 200

# (id, command (str.format'ed, then split on spaces; "~" stands for a space in one argument),
#  files to create in tmp ({name: str or bytes}), substrings the error line must hold,
#  stage: "parse"/"early" = no model loaded and lf.train not called; "late" = after loading)
CASES = [
    # --- train: numbers --------------------------------------------------------------------------
    ("lr-nan", TRAIN + " --out {tmp}/o.st --lr nan", {}, ["--lr", "nan"], "parse"),
    ("lr-zero", TRAIN + " --out {tmp}/o.st --lr 0", {}, ["--lr", "> 0"], "parse"),
    ("lr-negative", TRAIN + " --out {tmp}/o.st --lr -0.1", {}, ["--lr", "-0.1"], "parse"),
    ("steps-negative", TRAIN + " --out {tmp}/o.st --steps -1", {}, ["--steps", "-1"], "parse"),
    ("batch-size-0", TRAIN + " --out {tmp}/o.st --batch-size 0", {}, ["--batch-size", "'0'"], "parse"),
    ("sparsity-negative", TRAIN + " --out {tmp}/o.st --sparsity -1", {}, ["--sparsity"], "parse"),
    ("sparsity-nan", TRAIN + " --out {tmp}/o.st --sparsity nan", {}, ["--sparsity", "nan"], "parse"),
    ("max-length-0", TRAIN + " --out {tmp}/o.st --max-length 0", {}, ["--max-length"], "parse"),
    (
        "max-length-over-positions",
        TRAIN + " --out {tmp}/o.st --max-length 1000",
        {},
        ["--max-length 1000", "max_position_embeddings=128"],
        "early",
    ),
    ("steps-not-int", TRAIN + " --out {tmp}/o.st --steps 2.5", {}, ["--steps", "invalid int"], "parse"),
    (
        "bad-regex",
        "train --model {model} --source {src} --target {tgt} --modules ( --out {tmp}/o.st",
        {},
        ["--modules", "regular expression"],
        "parse",
    ),
    ("timestep-with-model", TRAIN + " --out {tmp}/o.st --timestep 5", {}, ["--timestep"], "early"),
    # --- train: checkpoints ----------------------------------------------------------------------
    (
        "checkpoint-every-alone",
        TRAIN + " --out {tmp}/o.st --checkpoint-every 5",
        {},
        ["--checkpoint-every 5", "--checkpoint FILE"],
        "early",
    ),
    (
        "checkpoint-alone",
        TRAIN + " --out {tmp}/o.st --checkpoint {tmp}/ck.pt",
        {},
        ["--checkpoint", "--checkpoint-every"],
        "early",
    ),
    (
        "checkpoint-is-folder",
        TRAIN + " --out {tmp}/o.st --checkpoint {tmp} --checkpoint-every 1",
        {},
        ["--checkpoint", "folder"],
        "early",
    ),
    (
        "resume-missing",
        TRAIN + " --out {tmp}/o.st --resume {tmp}/nope.pt",
        {},
        ["--resume", "nope.pt", "does not exist"],
        "early",
    ),
    (
        "resume-a-steering",
        TRAIN + " --out {tmp}/o.st --resume {steer}",
        {},
        ["--resume", "steer.safetensors", "not a lineas-fast training checkpoint"],
        "early",
    ),
    (
        "resume-other-settings",
        TRAIN + " --out {tmp}/o.st --resume {otherrun}",
        {},
        ["--resume", "other-run.pt", "steps"],
        "early",
    ),
    # --- train: sentence files -------------------------------------------------------------------
    (
        "source-missing",
        "train --model {model} --source {tmp}/nope.txt --target {tgt} --out {tmp}/o.st",
        {},
        ["--source", "nope.txt", "does not exist"],
        "early",
    ),
    (
        "source-empty",
        "train --model {model} --source {tmp}/e.txt --target {tgt} --out {tmp}/o.st",
        {"e.txt": ""},
        ["--source", "e.txt", "no sentences"],
        "early",
    ),
    (
        "source-blank-lines",
        "train --model {model} --source {tmp}/b.txt --target {tgt} --out {tmp}/o.st",
        {"b.txt": "\n  \n\t\n"},
        ["--source", "b.txt", "no sentences"],
        "early",
    ),
    (
        "source-not-utf8",
        "train --model {model} --source {tmp}/l1.txt --target {tgt} --out {tmp}/o.st",
        {"l1.txt": b"caf\xe9 au lait\nhello\n"},
        ["--source", "l1.txt", "UTF-8", "offset 3"],
        "early",
    ),
    (
        "jsonl-bad-line",
        "train --model {model} --source {src} --target {tmp}/t.jsonl --out {tmp}/o.st",
        {"t.jsonl": '{"text": "a"}\nnot json\n'},
        ["--target", "t.jsonl:2", "not valid JSON"],
        "early",
    ),
    (
        "json-broken-array",
        "train --model {model} --source {tmp}/s.json --target {tgt} --out {tmp}/o.st",
        {"s.json": '[\n "a",\n "b"\n "c"\n]\n'},
        ["--source", "s.json:4", "not valid JSON"],
        "early",
    ),
    (
        "jsonl-other-key-in-txt",
        "train --model {model} --source {tmp}/k.txt --target {tgt} --out {tmp}/o.st",
        {"k.txt": '{"sentence": "a"}\n{"sentence": "b"}\n'},
        ["--source", "k.txt:1", '"text"'],
        "early",
    ),
    (
        "jsonl-empty-text",
        "train --model {model} --source {tmp}/s.jsonl --target {tgt} --out {tmp}/o.st",
        {"s.jsonl": '{"text": "a"}\n{"text": " "}\n'},
        ["--source", "s.jsonl:2", "empty"],
        "early",
    ),
    (
        "source-is-folder",
        "train --model {model} --source {tmp} --target {tgt} --out {tmp}/o.st",
        {},
        ["--source", "folder"],
        "early",
    ),
    (
        "source-binary",
        "train --model {model} --source {steer} --target {tgt} --out {tmp}/o.st",
        {},
        ["--source", "steer.safetensors"],
        "early",
    ),
    # --- train: outputs and folders --------------------------------------------------------------
    ("out-is-folder", TRAIN + " --out {tmp}", {}, ["--out", "folder"], "early"),
    (
        "out-under-a-file",
        TRAIN + " --out {tmp}/f.txt/o.st",
        {"f.txt": "x"},
        ["--out", "f.txt", "is a file"],
        "early",
    ),
    ("out-is-source", TRAIN + " --out {src}", {}, ["--out", "--source"], "early"),
    (
        "model-missing",
        "train --model {tmp}/nomodel --source {src} --target {tgt} --out {tmp}/o.st",
        {},
        ["--model", "nomodel", "does not exist"],
        "early",
    ),
    (
        "model-not-a-model",
        "train --model {tmp}/empty --source {src} --target {tgt} --out {tmp}/o.st",
        {"empty/.keep": ""},
        ["--model", "empty", "config.json"],
        "early",
    ),
    (
        "model-is-a-pipeline",
        "train --model {pipe} --source {src} --target {tgt} --out {tmp}/o.st",
        {},
        ["--model", "pipe", "--pipeline"],
        "early",
    ),
    (
        "pipeline-is-a-model",
        "train --pipeline {model} --source {src} --target {tgt} --out {tmp}/o.st",
        {},
        ["--pipeline", "model", "--model"],
        "early",
    ),
    (
        "model-and-pipeline",
        "train --model {model} --pipeline {pipe} --source {src} --target {tgt} --out {tmp}/o.st",
        {},
        ["--model", "--pipeline", "both"],
        "early",
    ),
    (
        "neither-model-nor-pipeline",
        "train --source {src} --target {tgt} --out {tmp}/o.st",
        {},
        ["--model", "--pipeline", "neither"],
        "early",
    ),
    ("missing-required", "train --model {model} --source {src}", {}, ["--target", "--out"], "parse"),
    ("seed-negative", TRAIN + " --out {tmp}/o.st --seed -1", {}, ["--seed", "-1"], "parse"),
    ("out-empty", TRAIN + " --out ", {}, ["--out", "''"], "early"),
    (
        "model-empty",
        "train --model  --source {src} --target {tgt} --out {tmp}/o.st",
        {},
        ["--model", "''"],
        "early",
    ),
    (
        "source-not-a-regular-file",
        "train --model {model} --source /dev/null --target {tgt} --out {tmp}/o.st",
        {},
        ["--source", "/dev/null", "regular file"],
        "early",
    ),
    (
        "json-array-of-numbers",
        "train --model {model} --source {tmp}/n.json --target {tgt} --out {tmp}/o.st",
        {"n.json": "[1, 2, 3]"},
        ["--source", "n.json", "item 0"],
        "early",
    ),
    (
        "jsonl-in-txt-with-a-plain-line",
        "train --model {model} --source {tmp}/m.txt --target {tgt} --out {tmp}/o.st",
        {"m.txt": '{"text": "a"}\n{"text": "b"}\nplain words\n'},
        ["--source", "m.txt:3", "not valid JSON"],
        "early",
    ),
    (
        "checkpoint-is-out",
        TRAIN + " --out {tmp}/o.st --checkpoint {tmp}/o.st --checkpoint-every 1",
        {},
        ["--checkpoint", "--out"],
        "early",
    ),
    ("resume-is-folder", TRAIN + " --out {tmp}/o.st --resume {tmp}", {}, ["--resume", "folder"], "early"),
    (
        "pipeline-timestep-out-of-range",
        "train --pipeline {realpipe} --source {src} --target {tgt} --timestep 5000 --out {tmp}/o.st",
        {},
        ["--timestep 5000", "[0, 1000)"],
        "early",
    ),
    (
        "pipeline-with-max-length",
        "train --pipeline {realpipe} --source {src} --target {tgt} --max-length 8 --out {tmp}/o.st",
        {},
        ["--max-length"],
        "early",
    ),
    (
        "pipeline-broken",
        "train --pipeline {pipe} --source {src} --target {tgt} --out {tmp}/o.st",
        {},
        ["--pipeline", "pipe", "cannot load"],
        "late",
    ),
    (
        "modules-match-nothing",
        "train --model {model} --source {src} --target {tgt} --modules "
        r"nothing\..* --out {tmp}/o.st",
        {},
        ["--modules", "matches no module"],
        "late",
    ),
    (
        "loss-before-maps",
        "train --model {model} --source {src} --target {tgt} --modules "
        "model.layers.2.post_attention_layernorm --loss-modules model.layers.0.input_layernorm "
        "--steps 1 --out {tmp}/o.st",
        {},
        ["--loss-modules", "before"],
        "late",
    ),
    # --- generate --------------------------------------------------------------------------------
    ("gen-strength-nan", GEN + " --prompt hi --strength nan", {}, ["--strength", "nan"], "parse"),
    ("gen-strength-inf", GEN + " --prompt hi --strength inf", {}, ["--strength", "inf"], "parse"),
    ("gen-temperature-negative", GEN + " --prompt hi --temperature -1", {}, ["--temperature"], "parse"),
    ("gen-max-new-tokens-0", GEN + " --prompt hi --max-new-tokens 0", {}, ["--max-new-tokens"], "parse"),
    ("gen-empty-prompt", GEN + " --prompt ", {}, ["--prompt", "''"], "parse"),
    ("gen-blank-prompt", GEN + " --prompt ~~", {}, ["--prompt"], "parse"),
    ("gen-no-prompt", GEN, {}, ["--prompt", "--prompts-file"], "early"),
    (
        "gen-prompts-file-empty",
        GEN + " --prompts-file {tmp}/p.txt",
        {"p.txt": "\n"},
        ["--prompts-file", "p.txt"],
        "early",
    ),
    (
        "gen-steering-missing",
        "generate --model {model} --steering {tmp}/no.safetensors --prompt hi",
        {},
        ["--steering", "no.safetensors", "does not exist"],
        "early",
    ),
    (
        "gen-steering-junk",
        "generate --model {model} --steering {src} --prompt hi",
        {},
        ["--steering", "src.txt"],
        "early",
    ),
    (
        "gen-steering-bad-metadata",
        "generate --model {model} --steering {badmeta} --prompt hi",
        {},
        ["--steering", "bad-meta.safetensors"],
        "early",
    ),
    (
        "gen-prompt-too-long",
        GEN + " --prompt " + LONG,
        {},
        ["--prompt 1", "max_position_embeddings=128"],
        "early",
    ),
    (
        "gen-too-many-new-tokens",
        GEN + " --prompt hi --max-new-tokens 500",
        {},
        ["--max-new-tokens 500", "max_position_embeddings=128"],
        "early",
    ),
    (
        "gen-steering-other-model",
        "generate --model {model} --steering {other} --prompt hi",
        {},
        ["--steering", "other.safetensors", "--model"],
        "late",
    ),
    (
        "gen-steering-is-folder",
        "generate --model {model} --steering {tmp} --prompt hi",
        {},
        ["--steering", "folder"],
        "early",
    ),
    (
        "gen-prompts-file-not-utf8",
        GEN + " --prompts-file {tmp}/p.txt",
        {"p.txt": b"ok\n\xff\n"},
        ["--prompts-file", "p.txt", "offset 3"],
        "early",
    ),
    # --- fuse ------------------------------------------------------------------------------------
    ("fuse-strength-nan", FUSE + " --out {tmp}/fused --strength nan", {}, ["--strength", "nan"], "parse"),
    ("fuse-out-is-file", FUSE + " --out {tmp}/f.txt", {"f.txt": "x"}, ["--out", "f.txt", "file"], "early"),
    (
        "fuse-out-not-empty",
        FUSE + " --out {tmp}/full",
        {"full/a": "x"},
        ["--out", "full", "--overwrite"],
        "early",
    ),
    ("fuse-out-is-model", FUSE + " --out {model} --overwrite", {}, ["--out", "--model"], "early"),
    ("fuse-neither", "fuse --steering {steer} --out {tmp}/fused", {}, ["--model", "--pipeline"], "early"),
    (
        "fuse-steering-junk",
        "fuse --model {model} --steering {src} --out {tmp}/fused",
        {},
        ["--steering", "src.txt"],
        "early",
    ),
    (
        "fuse-llama-steering-into-pipeline",
        "fuse --pipeline {realpipe} --steering {steer} --out {tmp}/fused",
        {},
        ["--steering", "--pipeline", "does not fit"],
        "late",
    ),
    # --- generate-image --------------------------------------------------------------------------
    ("img-strengths-nan", IMG + " --strengths 0 nan --out {tmp}/g.png", {}, ["--strengths", "nan"], "parse"),
    ("img-steps-0", IMG + " --steps 0 --out {tmp}/g.png", {}, ["--steps", "'0'"], "parse"),
    ("img-steps-negative", IMG + " --steps -3 --out {tmp}/g.png", {}, ["--steps", "-3"], "parse"),
    ("img-guidance-nan", IMG + " --guidance nan --out {tmp}/g.png", {}, ["--guidance"], "parse"),
    (
        "img-empty-prompt",
        "generate-image --pipeline {pipe} --steering {steer} --prompt  --out {tmp}/g.png",
        {},
        ["--prompt"],
        "parse",
    ),
    ("img-out-is-folder", IMG + " --out {tmp}", {}, ["--out", "folder"], "early"),
    ("img-out-not-png", IMG + " --out {tmp}/g.jpg", {}, ["--out", "g.jpg", ".png"], "early"),
    ("img-out-under-file", IMG + " --out {tmp}/f.txt/g.png", {"f.txt": "x"}, ["--out", "f.txt"], "early"),
    (
        "img-pipeline-missing",
        "generate-image --pipeline {tmp}/nopipe --steering {steer} --prompt a --out {tmp}/g.png",
        {},
        ["--pipeline", "nopipe"],
        "early",
    ),
    (
        "img-pipeline-is-model",
        "generate-image --pipeline {model} --steering {steer} --prompt a --out {tmp}/g.png",
        {},
        ["--pipeline", "--model"],
        "early",
    ),
    (
        "img-steering-other-model",
        "generate-image --pipeline {realpipe} --steering {steer} --prompt a --steps 1 --out {tmp}/g.png",
        {},
        ["--steering", "--pipeline", "does not fit"],
        "late",
    ),
    # --- demo and the top level ------------------------------------------------------------------
    ("demo-steps-0", "demo --steps 0 --out {tmp}/demo", {}, ["--steps"], "parse"),
    ("demo-lr-0", "demo --lr 0 --out {tmp}/demo", {}, ["--lr"], "parse"),
    ("demo-strengths-nan", "demo --strengths 0 nan --out {tmp}/demo", {}, ["--strengths"], "parse"),
    ("demo-out-is-file", "demo --out {tmp}/f.txt", {"f.txt": "x"}, ["--out", "f.txt"], "early"),
    ("unknown-command", "bogus", {}, ["bogus"], "parse"),
    # --- inputs are never outputs (by resolved path: symlinks followed, hard links compared) -----
    (
        "train-out-is-model-weights",
        TRAIN + " --out {model}/model.safetensors",
        {},
        ["--out", "model.safetensors", "--model"],
        "early",
    ),
    (
        "train-checkpoint-is-model-tokenizer",
        TRAIN + " --out {tmp}/o.st --checkpoint {model}/tokenizer.json --checkpoint-every 1",
        {},
        ["--checkpoint", "tokenizer.json", "--model"],
        "early",
    ),
    (
        "train-out-new-file-in-model",
        TRAIN + " --out {model}/new.st",
        {},
        ["--out", "new.st", "--model"],
        "early",
    ),
    (
        "train-out-symlink-to-model-file",
        TRAIN + " --out {tmp}/link.st",
        {"link.st": ("link", "{model}/model.safetensors")},
        ["--out", "link.st", "resolved", "--model"],
        "early",
    ),
    (
        "train-out-under-symlinked-model",
        TRAIN + " --out {tmp}/mdir/x.st",
        {"mdir": ("link", "{model}")},
        ["--out", "mdir/x.st", "resolved", "--model"],
        "early",
    ),
    (
        "train-out-hard-link-of-model-file",
        TRAIN + " --out {tmp}/hard.st",
        {"hard.st": ("hardlink", "{model}/model.safetensors")},
        ["--out", "hard.st", "--model"],
        "early",
    ),
    ("train-out-is-target", TRAIN + " --out {tgt}", {}, ["--out", "tgt.txt", "--target"], "early"),
    (
        "train-out-in-pipeline",
        "train --pipeline {realpipe} --source {src} --target {tgt} --out {realpipe}/unet/x.st",
        {},
        ["--out", "x.st", "--pipeline"],
        "early",
    ),
    (
        "bench-out-is-model-config",
        "bench --model {model} --steering {steer} --out {model}/config.json",
        {},
        ["--out", "config.json", "--model"],
        "early",
    ),
    ("fuse-out-inside-model", FUSE + " --out {model}/fused", {}, ["--out", "fused", "--model"], "early"),
    ("fuse-out-is-steering", FUSE + " --out {steer} --overwrite", {}, ["--out", "--steering"], "early"),
    ("img-out-in-pipeline", IMG + " --out {pipe}/g.png", {}, ["--out", "g.png", "--pipeline"], "early"),
    (
        "gguf-out-is-gguf",
        "fuse --gguf {tmp}/m.gguf --steering {steer} --out {tmp}/m.gguf --overwrite",
        {"m.gguf": b"GGUF\x03\x00\x00\x00"},
        ["--out", "m.gguf", "--gguf"],
        "early",
    ),
    ("sweep-out-is-model", "sweep --model {model} --out {model}", {}, ["--out", "--model"], "early"),
    # --- model folders load completely or not at all ---------------------------------------------
    (
        "train-model-extra-layer",
        "train --model {extra} --source {src} --target {tgt} --modules " + MODULES + " --out {tmp}/o.st",
        {},
        ["--model", "extra", "model.layers.3.mlp.down_proj.weight", "missing", "--allow-missing-weights"],
        "late",
    ),
    (
        "gen-model-extra-layer",
        "generate --model {extra} --steering {steer} --prompt hi",
        {},
        ["--model", "model.layers.3.", "missing"],
        "late",
    ),
    (
        "fuse-model-extra-layer",
        "fuse --model {extra} --steering {steer} --out {tmp}/f",
        {},
        ["--model", "model.layers.3.", "missing"],
        "late",
    ),
    (
        "bench-model-extra-layer",
        "bench --model {extra} --steering {steer} --out {tmp}/b.json",
        {},
        ["--model", "model.layers.3.", "missing"],
        "late",
    ),
    (
        "train-model-unexpected-tensors",
        "train --model {fewer} --source {src} --target {tgt} --out {tmp}/o.st",
        {},
        ["--model", "fewer", "model.layers.2.", "not in the model"],
        "late",
    ),
    (
        "train-model-mismatched-tensors",
        "train --model {wide} --source {src} --target {tgt} --out {tmp}/o.st",
        {},
        ["--model", "wide", "mlp.down_proj.weight", "another shape"],
        "late",
    ),
    (
        "train-pipeline-text-encoder-extra-layer",
        "train --pipeline {pipeextra} --source {src} --target {tgt} --out {tmp}/o.st",
        {},
        ["--pipeline", "pipeextra", "encoder.layers.", "missing"],
        "late",
    ),
    # --- negative numbers in every notation are numbers, then checked ----------------------------
    (
        "gen-strength-minus-inf",
        GEN + " --prompt hi --strength -inf",
        {},
        ["--strength", "'-inf'", "finite"],
        "parse",
    ),
    (
        "gen-strength-minus-nan",
        GEN + " --prompt hi --strength -nan",
        {},
        ["--strength", "'-nan'", "finite"],
        "parse",
    ),
    (
        "train-lr-minus-exponent",
        TRAIN + " --out {tmp}/o.st --lr -1e-3",
        {},
        ["--lr", "'-1e-3'", "> 0"],
        "parse",
    ),
    (
        "train-sparsity-minus-exponent",
        TRAIN + " --out {tmp}/o.st --sparsity -1E-2",
        {},
        ["--sparsity", "-1E-2"],
        "parse",
    ),
    (
        "gen-temperature-minus-trailing-dot",
        GEN + " --prompt hi --temperature -5.",
        {},
        ["--temperature", "-5."],
        "parse",
    ),
    (
        "img-strengths-minus-inf",
        IMG + " --strengths 0 -inf --out {tmp}/g.png",
        {},
        ["--strengths", "-inf"],
        "parse",
    ),
    (
        "img-guidance-minus-infinity",
        IMG + " --guidance -Infinity --out {tmp}/g.png",
        {},
        ["--guidance", "-Infinity"],
        "parse",
    ),
    (
        "train-seed-minus-exponent",
        TRAIN + " --out {tmp}/o.st --seed -1e3",
        {},
        ["--seed", "-1e3", "int"],
        "parse",
    ),
    ("fuse-strength-minus-inf", FUSE + " --out {tmp}/f --strength -inf", {}, ["--strength", "-inf"], "parse"),
    (
        "bench-strength-minus-inf",
        "bench --model {model} --steering {steer} --strength -inf --out {tmp}/b.json",
        {},
        ["--strength", "-inf"],
        "parse",
    ),
    # --- an option given twice, abbreviations -----------------------------------------------------
    (
        "gen-strength-twice",
        GEN + " --prompt hi --strength 1 --strength 2",
        {},
        ["--strength given twice"],
        "parse",
    ),
    ("train-out-twice", TRAIN + " --out {tmp}/a.st --out {tmp}/b.st", {}, ["--out given twice"], "parse"),
    (
        "train-modules-twice",
        TRAIN + " --modules=.*norm --out {tmp}/o.st",
        {},
        ["--modules given twice"],
        "parse",
    ),
    (
        "fuse-no-strict-twice",
        FUSE + " --out {tmp}/f --no-strict --no-strict",
        {},
        ["--no-strict given twice"],
        "parse",
    ),
    (
        "img-strengths-twice",
        IMG + " --strengths 0 1 --strengths 2 --out {tmp}/g.png",
        {},
        ["--strengths given twice"],
        "parse",
    ),
    (
        "bench-batch-twice",
        "bench --model {model} --steering {steer} --batch 1 --batch 2 --out {tmp}/b.json",
        {},
        ["--batch given twice"],
        "parse",
    ),
    ("gen-no-is-not-no-strict", GEN + " --prompt hi --no", {}, ["unrecognized arguments: --no"], "parse"),
    (
        "fuse-overwrite-abbreviated",
        FUSE + " --out {tmp}/f --over",
        {},
        ["unrecognized arguments: --over"],
        "parse",
    ),
    (
        "train-steps-abbreviated",
        TRAIN + " --out {tmp}/o.st --step 3",
        {},
        ["unrecognized arguments: --step"],
        "parse",
    ),
    # --- --out - ----------------------------------------------------------------------------------
    ("train-out-stdout", TRAIN + " --out -", {}, ["--out '-'", "standard output"], "early"),
    (
        "train-checkpoint-stdout",
        TRAIN + " --out {tmp}/o.st --checkpoint - --checkpoint-every 1",
        {},
        ["--checkpoint '-'", "standard output"],
        "early",
    ),
    ("fuse-out-stdout", FUSE + " --out -", {}, ["--out '-'", "standard output"], "early"),
    ("bench-out-stdout", "bench --model {model} --steering {steer} --out -", {}, ["--out '-'"], "early"),
    ("img-out-stdout", IMG + " --out -", {}, ["--out '-'"], "early"),
    ("demo-out-stdout", "demo --out -", {}, ["--out '-'"], "early"),
    # --- module regexes that could backtrack for hours --------------------------------------------
    (
        "train-modules-alternation-under-star",
        "train --model {model} --source {src} --target {tgt} --modules (.|.)*Y --out {tmp}/o.st",
        {},
        ["--modules", "(.|.)*Y", "backtrack"],
        "parse",
    ),
    (
        "train-modules-nested-plus",
        "train --model {model} --source {src} --target {tgt} --modules (a+)+ --out {tmp}/o.st",
        {},
        ["--modules", "(a+)+", "repeat inside a repeat"],
        "parse",
    ),
    (
        "train-loss-modules-nested-star",
        TRAIN + " --loss-modules (x*)*y --out {tmp}/o.st",
        {},
        ["--loss-modules", "(x*)*y"],
        "parse",
    ),
    (
        "train-modules-many-wildcards",
        "train --model {model} --source {src} --target {tgt} --modules .*.*.*.*.*x --out {tmp}/o.st",
        {},
        ["--modules", "wildcards"],
        "parse",
    ),
    (
        "demo-modules-alternation-under-star",
        "demo --modules (.|.)*Y --out {tmp}/demo",
        {},
        ["--modules", "(.|.)*Y"],
        "parse",
    ),
    ("sweep-modules-nested", "sweep --modules (a+)+ --out {tmp}/sw", {}, ["--modules", "(a+)+"], "parse"),
    (
        "sweep-recipe-modules-nested",
        "sweep --recipes {tmp}/r.json --out {tmp}/sw",
        {"r.json": '[{"modules": "(a+)+"}]'},
        ["--recipes", "item 0", "(a+)+", "repeat inside a repeat"],
        "early",
    ),
    (
        "sweep-loss-modules-nested",
        "sweep --loss-modules (a+)+ --out {tmp}/sw",
        {},
        ["--loss-modules", "(a+)+"],
        "early",
    ),
]


@pytest.fixture
def spies(monkeypatch):
    """Count model loads and lf.train calls (each still runs)."""
    calls = {"load": 0, "train": 0}
    from transformers import AutoModelForCausalLM

    load_lm = AutoModelForCausalLM.from_pretrained

    def spy_lm(*a, **k):
        calls["load"] += 1
        return load_lm(*a, **k)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy_lm)
    try:
        from diffusers import DiffusionPipeline

        load_pipe = DiffusionPipeline.from_pretrained

        def spy_pipe(*a, **k):
            calls["load"] += 1
            return load_pipe(*a, **k)

        monkeypatch.setattr(DiffusionPipeline, "from_pretrained", spy_pipe)
    except ImportError:
        pass
    train = cli_train.train

    def spy_train(*a, **k):
        calls["train"] += 1
        return train(*a, **k)

    monkeypatch.setattr(cli_train, "train", spy_train)

    def no_download():
        raise AssertionError("demo reached its downloads")

    monkeypatch.setattr("lineas_fast.apps.assets.toxicity_judge", no_download)
    return calls


def snapshot(folder: str) -> dict:
    """{path: (size, mtime ns)} of every entry under ``folder``."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            out[os.path.join(root, name)] = (st.st_size, st.st_mtime_ns)
    return out


def run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("cmd,files,culprits,stage", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(cmd, files, culprits, stage, shared, tmp_path, spies, capsys):
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, tuple):  # ("link" | "hardlink", target)
            kind, target = content[0], content[1].format(tmp=tmp_path, **shared)
            (os.symlink if kind == "link" else os.link)(target, path)
        else:
            (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    before = {str(p) for p in tmp_path.rglob("*")}
    inputs_before = snapshot(os.path.dirname(shared["model"]))
    argv = [a.replace("~", " ") for a in cmd.format(tmp=tmp_path, **shared).split(" ")]
    rc, out, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    command = argv[0] if argv[0] != "bogus" else ""
    assert lines[0].startswith(f"lineas-fast {command}".rstrip() + ": error: "), lines[0]
    for c in culprits:
        assert c in lines[0], (c, lines[0])
    assert {str(p) for p in tmp_path.rglob("*")} == before  # nothing written
    assert snapshot(os.path.dirname(shared["model"])) == inputs_before  # no input touched
    if stage in ("parse", "early"):
        assert spies == {"load": 0, "train": 0}, "failed late: a model was loaded or trained"


# --- positive controls ----------------------------------------------------------------------------
def test_json_named_jsonl_trains_and_a_checkpoint_resumes(shared, tmp_path, capsys):
    tgt = tmp_path / "tgt.json"  # JSON lines under a .json name
    tgt.write_text("\n".join(json.dumps({"text": t}) for t in TARGET) + "\n")
    base = [
        "train",
        "--model",
        shared["model"],
        "--source",
        shared["src"],
        "--target",
        str(tgt),
        "--modules",
        MODULES,
        "--steps",
        "2",
        "--optimizer",
        "adam",
        "--checkpoint",
        str(tmp_path / "ck.pt"),
        "--checkpoint-every",
        "1",
    ]
    assert main(base + ["--out", str(tmp_path / "a.st")]) == 0
    assert main(base + ["--out", str(tmp_path / "b.st"), "--resume", str(tmp_path / "ck.pt")]) == 0
    assert "error" not in capsys.readouterr().err
    a, b = lf.Steering.load(str(tmp_path / "a.st")), lf.Steering.load(str(tmp_path / "b.st"))
    assert all(torch.equal(a[m][0], b[m][0]) for m in a.modules)


def test_a_bug_exits_1_without_traceback(shared, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli_train, "train", boom)
    rc, _, err = run(
        [
            "train",
            "--model",
            shared["model"],
            "--source",
            shared["src"],
            "--target",
            shared["tgt"],
            "--out",
            str(tmp_path / "o.st"),
        ],
        capsys,
    )
    assert rc == 1 and "internal error" in err and "RuntimeError: boom" in err
    assert "Traceback" not in err and not (tmp_path / "o.st").exists()


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("a.json", '{"text": "one"}\n"two"\n', ["one", "two"]),  # JSONL named .json
        ("a.json", '["one", {"text": "two"}]', ["one", "two"]),  # a JSON array
        ("a.txt", '[\n  "one",\n  "two"\n]\n', ["one", "two"]),  # by content
        ("a.txt", '"one"\n"two"\n', ["one", "two"]),  # all JSON strings
        ("a.txt", 'he said "hi"\n"quoted"\n', ['he said "hi"', '"quoted"']),  # mixed: plain text
        ("a.txt", "[laughs] you fool\n42\nnull\n", ["[laughs] you fool", "42", "null"]),
        ("a.txt", "\ufeffone\r\n\r\ntwo\r\n", ["one", "two"]),  # BOM, CRLF, blanks
        ("a.jsonl", '"one"\n\n{"text": "two", "label": 1}\n', ["one", "two"]),
    ],
)
def test_sentence_format_is_decided_by_content(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert cli_io.read_sentences(str(path), "--source") == expected


def test_errors_for_json_that_is_not_sentences(tmp_path):
    cases = {
        "a.jsonl": ('"one"\nplain\n', "a.jsonl:2"),
        "b.txt": ('{"text": "one"}\nplain\n', "b.txt:2"),
        "c.json": ('["one", 2]', "item 1"),
        "d.txt": ('{\n "source": ["a"]\n}\n', "one JSON object"),
    }
    for name, (content, where) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(cli_io.CLIError, match=where.replace(".", r"\.")):
            cli_io.read_sentences(str(tmp_path / name), "--source")
    assert os.path.exists(tmp_path / "a.jsonl")


# --- library errors carry their argument; the CLI names its flag for it ---------------------------
def test_a_library_errors_argument_becomes_the_commands_flag():
    from lineas_fast.checks import ArgumentError, ArgumentTypeError, integer, number
    from lineas_fast.cli.train import TRAIN_FLAGS

    with pytest.raises(ArgumentError) as e:
        number(float("nan"), "lr")
    assert e.value.argument == "lr" and isinstance(e.value, ValueError)
    assert cli_io.flag_message(e.value, TRAIN_FLAGS) == "--lr: lr must be finite, got nan"
    with pytest.raises(ArgumentTypeError) as e:
        integer(2.5, "batch_size")
    assert e.value.argument == "batch_size" and isinstance(e.value, TypeError)
    assert cli_io.flag_message(e.value, TRAIN_FLAGS).startswith("--batch-size: batch_size must be an integer")
    # the flag comes from the attribute, not from words in the message
    assert cli_io.flag_message(ArgumentError("modules and steps disagree", "steps"), TRAIN_FLAGS).startswith(
        "--steps: "
    )
    assert cli_io.flag_message(ValueError("steps went wrong"), TRAIN_FLAGS) == "steps went wrong"
    assert cli_io.flag_message(ArgumentError("x", "no_such_argument"), TRAIN_FLAGS) == "x"


def test_train_names_the_flag_of_the_library_argument(shared, tmp_path, capsys):
    """``--loss-modules`` matching nothing: the library's ArgumentError(argument="loss_modules")
    is reported under --loss-modules (its message also names "modules", which a text search
    could have taken for --modules)."""
    rc, _, err = run(
        [
            "train",
            "--model",
            shared["model"],
            "--source",
            shared["src"],
            "--target",
            shared["tgt"],
            "--modules",
            MODULES,
            "--loss-modules",
            r"nothing\.here",
            "--out",
            str(tmp_path / "o.st"),
        ],
        capsys,
    )
    assert rc == 2 and "lineas-fast train: error: --loss-modules: loss_modules pattern" in err, err
    assert not (tmp_path / "o.st").exists()


def test_a_fingerprint_mismatch_names_no_strict(shared, tmp_path, capsys):
    st = lf.Steering.load(shared["steer"])
    st.metadata["model"] = {**st.metadata["model"], "shapes_sha256": "0" * 64}
    st.save(str(tmp_path / "fp.safetensors"))
    argv = ["fuse", "--model", shared["model"], "--steering", str(tmp_path / "fp.safetensors")]
    rc, _, err = run(argv + ["--out", str(tmp_path / "f")], capsys)
    assert rc == 2 and "--no-strict" in err and not (tmp_path / "f").exists(), err
    rc, _, err = run(argv + ["--out", str(tmp_path / "f"), "--no-strict"], capsys)  # reaches lf.fuse
    assert rc == 0 and os.path.isfile(tmp_path / "f" / "config.json"), err


# --- positive controls of the CLI edges -----------------------------------------------------------
def test_negative_numbers_in_exponent_notation_are_values_and_prompts_run_in_batches(
    shared, tmp_path, capsys, monkeypatch
):
    from transformers import GenerationMixin

    sizes = []
    generate = GenerationMixin.generate

    def spy(self, *a, **k):
        sizes.append(k["input_ids"].shape[0])
        return generate(self, *a, **k)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt number {i}" for i in range(5)) + "\n")
    argv = ["generate", "--model", shared["model"], "--steering", shared["steer"], "--strength", "-1e-1"]
    rc, out, err = run(
        argv + ["--prompts-file", str(prompts), "--batch-size", "2", "--max-new-tokens", "2"], capsys
    )
    lines = [json.loads(x) for x in out.splitlines()]
    assert rc == 0, err
    assert [x["prompt"] for x in lines] == [f"prompt number {i}" for i in range(5)]
    assert all(x["strength"] == -0.1 for x in lines) and sizes == [2, 2, 1]


def test_allow_missing_weights_loads_an_incomplete_folder(shared, tmp_path, capsys):
    argv = ["train", "--model", shared["extra"], "--source", shared["src"], "--target", shared["tgt"]]
    argv += ["--modules", MODULES, "--steps", "1", "--out", str(tmp_path / "o.st")]
    rc, _, err = run(argv + ["--allow-missing-weights"], capsys)
    assert rc == 0 and (tmp_path / "o.st").is_file(), err


@pytest.mark.parametrize(
    "pattern,refused",
    [
        (".*post.*layernorm", False),
        (MODULES, False),
        (r"model\.layers\.\d+\.(input|post_attention)_layernorm", False),
        (r".*(q|k|v)_proj", False),
        ("(q|k|v)+_proj", False),  # one character per branch: a class, no backtracking
        ("(.|.)*Y", True),
        ("(a|ab)*c", True),
        ("(a+)+", True),
        (r"(\w*\.)*norm", True),
        ("(x{1,9})*", True),
        (".*.*.*.*.*x", True),
    ],
)
def test_module_regex_complexity_rule(pattern, refused):
    from lineas_fast.cli.patterns import complexity_problem

    assert (complexity_problem(pattern) is not None) == refused


def test_a_slow_module_regex_is_stopped_by_the_match_bound():
    from lineas_fast.cli.patterns import match_time_problem

    names = ["model.layers.0.mlp", "a" * 40]
    assert match_time_problem(MODULES, names, seconds=30) is None
    why = match_time_problem("(a|a)*b", names, seconds=1)  # 2^40 steps: killed at the bound
    assert why is not None and "2 module names" in why
