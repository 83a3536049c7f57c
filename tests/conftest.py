"""Shared fixtures: the real data folder, the prepared benchmark, and a tiny random Gemma 3 with the real tokenizer.

Missing prerequisites fail with the command that makes them (never a skip): .ci/run makes them all.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The raw QBQTC / KUAKE-QTR files: DARL_SHARED_DATA, else ../shared/data, else the download cache that
# `python data/qbqtc2kuake/prepare.py` (without --src) fills.
SHARED_DATA = Path(os.environ.get("DARL_SHARED_DATA") or next(
    (p for p in (ROOT.parent / "shared" / "data", ROOT / "data" / "qbqtc2kuake" / "upstream") if p.is_dir()),
    ROOT.parent / "shared" / "data"))
GEMMA = ROOT / "data" / "gemma3_270m"


def need(path, how):
    if not Path(path).exists():
        pytest.fail(f"{path} is missing: {how}", pytrace=False)
    return Path(path)


@pytest.fixture(scope="session")
def shared_data():
    return need(SHARED_DATA, "the raw QBQTC / KUAKE-QTR files: ../shared/data, or run python data/qbqtc2kuake/prepare.py "
                             "once with internet (it caches them in data/qbqtc2kuake/upstream); DARL_SHARED_DATA overrides")


@pytest.fixture(scope="session")
def gemma_dir():
    return need(GEMMA / "model.safetensors", "run python data/gemma3_270m/prepare.py").parent


@pytest.fixture(scope="session")
def qbqtc2kuake(tmp_path_factory, shared_data):
    """The real benchmark, built by its own prepare script into a fresh folder."""
    out = tmp_path_factory.mktemp("qbqtc2kuake")
    subprocess.run([sys.executable, str(ROOT / "data" / "qbqtc2kuake" / "prepare.py"), "--src", str(shared_data),
                    "--out", str(out)], check=True, capture_output=True)
    return str(out)


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory, gemma_dir):
    """A 2-layer random Gemma 3 (hidden 32) with Gemma's real 262,144-token vocabulary and tokenizer:
    every stage runs in seconds, while prompts, truncation and grade tokens are the real ones."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=262_144, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                           sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                           pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_gemma")
    Gemma3ForCausalLM(cfg).save_pretrained(out)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(gemma_dir / name, out / name)
    return str(out)


def small_hf_gemma(path):
    """A 4-layer random Gemma 3 (vocab 320) saved with transformers: (the transformers model, ours loaded from it)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    import model
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"] * 2, query_pre_attn_scalar=16)
    hf = Gemma3ForCausalLM(cfg).eval()
    hf.save_pretrained(path)
    return hf, model.Transformer.from_pretrained(path)
