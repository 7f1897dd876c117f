"""The in-process memo of pooled features: same answers as computing, never stale, only at inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectscope.models import feature_memo
from defectscope.models.factory import create_model
from defectscope.models.inference import features_and_logits, predict_logits


@pytest.fixture(autouse=True)
def fresh_memo():
    feature_memo.clear()
    yield
    feature_memo.clear()


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("seed_cnn2", 3, image_size=32).eval()
    model.views = (0, 1, 2, 3)
    return model


def _images(n: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32), dtype=np.uint8)


def _computed(model, images):
    with feature_memo_off():
        return features_and_logits(model, images)


class feature_memo_off:
    def __enter__(self):
        self.mp = pytest.MonkeyPatch()
        self.mp.setenv("DEFECTSCOPE_FEATURE_MEMO", "0")

    def __exit__(self, *exc):
        self.mp.undo()


def test_memo_answers_what_the_backbone_computes_and_counts_hits():
    model, images = _model(), _images()
    want_f, want_l = _computed(model, images)
    first_f, first_l = features_and_logits(model, images)
    assert feature_memo.stats == {"hits": 0, "misses": len(images)}
    # Another batching, another order, a model loaded again from the same weights: all served from the memo.
    again = _model()
    again.load_state_dict(model.state_dict())
    perm = np.random.default_rng(1).permutation(len(images))
    second_f, _ = features_and_logits(again, images[perm], batch_size=5)
    assert feature_memo.stats["hits"] == len(images)
    np.testing.assert_allclose(first_f, want_f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first_l, want_l, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(second_f, first_f[perm])


def test_changed_weights_or_views_are_computed_again():
    model, images = _model(), _images()
    before = features_and_logits(model, images)[0]
    with torch.no_grad():
        next(model.backbone.parameters()).add_(0.5)  # in place, as an optimizer step does
    changed = features_and_logits(model, images)[0]
    np.testing.assert_allclose(changed, _computed(model, images)[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(changed, before)
    model.views = (0,)
    one_view = features_and_logits(model, images)[0]
    np.testing.assert_allclose(one_view, _computed(model, images)[0], rtol=1e-5, atol=1e-6)
    other = _model(seed=1)
    assert not np.allclose(features_and_logits(other, images)[0], one_view)
    assert feature_memo.stats["hits"] == 0


def test_training_and_gradients_bypass_the_memo():
    model, images = _model(), _images(4)
    x = torch.as_tensor(images).float().div(255).unsqueeze(1)
    model.train()
    with torch.no_grad():
        model.forward_features(x)
    model.eval()
    out = model.forward_features(x)  # gradients on: a fine-tune's validation never, a training step always
    assert out.requires_grad
    assert feature_memo.stats == {"hits": 0, "misses": 0}
    predict_logits(model, images)
    predict_logits(model, images)
    assert feature_memo.stats == {"hits": 4, "misses": 4}


def test_memo_is_bounded(monkeypatch):
    model = _model()
    monkeypatch.setattr(feature_memo, "MAX_BYTES", 5 * model.num_features * 4)
    features_and_logits(model, _images(12))
    assert len(feature_memo._rows) == 5
    assert feature_memo._bytes <= feature_memo.MAX_BYTES
