"""Replay backends (models.backends.replay): recorded network outputs through the agent's backend seam."""

import json

import numpy as np
import pytest
from PIL import Image

from agent.agent import Agent
from agent.testing import FakeClassifier, FakeSecondExpert, backends
from models.backends import create
from models.backends.replay import ReplayClassifier, ReplayExpert
from models.pixels import pixel_sha256
from models.vocabulary import HAM_CLASSES


def _image(colour=(150, 80, 60), size=(32, 24)):
    return Image.new("RGB", size, colour)


def _recorded(img, clf=None, expert=None):
    clf, expert = clf or FakeClassifier(), expert or FakeSecondExpert()
    out = clf.predict([img])
    rc = ReplayClassifier(labels=out.labels, model_id=clf.model_id)
    rc.add(img, out.probs[0], out.features[0])
    feats, heads = expert.predict_heads([img])
    re = ReplayExpert(expert.info["heads"], model_id=expert.model_id)
    re.add(img, {h: v[0] for h, v in heads.items()}, feats[0])
    return rc, re


def test_a_replayed_case_is_the_live_case():
    """The graph with recorded outputs gives the same state, node for node, as with the live networks."""
    img = _image()
    rc, re = _recorded(img)
    live = Agent(backends=backends(second_expert=FakeSecondExpert())).run(img, until="verify")
    replay = Agent(backends=backends(classifier=rc, second_expert=re)).run(img, until="verify")
    strip = lambda s: json.dumps(s.model_dump(mode="json", exclude={"trace"}), sort_keys=True)  # noqa: E731
    assert strip(live) == strip(replay)
    assert [t.node for t in live.trace] == [t.node for t in replay.trace]


def test_unknown_image_is_an_error_not_an_output():
    rc, _ = _recorded(_image())
    with pytest.raises(KeyError, match="not in the replay table"):
        rc.predict([_image((1, 2, 3))])
    # the key is the decoded pixels: the same picture re-encoded is the same case
    again = Image.frombytes("RGB", (32, 24), _image().tobytes())
    assert rc.predict([again]).probs.shape == (1, len(HAM_CLASSES))


def test_expert_without_an_opinion_leaves_the_encoding_without_one():
    img = _image()
    rc, _ = _recorded(img)
    re = ReplayExpert(FakeSecondExpert().info["heads"])
    re.add(pixel_sha256(img), None)  # e.g. only in-sample outputs exist for this image
    state = Agent(backends=backends(classifier=rc, second_expert=re)).run(img, until="encode")
    assert state.encoding.expert_probs == {} and state.encoding.expert_features is None
    with pytest.raises(ValueError, match="unknown head"):
        re.add(img, {"nope": [1.0]})


def test_table_saved_and_named_in_a_config(tmp_path):
    img = _image()
    rc, _ = _recorded(img)
    path = rc.save(tmp_path / "outputs.npz")
    loaded = create("classifier", "replay", model=str(path))
    a, b = rc.predict([img]), loaded.predict([img])
    assert loaded.model_id == rc.model_id and loaded.labels == rc.labels and loaded.feature_dim == a.features.shape[1]
    assert np.array_equal(a.probs, b.probs) and np.array_equal(a.features, b.features)
