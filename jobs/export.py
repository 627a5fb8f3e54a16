"""Export a trained model to Hugging Face format (GPT2LMHeadModel + its tokenizer).

    python jobs/export.py --checkpoint ~/orchestrator-runs/pretrain-... --out my-model
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; \\
               AutoModelForCausalLM.from_pretrained('my-model')"

Writes model.safetensors, config.json, generation_config.json and the tokenizer files
(orchestrator/hf_export.py). A run directory exports its newest usable checkpoint.
"""
from __future__ import annotations

import argparse
import sys

from orchestrator.job_exit import EXIT_BAD_INPUT, JobFailed, run_job


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="directory to write the Hugging Face model to")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from safetensors import SafetensorError

    from orchestrator.hf_export import ExportError, export_checkpoint
    from orchestrator.tokenizer import TokenizerError
    from orchestrator.training.checkpoint import CheckpointError

    try:
        files, info = export_checkpoint(args.checkpoint, args.out)
    except (ExportError, CheckpointError, TokenizerError) as e:
        raise JobFailed(str(e), EXIT_BAD_INPUT) from None
    except (OSError, SafetensorError) as e:  # a full disk, no permission at --out
        raise JobFailed(f"--out {args.out}: the export failed: {e}; an earlier export there "
                        "is left as it was", EXIT_BAD_INPUT) from None
    print(f"exported {info['checkpoint']} (step {info['step']}, {info['params'] / 1e6:.2f}M "
          f"params, vocabulary {info['vocab_size']}, tokenizer {info['tokenizer']}) to "
          f"{args.out}: {', '.join(f.name for f in files)}")
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    code, _ = run_job(lambda: run(args), on_interrupt="interrupted: nothing is half-written "
                                                   "(files are renamed into place)")
    return code


if __name__ == "__main__":
    sys.exit(main())
