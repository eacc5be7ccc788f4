import numpy as np

from models.heads import Head, HeadSet, OODDetector


def test_headset_round_trip_preserves_predictions_with_transposed_weights(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 5)).T  # Fortran-ordered, as sklearn's coef_.T is
    hs = HeadSet(rng.normal(size=5).astype(np.float32), np.ones(5, np.float32),
                 {"h": Head("h", list("abc"), w.astype(np.float32), rng.normal(size=3).astype(np.float32))},
                 ood=OODDetector(rng.normal(size=(5, 2)).T.T.astype(np.float32), rng.normal(size=(3, 2)).astype(np.float32), 1.5),
                 meta={"id": "x"})
    x = rng.normal(size=(4, 5)).astype(np.float32)
    hs.save(tmp_path / "h.safetensors")
    back = HeadSet.load(tmp_path / "h.safetensors")
    np.testing.assert_allclose(back.predict_proba(x)["h"], hs.predict_proba(x)["h"], rtol=1e-5)
    np.testing.assert_allclose(back.ood_score(x), hs.ood_score(x), rtol=1e-5)
    assert back.meta == {"id": "x"} and back.heads["h"].classes == ["a", "b", "c"]
    assert np.allclose(back.predict_proba(x)["h"].sum(1), 1)
