"""The names the command line's modules shared before they were split by concern, kept for the
code that imports them from here: the parser and argument types (``cli.argtypes``), output and
input paths (``cli.paths``), sentence, steering and checkpoint files (``cli.readers``), model and
pipeline folders (``cli.folders``), and the error type (``cli.errors``). New code imports from
those modules."""

from __future__ import annotations

from lineas_fast.cli.argtypes import (
    NEGATIVE_NUMBER,
    SEED,
    ArgumentParser,
    SubcommandParser,
    flag_message,
    integer,
    nonblank,
    real,
)
from lineas_fast.cli.errors import CLIError, one_line
from lineas_fast.cli.folders import (
    add_allow_missing,
    check_match_time,
    check_model_dir,
    check_pipeline_dir,
    fits,
    load_model,
    load_model_or_pipeline,
    load_pipeline,
    load_tokenizer,
    model_or_pipeline,
    model_positions,
    need_matplotlib,
    scheduler_timesteps,
)
from lineas_fast.cli.paths import check_input_file, check_output_dir, check_output_file, refuse_inputs
from lineas_fast.cli.patterns import regex
from lineas_fast.cli.readers import (
    CHECKPOINT_KEYS,
    check_checkpoint,
    load_steering,
    read_sentences,
    read_text,
)
from lineas_fast.quiet import interactive, quiet_loading

__all__ = [
    "NEGATIVE_NUMBER", "SEED", "ArgumentParser", "SubcommandParser", "flag_message", "integer", "nonblank",
    "real", "CLIError", "one_line", "add_allow_missing", "check_match_time", "check_model_dir",
    "check_pipeline_dir", "fits", "load_model", "load_model_or_pipeline", "load_pipeline", "load_tokenizer",
    "model_or_pipeline", "model_positions", "need_matplotlib", "scheduler_timesteps", "check_input_file",
    "check_output_dir", "check_output_file", "refuse_inputs", "regex", "CHECKPOINT_KEYS",
    "check_checkpoint", "load_steering", "read_sentences", "read_text", "interactive", "quiet_loading",
]  # fmt: skip
