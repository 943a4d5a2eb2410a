"""Command line of `lingua.hf`:

    python -m lingua.hf export CKPT OUT_DIR [--format llama|lingua] [--overwrite]
    python -m lingua.hf model-args HF_DIR      # the apps/main model config of a Llama folder (YAML)
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

import yaml

from lingua.args import InputError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lingua.hf", description="Hugging Face export and import.")
    commands = parser.add_subparsers(dest="command", required=True)
    export_cmd = commands.add_parser("export", help="write a checkpoint as a safetensors folder")
    export_cmd.add_argument("ckpt", help="a run's dump_dir (its newest checkpoint), a checkpoint folder or a consolidated file")
    export_cmd.add_argument("out_dir", help="the folder to write (must not exist, unless --overwrite)")
    export_cmd.add_argument("--format", choices=["llama", "lingua"], default="llama",
                            help="llama: transformers LlamaForCausalLM (dense apps/main models); lingua: any model, lingua tensor names")
    export_cmd.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    args_cmd = commands.add_parser("model-args", help="print the apps/main `model:` config of a Llama folder")
    args_cmd.add_argument("folder", help="a Hugging Face LlamaForCausalLM folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "export":
            from lingua.hf.export import export

            print(export(args.ckpt, args.out_dir, args.format, args.overwrite))
        else:
            from lingua.hf.folders import read_folder_config
            from lingua.hf.llama import model_args_of_config

            print(yaml.safe_dump({"model": model_args_of_config(read_folder_config(args.folder))}, sort_keys=False), end="")
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
