"""``--ppl-budget F --ppl-texts FILE`` of ``lineas-fast train``: after training, the largest
strength whose perplexity on FILE's held-out texts is at most (1 + F) × the unsteered model's
(``lf.calibrate_strength``), recorded in the saved steering's metadata:

    calibrated_strength    λ (float)
    ppl_budget             F
    strength_calibration   the record: base and calibrated perplexity, every (λ, PPL) evaluated,
                           the over-budget λ above the answer (or null), the texts file and count

The texts must be held out: a text also in ``--source`` or ``--target`` is refused. Language
models only (not ``--pipeline``), and not with ``--fsdp`` (the calibration runs on one process,
which holds only its shard there).
"""

from __future__ import annotations

from lineas_fast.apps.calibrate import calibrate_strength
from lineas_fast.cli.argtypes import real
from lineas_fast.cli.errors import CLIError
from lineas_fast.cli.paths import refuse_inputs
from lineas_fast.cli.readers import read_sentences
from lineas_fast.quiet import interactive


def add_budget_arguments(parser) -> None:
    parser.add_argument(
        "--ppl-budget",
        type=real(0, low_open=True),
        default=None,
        help="after training, find the largest strength whose perplexity on --ppl-texts rises by at "
        "most this fraction (0.03: +3%%) and record it in the steering's metadata",
    )
    parser.add_argument(
        "--ppl-texts",
        default=None,
        help="held-out texts for --ppl-budget (a sentence file, as --source; none of them in "
        "--source or --target)",
    )


def read_budget_texts(args, source, target) -> list[str] | None:
    """The ``--ppl-texts`` sentences when ``--ppl-budget`` is given (None otherwise); every
    check that needs no model."""
    if args.ppl_budget is None and args.ppl_texts is None:
        return None
    if args.ppl_texts is None:
        raise CLIError(f"--ppl-budget {args.ppl_budget:g} needs --ppl-texts FILE (held-out texts)")
    if args.ppl_budget is None:
        raise CLIError(f"--ppl-texts {args.ppl_texts!r} needs --ppl-budget F (e.g. 0.03 for +3%)")
    if getattr(args, "pipeline", None):
        raise CLIError("--ppl-budget: perplexity applies to a language model (--model), not --pipeline")
    if getattr(args, "fsdp", False):
        raise CLIError("--ppl-budget: not with --fsdp (each process holds only a shard of the model)")
    for flag in ("--out", "--checkpoint"):  # an input is never an output
        out = getattr(args, flag[2:], None)
        if out:
            refuse_inputs(out, flag, {"--ppl-texts": args.ppl_texts})
    texts = read_sentences(args.ppl_texts, "--ppl-texts")
    seen = set(source) | set(target)
    shared = [t for t in texts if t in seen]
    if shared:
        raise CLIError(
            f"--ppl-texts {args.ppl_texts!r}: {len(shared)} of its {len(texts)} texts are also in "
            f"--source or --target (e.g. {shared[0][:40]!r}); the budget needs held-out texts"
        )
    return texts


def calibrated_metadata(args, model, tokenizer, steering, texts, max_length: int) -> dict:
    """The metadata entries for the saved steering ({} without ``--ppl-budget``); prints the
    result."""
    if texts is None:
        return {}
    rec = calibrate_strength(
        steering,
        model,
        tokenizer,
        texts,
        args.ppl_budget,
        max_length=max_length,
        progress=interactive(),
        return_record=True,
    )
    found = "" if rec.over_budget_strength is not None else " (no strength over the budget was found)"
    print(
        f"calibrated strength {rec.strength:.4g}: perplexity {rec.base_perplexity:.4g} -> "
        f"{rec.perplexity:.4g} on {len(texts)} texts (budget +{args.ppl_budget:.2%}){found}"
    )
    return {
        "calibrated_strength": rec.strength,
        "ppl_budget": args.ppl_budget,
        "strength_calibration": {**rec.metadata(), "texts_file": args.ppl_texts},
    }
