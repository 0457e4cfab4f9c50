"""ONNX export parity: for every registered model, onnxruntime's probabilities and unknown-pattern scores
equal the torch prediction path (random weights, 32 px, a few maps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from waferlab.deploy.export import Contract, export_onnx, open_session, run_session
from waferlab.deploy.ood import DEFAULT_METHOD, FUSED_PARTS, OODScorer
from waferlab.deploy.trust import Trust
from waferlab.engine.predict import InputSpec, PredictOptions, predict
from waferlab.models import create_model, list_models

SIZE = 32
CLASSES = tuple(f"c{i}" for i in range(5))


@pytest.mark.parametrize(("name", "head"), [(m, "linear") for m in list_models()]
                         + [("spanet", "failpool"), ("pan", "failpool")])  # the default preset's head
def test_onnx_matches_torch(name: str, head: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=len(CLASSES), in_chans=3, head=head).eval()
    spec = InputSpec(SIZE, "onehot", CLASSES, 1.0)
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 3, (6, SIZE, SIZE), dtype=np.uint8)
    base = predict(model, maps, spec, PredictOptions(device="cpu", features=True))
    method = "mahalanobis" if name == "resnet34" else DEFAULT_METHOD  # both feature scores, one cheaply
    scorer = OODScorer(method, 1.7).fit(base.features, np.arange(6) % 3, maps=maps)  # right-shaped statistics
    if method in FUSED_PARTS:  # a z-scoring that is not the identity
        scorer.fit_fusion(scorer.parts(base.logits, base.features, maps) * 1.5 + 0.25)
    trust = Trust(temperature=1.7, none_threshold=None, ood_threshold=1.0, scorer=scorer, fingerprint="test")
    path = export_onnx(model, Contract.of(spec, trust, name), trust, tmp_path / f"{name}.onnx")
    session, contract = open_session(path)
    assert contract.class_names == CLASSES and contract.temperature == 1.7 and contract.image_size == SIZE
    other = rng.integers(0, 3, (3, SIZE, SIZE), dtype=np.uint8)  # another batch size: the batch is dynamic
    for batch in (maps, other):
        ref = predict(model, batch, spec, PredictOptions(device="cpu", temperature=1.7, features=True))
        _, probs, score = run_session(session, batch, batch_size=4, contract=contract)
        assert np.abs(probs - ref.probs).max() <= 1e-4
        np.testing.assert_allclose(score, trust.scorer.score(ref.logits, ref.features, batch), rtol=1e-3,
                                   atol=1e-3)


@pytest.mark.parametrize("head", ["linear", "failpool"])
def test_spanet_is_exported_fused(head: str, tmp_path: Path) -> None:
    """SP&A-Net's ONNX graph is its fused inference copy, also inside the default preset's ``failpool`` head:
    BatchNorms after convs folded, no Pad ops (the unfused graph has dozens of each); the parity test above
    checks it still matches the torch model."""
    import onnx

    model = create_model("spanet", num_classes=len(CLASSES), in_chans=3, head=head).eval()
    spec = InputSpec(SIZE, "onehot", CLASSES, 1.0)
    scorer = OODScorer("msp", 1.0)
    trust = Trust(temperature=1.0, none_threshold=None, ood_threshold=1.0, scorer=scorer, fingerprint="t")
    path = export_onnx(model, Contract.of(spec, trust, "spanet"), trust, tmp_path / "spanet.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    unfused = torch.nn.BatchNorm2d
    n_bn = sum(isinstance(m, unfused) for m in model.modules())
    assert n_bn > 30 and ops.count("BatchNormalization") < n_bn // 2 and "Pad" not in ops
