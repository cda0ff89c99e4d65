"""The model code of this working tree against a git revision's, on the same weights, side by side in one process.

A redesign must not make the model slower. Timing two checkouts in two processes compares two states of a shared
machine as much as two programs; this script loads the revision's `configuration_attnres.py` and
`modeling_attnres.py` (self-contained: the remote code) as a second package, builds both Block AttnRes models with
the weights and random non-zero pseudo-queries of `overhead_benchmark.py`, and interleaves them with transformers'
Llama, round by round, reporting working tree / revision per round (median, IQR) and of the fastest runs (wall and
CPU time).

    python benchmarks/revision_benchmark.py 256d6ad --only train,decode
"""

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import overhead_benchmark
import torch
from overhead_benchmark import BASELINE, build_models, decode, prefill, train_step


REMOTE_CODE = ("configuration_attnres.py", "modeling_attnres.py")


def revision_model_class(revision: str, directory: Path) -> type:
    """`AttnResForCausalLM` as `revision` defines it, imported from its remote-code files (package `revision_code`)."""
    package = directory / "revision_code"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in REMOTE_CODE:
        source = subprocess.run(
            ["git", "show", f"{revision}:src/attnres/{name}"],
            check=True,
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout
        (package / name).write_text(source)
    sys.path.insert(0, str(directory))
    return importlib.import_module("revision_code.modeling_attnres").AttnResForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", help="a git revision of this repository, e.g. a commit before a redesign")
    parser.add_argument("--only", default="prefill,decode,train")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    # the model and timing settings of overhead_benchmark.py, on the CPU in fp32
    settings = dict(device="cpu", dtype="float32", hidden_size=1024, intermediate_size=2816, layers=16, heads=16)
    vars(args).update(settings, kv_heads=8)

    with tempfile.TemporaryDirectory() as directory:
        revision_class = revision_model_class(args.revision, Path(directory))
        overhead_benchmark.MODES = ("block",)
        models = build_models(args)
        old = revision_class(revision_class.config_class(**models["block"].config.to_dict()))
        old.load_state_dict(models["block"].state_dict())  # strict: the revision must hold the same parameters
        models = {BASELINE: models[BASELINE], "revision": old.eval(), "block": models["block"]}
        ids = torch.randint(2, 32000, (1, 64))
        with torch.no_grad():
            torch.testing.assert_close(models["revision"](ids).logits, models["block"](ids).logits)

        # the ratios of interest are working tree / revision: make the revision the baseline of `summarize`
        overhead_benchmark.BASELINE = "revision"
        rows = []
        if "prefill" in args.only:
            rows += [(f"prefill {b}x{s}", prefill(models, args, b, s)) for b, s in ((1, 512), (1, 2048))]
        if "decode" in args.only:
            rows.append(("decode 512+128", decode(models, args, 512, 128)))
        if "train" in args.only:
            rows.append(("train step 1x512", train_step(models, args, 1, 512, checkpointing=False)))
    print(f"| measurement | working tree / {args.revision}: median (IQR); fastest; fastest CPU time |")
    print("|---|---|")
    for name, result in rows:
        block = result["block"]
        low, high = block["ratio_iqr"]
        print(
            f"| {name} | {block['ratio_median']:.3f} ({low:.3f}-{high:.3f}); {block['ratio_of_minima']:.3f}; "
            f"{block['cpu_ratio_of_minima']:.3f} |"
        )


if __name__ == "__main__":
    main()
