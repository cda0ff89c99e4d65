# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""The `attnres` command line."""

import argparse
import json
import logging
import os
import sys
from pathlib import Path


logger = logging.getLogger("attnres")

EPILOG = """examples:
  attnres inspect examples/attnres-llama-1b          # a local checkpoint or config directory
  attnres inspect path/to/config.json --json         # machine-readable
  attnres inspect my-org/my-attnres-model            # a Hub id (online)
"""


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit code 1."""


def load_attnres_config(model: str):
    """An AttnResConfig from a config.json file, a local directory or a Hub id."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    from .configuration_attnres import AttnResConfig

    path = Path(model)
    try:
        if path.is_file():
            config = AttnResConfig.from_json_file(path)
        else:
            if not path.exists() and (path.is_absolute() or model.startswith(".") or model.count("/") > 1):
                raise UserError(f"{model!r} does not exist (expected a directory, a config.json or a Hub id)")
            config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError, StrictDataclassError) as error:
        if isinstance(error, UserError):
            raise
        reason = " ".join(line.strip() for line in str(error).splitlines()[:2])
        raise UserError(f"cannot read a config from {model!r}: {reason}") from error
    if getattr(config, "model_type", None) != "attnres":
        raise UserError(f"{model!r} is a {config.model_type!r} model, not an AttnRes model (model_type 'attnres')")
    return config


def run_inspect(args: argparse.Namespace) -> int:
    from .layout import describe, format_layout

    layout = describe(load_attnres_config(args.model))
    print(json.dumps(layout.to_dict(), indent=2) if args.json else format_layout(layout))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnres",
        description="Attention Residuals (arXiv:2603.15031) for Hugging Face Transformers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect",
        help="print a model's block layout, depth sources and parameter counts",
        description="Print an AttnRes model's block layout, the sources each sublayer attends over, and its "
        "parameter counts (the model is built on the meta device: no weights are loaded).",
    )
    inspect.add_argument("model", help="checkpoint or config directory, config.json file, or Hub id")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(handler=run_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("ATTNRES_LOG_LEVEL", "WARNING").upper(), format="%(message)s")
    try:
        return args.handler(args)
    except UserError as error:
        if args.debug:
            raise
        print(f"attnres: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
