"""Patch-level Drift score (numpy) against a direct computation, its torch head and ONNX graph, ViM's head."""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.decision.drift import DriftError
from defectscope.decision.drift.patch import PatchGaussian, patch_embedding
from defectscope.decision.drift.scorer import fit_vim, vim_score


def _maps(rng, n, shift=0.0):
    """Two stages like a CNN's: 6 channels on an 8x8 grid, 10 channels on 4x4, correlated channels."""
    base = rng.normal(size=(n, 3, 8, 8))
    fine = np.concatenate([base, base[:, :2] * 0.5 + 0.3 * rng.normal(size=(n, 2, 8, 8)),
                           rng.normal(size=(n, 1, 8, 8))], axis=1) + shift
    coarse = rng.normal(size=(n, 10, 4, 4)) + np.linspace(0, 1, 10)[None, :, None, None]
    return [fine.astype(np.float32), coarse.astype(np.float32)]


def test_patch_gaussian_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    train = _maps(rng, 60)
    g = PatchGaussian(d=9, eps=0.01, seed=1).fit(train, chunk=17)  # chunks that do not divide N
    assert len(g.channels) == 9 and g.grid == (8, 8)
    query = _maps(rng, 5)
    query[0][2, :, 3, 5] += 6.0  # one local defect at (3, 5) of image 2
    got = g.score_maps(query)
    # Direct: the 16 channels at each position, written out with np.cov and np.linalg.inv.
    def full(ms):
        return np.concatenate([ms[0], np.kron(ms[1], np.ones((1, 1, 2, 2)))], axis=1)[:, g.channels]
    e_train, e_q = full(train), full(query)
    for y, x in [(0, 0), (3, 5), (7, 2)]:
        cov = np.cov(e_train[:, :, y, x], rowvar=False) + 0.01 * np.eye(9)
        diff = e_q[:, :, y, x] - e_train[:, :, y, x].mean(axis=0)
        direct = np.sqrt(np.einsum("nd,de,ne->n", diff, np.linalg.inv(cov), diff))
        np.testing.assert_allclose(got[:, y, x], direct, rtol=1e-4)
    image = g.score(query)
    assert image.shape == (5,) and int(np.argmax(image)) == 2
    assert np.unravel_index(np.argmax(got[2]), (8, 8)) == (3, 5)


def test_patch_gaussian_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    g = PatchGaussian(d=5, seed=3).fit(_maps(rng, 20))
    g.save(tmp_path)
    back = PatchGaussian.load(tmp_path)
    q = _maps(rng, 3)
    np.testing.assert_array_equal(g.score(q), back.score(q))
    assert back.params() == g.params()
    with pytest.raises(DriftError, match="do not match"):
        g.score([q[0][:, :4], q[1]])
    with pytest.raises(DriftError, match="no patch drift statistics"):
        PatchGaussian.load(tmp_path / "none")
    with pytest.raises(DriftError, match="does not divide"):
        patch_embedding([q[0], q[1][:, :, :3, :3]])


