"""AttnRes checkpoints load with `trust_remote_code=True` on a machine where the attnres package is not installed."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import torch

import attnres
from attnres import AttnResForCausalLM
from tests.tiny_models import randomize_, tiny_config


REMOTE_CODE_FILES = ("configuration_attnres.py", "modeling_attnres.py")


def test_remote_code_files_import_only_torch_transformers_and_each_other():
    package_dir = Path(attnres.__file__).parent
    allowed_roots = {"collections", "dataclasses", "math", "re", "torch", "transformers", "huggingface_hub"}
    for filename in REMOTE_CODE_FILES:
        tree = ast.parse((package_dir / filename).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only the flat sibling config module may be imported
                    assert (node.level, node.module) == (1, "configuration_attnres"), (filename, node.module)
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed_roots, f"{filename} imports {roots - allowed_roots}"


LOADER = r"""
import json, sys
sys.modules["attnres"] = None  # the package must not be importable: everything comes from the checkpoint
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

ids = torch.load(sys.argv[1])
reports = []
for path, out_path in zip(sys.argv[2::2], sys.argv[3::2]):
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    base = AutoModel.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.save({"logits": logits, "generated": generated}, out_path)
    reports.append({
        "config": type(config).__module__, "base": type(base).__name__, "model": type(model).__module__,
        "attnres_imported": any(n == "attnres" or n.startswith("attnres.") for n, m in sys.modules.items() if m is not None),
    })
print(json.dumps(reports))
"""


def load_as_remote_code(checkpoints: list[Path], ids: torch.Tensor, work_dir: Path) -> tuple[list[dict], list[dict]]:
    """Load each checkpoint with trust_remote_code in one fresh Python process where `attnres` cannot be imported and
    whose working directory is not the repository; returns its logits/generations on `ids` and what it loaded."""
    torch.save(ids, work_dir / "ids.pt")
    outputs = [work_dir / f"remote-{i}.pt" for i in range(len(checkpoints))]
    pairs = [str(item) for pair in zip(checkpoints, outputs) for item in pair]
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(work_dir / "ids.pt"), *pairs],
        cwd=work_dir,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(work_dir / "hf_home"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(path) for path in outputs], json.loads(result.stdout.strip().splitlines()[-1])


def test_remote_code_load_in_a_clean_process(tmp_path):
    model = randomize_(AttnResForCausalLM(tiny_config("block")), query_std=0.3).eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    assert {p.name for p in checkpoint.glob("*.py")} == set(REMOTE_CODE_FILES)
    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_attnres.AttnResConfig",
        "AutoModel": "modeling_attnres.AttnResModel",
        "AutoModelForCausalLM": "modeling_attnres.AttnResForCausalLM",
    }

    ids = torch.randint(3, 99, (2, 10))
    [remote], [report] = load_as_remote_code([checkpoint], ids, tmp_path)
    assert report["config"].startswith("transformers_modules.") and report["model"].startswith("transformers_modules.")
    assert report["base"] == "AttnResModel" and not report["attnres_imported"]

    with torch.no_grad():
        expected = model(ids).logits
    assert torch.equal(remote["logits"], expected), (remote["logits"] - expected).abs().max()
    expected_generation = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(remote["generated"], expected_generation)
