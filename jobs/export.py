"""Export a trained model to Hugging Face format (GPT2LMHeadModel + its tokenizer).

    python jobs/export.py --checkpoint ~/orchestrator-runs/pretrain-... --out my-model
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; \\
               AutoModelForCausalLM.from_pretrained('my-model')"

Writes model.safetensors, config.json, generation_config.json and the tokenizer files
(orchestrator/hf_export.py). A run directory exports its newest usable checkpoint; a
jobs/compress.py stage folder (COMPRESS_OUT/pruned, qat, distilled, original) exports when it
has GPT-2's form, with the teacher's tokenizer (docs/compression.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator.job_exit import EXIT_BAD_INPUT, JobFailed, run_job


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a run directory (its newest checkpoint), a checkpoint directory, or a "
                        "jobs/compress.py stage folder (OUT/pruned, OUT/qat, ...)")
    p.add_argument("--out", required=True, help="directory to write the Hugging Face model to")
    args = p.parse_args(argv)
    for flag in ("checkpoint", "out"):  # `--out "$DIR"` with DIR unset: not the cwd
        if not getattr(args, flag).strip():
            p.error(f"--{flag} is empty: give a directory")
    from orchestrator.hf_export import ExportError, export_dir

    try:  # (a `~` the shell left alone: home)
        args.out = str(export_dir(args.out))
    except ExportError as e:  # ~user of no user
        p.error(str(e))
    return args


def run(args: argparse.Namespace) -> dict:
    from safetensors import SafetensorError

    from orchestrator.hf_export import ExportError, export_checkpoint, has_export
    from orchestrator.tokenizer import TokenizerError
    from orchestrator.training.checkpoint import CheckpointError

    had_export = has_export(Path(args.out))
    try:
        files, info = export_checkpoint(args.checkpoint, args.out)
    except (ExportError, CheckpointError, TokenizerError) as e:
        raise JobFailed(str(e), EXIT_BAD_INPUT) from None
    except (OSError, SafetensorError) as e:  # a full disk, no permission at --out
        raise JobFailed(f"--out {args.out}: the export failed: {e}"
                        f"{what_is_left(Path(args.out), had_export)}", EXIT_BAD_INPUT) from None
    for problem in info["skipped"]:  # an older checkpoint is exported in their place
        print(f"warning: skipped an unusable newer checkpoint: {problem}", file=sys.stderr)
    what = (f"the compress stage {info['checkpoint']} (the {info['stage']} stage" if info["stage"]
            else f"{info['checkpoint']} (step {info['step']}")
    print(f"exported {what}, {info['params'] / 1e6:.2f}M params, vocabulary "
          f"{info['vocab_size']}, tokenizer {info['tokenizer']}) to {args.out}: "
          f"{', '.join(f.name for f in files)}")
    return info


def what_is_left(out: Path, had_export: bool) -> str:
    """What a failed export left in `out`, for the end of its error line."""
    from orchestrator.hf_export import has_export

    if not had_export:
        return ""
    if has_export(out):  # its config.json goes only once every new file is written
        return "; the earlier export there is left as it was"
    return ("; the earlier export there was partly replaced and has no config.json, so "
            "nothing loads it: run the export again")


# The files are renamed into --out with the earlier config.json removed first and the new one
# renamed last: an interrupt leaves no mix of old and new that transformers would load.
ON_INTERRUPT = ("interrupted: --out holds a whole export (the earlier one or the new one) or "
                "files without a config.json, which nothing loads: run the export again")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    code, _ = run_job(lambda: run(args), on_interrupt=ON_INTERRUPT)
    return code


if __name__ == "__main__":
    sys.exit(main())
