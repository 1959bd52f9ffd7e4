"""Feature losses: MSE / cosine against torch references, masking, projectors."""

import pytest
import torch
import torch.nn.functional as F

from mmdistill.losses.features import FeatureLoss, FeatureProjector, center_features, feature_cosine, feature_mse


def _feats(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_pooled_mse_and_cosine_match_torch():
    s, t = _feats(0, 4, 8), _feats(1, 4, 8)
    assert torch.allclose(feature_mse(s, t), F.mse_loss(s, t))
    assert torch.allclose(feature_cosine(s, t), (1 - F.cosine_similarity(s, t, dim=-1)).mean())


def test_zero_for_identical_features():
    s = _feats(0, 2, 3, 8)
    assert feature_mse(s, s.clone()).item() == 0.0
    assert abs(feature_cosine(s, 2.0 * s).item()) < 1e-6  # cosine ignores scale


def test_per_position_masked_mean_matches_loop():
    s, t = _feats(0, 2, 5, 8), _feats(1, 2, 5, 8)
    m = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    pairs = [(b, i) for b in range(2) for i in range(5) if m[b, i]]
    mse = sum(((s[b, i] - t[b, i]) ** 2).mean() for b, i in pairs) / len(pairs)
    cos = sum(1 - F.cosine_similarity(s[b, i], t[b, i], dim=0) for b, i in pairs) / len(pairs)
    assert torch.allclose(feature_mse(s, t, m), mse)
    assert torch.allclose(feature_cosine(s, t, m), cos)
    s2 = s.clone()
    s2[~m] = 1e4
    assert torch.allclose(feature_mse(s2, t, m), mse)


def test_all_masked_is_zero_with_finite_grad():
    s = _feats(0, 2, 5, 8).requires_grad_()
    m = torch.zeros(2, 5, dtype=torch.bool)
    for fn in (feature_mse, feature_cosine):
        s.grad = None
        loss = fn(s, _feats(1, 2, 5, 8), m)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(s.grad).all()


def test_bf16_inputs_upcast():
    s = _feats(0, 4, 8).bfloat16().requires_grad_()
    t = _feats(1, 4, 8).bfloat16()
    loss = feature_cosine(s, t) + feature_mse(s, t)
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()


def test_shape_errors():
    with pytest.raises(ValueError, match="FeatureProjector"):
        feature_mse(_feats(0, 4, 8), _feats(1, 4, 16))
    with pytest.raises(ValueError, match="mask"):
        feature_mse(_feats(0, 2, 5, 8), _feats(1, 2, 5, 8), torch.ones(2, 4, dtype=torch.bool))


def test_projector_identity_or_linear():
    same = FeatureProjector(8, 8)
    assert isinstance(same.proj, torch.nn.Identity) and not list(same.parameters())
    x = _feats(0, 3, 8)
    assert torch.equal(same(x), x)
    forced = FeatureProjector(8, 8, force=True)
    assert isinstance(forced.proj, torch.nn.Linear)
    wide = FeatureProjector(8, 16)
    assert wide(x).shape == (3, 16)
    with pytest.raises(ValueError, match="width 8"):
        wide(_feats(0, 3, 4))


def test_feature_loss_trains_its_projector():
    loss_fn = FeatureLoss("mse", student_dim=8, teacher_dim=16, normalize=True)
    params = list(loss_fn.parameters())
    assert params and all(p.requires_grad for p in params)
    s, t = _feats(0, 2, 3, 8).requires_grad_(), _feats(1, 2, 3, 16)
    loss = loss_fn(s, t, torch.ones(2, 3, dtype=torch.bool))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert s.grad is not None
    # normalize: MSE of unit vectors == 2 (1 - cos) / D
    proj = loss_fn.projector(s.detach())
    cos = F.cosine_similarity(proj, t, dim=-1)
    assert torch.allclose(loss, (2 * (1 - cos) / 16).mean(), atol=1e-6)


def test_feature_loss_cosine_and_bad_kind():
    s, t = _feats(0, 4, 8), _feats(1, 4, 8)
    assert torch.allclose(FeatureLoss("cosine")(s, t), feature_cosine(s, t))
    with pytest.raises(ValueError, match="kind"):
        FeatureLoss("l1")


def test_centred_cosine_is_the_cosine_of_the_batch_centred_rows_and_ignores_a_shared_component():
    torch.manual_seed(0)
    s, t = torch.randn(6, 8), torch.randn(6, 8)
    mask = torch.tensor([True, True, False, True, True, False])
    loss = FeatureLoss("cosine", center=True)(s, t, mask)
    rows = mask.nonzero().squeeze(1)
    sc, tc = s[rows] - s[rows].mean(0), t[rows] - t[rows].mean(0)
    by_hand = (1 - F.cosine_similarity(sc, tc, dim=-1)).mean()
    torch.testing.assert_close(loss, by_hand)
    # a vector added to every teacher row (the shared part of pooled features) moves the plain cosine, not the centred
    shared = 50 * torch.randn(8)
    plain = FeatureLoss("cosine")
    assert abs(float(plain(s, t + shared, mask)) - float(plain(s, t, mask))) > 0.1
    torch.testing.assert_close(FeatureLoss("cosine", center=True)(s, t + shared, mask), loss)
    # the rows left out by the mask neither count nor move the mean
    s2 = s.clone()
    s2[~mask] = 1e3
    torch.testing.assert_close(FeatureLoss("cosine", center=True)(s2, t, mask), loss)


def test_centring_needs_two_counted_rows_and_keeps_per_position_features():
    s, t = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5)
    one = torch.tensor([False, True, False])
    loss = FeatureLoss("mse", center=True)(s, t, one)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.isfinite(s.grad).all()
    s3, t3 = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    m3 = torch.tensor([[True, True, False, False], [True, True, True, False]])
    cs, ct, cm = center_features(s3, t3, m3)
    assert torch.equal(cm, m3)
    torch.testing.assert_close(cs[m3].mean(0), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(ct[m3].mean(0), torch.zeros(6), atol=1e-6, rtol=0)
