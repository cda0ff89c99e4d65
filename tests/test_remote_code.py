"""AttnRes checkpoints load with `trust_remote_code=True` on a machine where the attnres package is not installed."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import torch

import attnres
from attnres import AttnResForCausalLM
from attnres.model_sources import REMOTE_CODE_FILES
from tests.tiny_models import randomize_, tiny_config


def test_remote_code_files_import_only_torch_transformers_and_each_other():
    """Remote code runs where only torch and transformers are sure to be installed. triton is optional: it is imported
    only inside `try` (which transformers' remote-code import check skips), so a checkpoint loads without it."""
    package_dir = Path(attnres.__file__).parent
    allowed_roots = {
        "collections",
        "dataclasses",
        "functools",
        "contextlib",
        "copy",
        "importlib",
        "hashlib",
        "math",
        "re",
        "typing",
        "torch",
        "transformers",
        "huggingface_hub",
    }
    siblings = {Path(name).stem for name in REMOTE_CODE_FILES}
    for filename in REMOTE_CODE_FILES:
        tree = ast.parse((package_dir / filename).read_text())
        optional = {id(node) for block in ast.walk(tree) if isinstance(block, ast.Try) for node in ast.walk(block)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only flat sibling modules that ship too (save_pretrained copies them)
                    assert node.level == 1 and node.module in siblings, (filename, node.module)
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            allowed = allowed_roots | {"triton"} if id(node) in optional else allowed_roots
            assert roots <= allowed, f"{filename} imports {roots - allowed}"


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
    mask = torch.ones_like(ids)
    mask[1:, :3] = 0  # the second row left-padded
    with torch.no_grad():
        logits = model(ids).logits
        padded_logits = model(ids, attention_mask=mask).logits
    generated = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    padded_generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.save({"logits": logits, "generated": generated, "padded_logits": padded_logits,
                "padded_generated": padded_generated, "mask": mask}, out_path)
    reports.append({
        "config": type(config).__module__, "base": type(base).__name__, "model": type(model).__module__,
        "attnres_imported": any(n.split(".")[0] == "attnres" for n, m in sys.modules.items() if m is not None),
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


def seed_hub_cache(hf_home: Path, repo_id: str, checkpoint: Path, commit: str) -> None:
    """Lay `checkpoint` out in `hf_home` exactly as `huggingface_hub` stores a download of `repo_id` at `commit`:
    content-addressed blobs, a snapshot directory of links to them, and `refs/main` naming the commit."""
    import hashlib
    import os

    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in checkpoint.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


HUB_LOADER = r"""
import json, sys
sys.modules["attnres"] = None
import torch
from transformers import AutoModelForCausalLM

repo_id, commit, ids_path, out_path = sys.argv[1:5]
ids = torch.load(ids_path)
results = {}
for revision in (None, "main", commit):
    model = AutoModelForCausalLM.from_pretrained(repo_id, revision=revision, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ids).logits
    cached = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    uncached = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    results[str(revision)] = {"logits": logits, "cached": cached, "uncached": uncached}
torch.save(results, out_path)
print(json.dumps({"module": type(model).__module__}))
"""


def test_remote_code_loads_by_repo_id_from_the_hub_cache(tmp_path):
    """`from_pretrained("org/name", trust_remote_code=True)` as Hub users call it, offline: the checkpoint sits in an
    otherwise empty HF_HOME laid out like a download, and is loaded by repo id (default revision, branch, full commit
    hash) in a fresh process without `attnres`, through the `transformers_modules.<org>.<name>.<commit>` import path
    that a local directory never exercises. Cached and uncached generation agree with the in-process model."""
    model = randomize_(AttnResForCausalLM(tiny_config("block")), query_std=0.3).eval()
    model.save_pretrained(tmp_path / "checkpoint")
    commit = "0123456789abcdef0123456789abcdef01234567"
    seed_hub_cache(tmp_path / "hf_home", "attnres-org/tiny-attnres", tmp_path / "checkpoint", commit)
    ids = torch.randint(3, 99, (2, 6), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    result = subprocess.run(
        [sys.executable, "-c", HUB_LOADER, "attnres-org/tiny-attnres", commit, "ids.pt", "out.pt"],
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module = json.loads(result.stdout.strip().splitlines()[-1])["module"]
    assert module == f"transformers_modules.attnres_hyphen_org.tiny_hyphen_attnres.{commit}.modeling_attnres", module
    with torch.no_grad():
        expected_logits = model(ids).logits
    expected_tokens = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for revision, loaded in torch.load(tmp_path / "out.pt").items():
        assert torch.equal(loaded["logits"], expected_logits), revision
        assert torch.equal(loaded["cached"], expected_tokens) and torch.equal(loaded["uncached"], expected_tokens)


def test_an_unsupported_transformers_is_refused_at_import_with_the_range(tmp_path):
    """Remote code runs on the user's transformers: outside the tested range it must say so, not fail later."""
    probe = (
        "import importlib.metadata as metadata\n"
        "real = metadata.version\n"
        "metadata.version = lambda name: '4.57.1' if name == 'transformers' else real(name)\n"
        "import attnres.configuration_attnres\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "transformers>=5.4,<6" in result.stderr
    assert "found transformers==4.57.1" in result.stderr