def test_patch_head_matches_numpy_and_onnx(tmp_path):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    from defectscope.onnx_export.drift_heads import FusedDriftHead, PatchDriftHead

    rng = np.random.default_rng(2)
    g = PatchGaussian(d=7, seed=0).fit(_maps(rng, 40))
    q = _maps(rng, 6, shift=0.5)
    head = PatchDriftHead(g).eval()
    with torch.no_grad():
        t = head([torch.from_numpy(m) for m in q]).numpy()
    np.testing.assert_allclose(t, g.score(q), rtol=1e-4)

    fused = FusedDriftHead([("patch", head)], mu=[2.0], sigma=[0.5]).eval()
    path = tmp_path / "patch.onnx"
    with torch.no_grad():
        torch.onnx.export(
            _MapsOnly(fused), tuple(torch.from_numpy(m) for m in q), str(path), input_names=["fine", "coarse"],
            output_names=["drift"], dynamic_axes={"fine": {0: "n"}, "coarse": {0: "n"}, "drift": {0: "n"}},
            opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    q2 = _maps(rng, 3)  # another batch size than the export's
    (o,) = sess.run(None, {"fine": q2[0], "coarse": q2[1]})
    np.testing.assert_allclose(o, (g.score(q2) - 2.0) / 0.5, rtol=1e-4, atol=1e-4)


class _MapsOnly:
    """Wraps a FusedDriftHead so the exported graph takes the two maps directly."""

    def __new__(cls, fused):
        import torch

        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fused = fused

            def forward(self, fine, coarse):
                z = torch.zeros(fine.shape[0], 1)
                return self.fused(z, z, [fine, coarse])

        return M()


def test_vim_head_matches_numpy():
    torch = pytest.importorskip("torch")
    from defectscope.onnx_export.drift_heads import VimHead

    rng = np.random.default_rng(3)
    train = rng.normal(size=(100, 3)) @ rng.normal(size=(3, 10)) + 0.05 * rng.normal(size=(100, 10))
    w, b = rng.normal(size=(4, 10)), rng.normal(size=4)
    stats = fit_vim(train, w, b, dim=3)
    q = rng.normal(size=(8, 10)).astype(np.float32)
    logits = (q @ w.T + b).astype(np.float32)
    with torch.no_grad():
        t = VimHead(stats)(torch.from_numpy(q), torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(t, vim_score(q, logits, stats), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_multilayer_export_heads_on_a_timm_model(tmp_path):
    """The whole graph: one backbone pass gives the pooled features (= forward_features) and the maps; the
    fused Drift output of ONNX Runtime equals the numpy scores standardised and maxed."""
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    from defectscope.decision.drift.patch import feature_maps
    from defectscope.decision.drift.scorer import DriftScorer
    from defectscope.models.factory import create_model
    from defectscope.onnx_export.drift_heads import DriftHead, FusedDriftHead, MultiLayerExportHeads, PatchDriftHead

    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite0", 3, image_size=64).eval()
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (24, 64, 64), dtype=np.uint8)
    feats, logits, maps = feature_maps(model, images, (2, 3), batch_size=10)
    with torch.no_grad():
        direct = model.forward_features(torch.from_numpy(images[:4]).float().div(255).unsqueeze(1)).numpy()
    np.testing.assert_allclose(feats[:4], direct, rtol=1e-4, atol=1e-5)
    assert [m.shape[1:] for m in maps] == [(40, 8, 8), (112, 4, 4)]

    g = PatchGaussian(d=16, stages=(2, 3)).fit(maps)
    scorer = DriftScorer().fit(feats, logits, np.arange(24) % 3)
    arrays, params = scorer.to_arrays()
    fused = FusedDriftHead([("pooled", DriftHead("mahalanobis", arrays, params)), ("patch", PatchDriftHead(g))],
                           mu=[1.0, 2.0], sigma=[3.0, 0.5])
    heads = MultiLayerExportHeads(model, fused, (2, 3)).eval()
    path = tmp_path / "m.onnx"
    with torch.no_grad():
        torch.onnx.export(heads, (torch.rand(2, 1, 64, 64),), str(path), input_names=["image"],
                          output_names=["logits", "probabilities", "features", "drift"],
                          dynamic_axes={k: {0: "n"} for k in ("image", "logits", "probabilities", "features", "drift")},
                          opset_version=17, dynamo=False)
    q = rng.integers(0, 256, (5, 64, 64), dtype=np.uint8)
    x = (q.astype(np.float32) / np.float32(255))[:, None]
    o_logits, o_drift = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["logits", "drift"], {"image": x})
    f_q, l_q, m_q = feature_maps(model, q, (2, 3))
    expected = np.maximum((scorer.score(f_q, l_q, ["mahalanobis"])["mahalanobis"] - 1.0) / 3.0,
                          (g.score(m_q) - 2.0) / 0.5)
    np.testing.assert_allclose(o_logits, l_q, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(o_drift, expected, rtol=1e-3, atol=1e-3)


def test_fit_patch_drift_on_a_seed_cnn_run(trained_run, tmp_path):
    """The seed CNN's conv+pool stages give the maps; the pooled features equal forward_features."""
    import shutil

    from defectscope.decision.drift.patch import default_stages, feature_maps, fit_patch_drift
    from defectscope.models.inference import features_and_logits
    from defectscope.rundir import Run

    run = Run(shutil.copytree(trained_run, tmp_path / "run"))
    model = run.model()
    g = fit_patch_drift(run, model=model)
    assert g.stages == default_stages(model) == (1,)
    assert (run.path / "patch_drift.safetensors").is_file() and PatchGaussian.load(run).n_train == g.n_train
    _, images = run.images(run.rows("test"))
    feats, logits, maps = feature_maps(model, images, g.stages)
    f2, l2 = features_and_logits(model, images)
    np.testing.assert_allclose(feats, f2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, l2, rtol=1e-5, atol=1e-6)
    assert [list(m.shape[1:]) for m in maps] == g.map_shapes


def test_feature_maps_name_a_backbone_without_maps():
    torch = pytest.importorskip("torch")
    from defectscope.decision.drift.patch import feature_maps

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Linear(2, 2)

    with pytest.raises(DriftError, match="forward_intermediates"):
        feature_maps(Plain(), np.zeros((1, 4, 4), np.uint8))


def test_feature_maps_follow_the_frozen_recipe_and_views():
    """With the frozen recipe's feature transform, a kernel head and test-time views, the pooled features of
    the maps' pass still equal forward_features (what the pooled Drift scores were fitted on)."""
    torch = pytest.importorskip("torch")
    from defectscope.decision.drift.patch import default_stages, feature_maps
    from defectscope.models.factory import create_model
    from defectscope.models.heads import KernelHead
    from defectscope.models.inference import features_and_logits

    torch.manual_seed(0)
    model = create_model("seed_cnn2", 3, image_size=32)
    model.make_frozen(KernelHead(model.num_features, 5, 3))
    model.post.shift.uniform_(0, 1)
    model.post.scale.uniform_(0.5, 2)
    model.views = (0, 1, 3)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32), dtype=np.uint8)
    f, lg, maps = feature_maps(model.eval(), images, default_stages(model))
    f2, l2 = features_and_logits(model, images)
    np.testing.assert_allclose(f, f2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lg, l2, rtol=1e-5, atol=1e-6)
    assert maps[0].shape == (6, 64, 6, 6)
