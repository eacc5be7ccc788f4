"""Test-time views (CCT): the views, the agreement signal, and the encode node recording the classifier on them."""

import numpy as np
import pytest
from PIL import Image

from agent import Agent
from agent.testing import FakeClassifier, backends
from models.tta import TTA_VIEWS, tta_agreement, tta_view


def test_views_are_the_named_flips_and_rotation():
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    img = Image.fromarray(a)
    assert np.array_equal(np.asarray(tta_view(img, "hflip")), a[:, ::-1])
    assert np.array_equal(np.asarray(tta_view(img, "vflip")), a[::-1])
    assert np.asarray(tta_view(img, "rot90")).shape == (3, 2, 3)
    with pytest.raises(ValueError, match="valid: hflip, vflip, rot90"):
        tta_view(img, "shear")


def test_agreement_counts_views_that_keep_the_label_among_the_candidates():
    views = [{"mel": 0.6, "nv": 0.4}, {"mel": 0.3, "nv": 0.7}, {"mel": 0.2, "bkl": 0.5, "nv": 0.3}]
    assert tta_agreement(views, "mel") == pytest.approx(1 / 3)
    assert tta_agreement(views, "mel", candidates=["mel", "nv"]) == pytest.approx(1 / 3)
    assert tta_agreement(views, "nv", candidates=["mel", "nv"]) == pytest.approx(2 / 3)
    assert tta_agreement([], "mel") == 0.5


class FlipSensitive(FakeClassifier):
    """Says melanoma for the image as given and nevus for any flipped or rotated view (its red column moves)."""

    def predict(self, images, metadata=None):
        out = super().predict(images, metadata)
        for i, im in enumerate(images):
            left_red = np.asarray(im, dtype=np.float32)[:, :2, 0].mean() > 200
            top = "mel" if left_red else "nv"
            out.probs[i] = np.array([0.9 if c == top else 0.1 / 6 for c in out.labels], np.float32)
        return out


def test_encode_records_the_classifier_on_each_configured_view():
    a = np.zeros((32, 32, 3), np.uint8)
    a[:, :2, 0] = 255
    img = Image.fromarray(a)
    clf = FlipSensitive()
    state = Agent(backends=backends(classifier=clf), overrides=["encoder.tta_views=[hflip, vflip]"]).run(img, until="encode")
    tops = [max(p, key=p.get) for p in state.encoding.tta_probs]
    assert clf.calls == 2 and tops == ["nv", "mel"]  # the mirror moves the red column; the top-bottom flip does not
    assert Agent(backends=backends()).run(img, until="encode").encoding.tta_probs == []
    assert TTA_VIEWS == ("hflip", "vflip", "rot90")
