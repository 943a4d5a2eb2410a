"""Every shipped config loads strictly and builds a model of the expected size (on the meta device)."""

from pathlib import Path

import pytest
import torch

from apps.main.train import MainTrainArgs, build_model
from lingua.args import load_config
from lingua.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
MAIN_CONFIGS = sorted((REPO / "apps" / "main" / "configs").glob("*.yaml"))

# Parameters without the token embedding and output head (they depend on the tokenizer), in millions.
EXPECTED_BODY_PARAMS_M = {"dense_373m": (290, 320), "llama_1B": (1100, 1300), "llama_7B": (6300, 6600)}


@pytest.mark.parametrize("path", MAIN_CONFIGS, ids=lambda p: p.stem)
def test_main_config_loads_and_builds(path):
    cfg = load_config(MainTrainArgs, str(path))
    with torch.device("meta"):
        model = build_model(cfg.model, ByteTokenizer())
    body = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("tok_embeddings", "output")))
    if path.stem in EXPECTED_BODY_PARAMS_M:
        low, high = EXPECTED_BODY_PARAMS_M[path.stem]
        assert low <= body / 1e6 <= high, f"{path.stem}: {body / 1e6:.0f}M"
