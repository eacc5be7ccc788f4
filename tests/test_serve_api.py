"""The HTTP API with a double-backed agent: cases, review, auth, limits, storage."""

import json

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from tests.serve_helpers import TOKEN, make_app, png_bytes  # noqa: E402

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(tmp_path):
    with TestClient(make_app(tmp_path)) as c:
        yield c


def post_case(client, data=None, image=None, headers=AUTH):
    return client.post("/v1/cases", files={"image": ("lesion.png", image or png_bytes(), "image/png")}, data=data or {}, headers=headers)


def test_case_pauses_is_listed_and_resumed(client, tmp_path):
    r = post_case(client, {"question": "Is this melanoma?", "metadata": json.dumps({"age": 61, "sex": "f", "site": "back"})})
    assert r.status_code == 200, r.text
    body = r.json()
    cid = body["case_id"]
    assert body["status"] == "awaiting_review" and body["diagnosis"]["review_request"]["case_id"] == cid
    assert body["diagnosis"]["metadata"] == {"age": 61.0, "sex": "female", "site": "back", "fitzpatrick": None, "history": None}

    listed = client.get("/v1/cases?status=awaiting_review", headers=AUTH).json()
    assert [c["case_id"] for c in listed] == [cid] and listed[0]["label"] == "mel"
    assert client.get(f"/v1/cases/{cid}", headers=AUTH).json()["status"] == "awaiting_review"

    img = client.get(f"/v1/cases/{cid}/image", headers=AUTH)
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"

    r = client.post(f"/v1/cases/{cid}/review", json={"reviewer": "dr-a", "findings": {"blue_whitish_veil": "absent"}}, headers=AUTH)
    assert r.status_code == 200, r.text
    d = r.json()["diagnosis"]
    assert [t["node"] for t in d["trace"]].count("review") == 1 and d["review"]["records"][0]["changes"][0]["criterion"] == "blue_whitish_veil"
    r = client.post(f"/v1/cases/{cid}/review", json={"reviewer": "dr-a", "diagnosis": "nv"}, headers=AUTH)
    assert r.json()["status"] == "complete" and r.json()["diagnosis"]["review"]["override"] == "nv"
    assert client.get("/v1/cases?status=awaiting_review", headers=AUTH).json() == []
    assert client.post(f"/v1/cases/{cid}/review", json={"reviewer": "dr-a"}, headers=AUTH).status_code == 409


def test_auth_is_required(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert post_case(client, headers={}).status_code == 401
    assert post_case(client, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.get("/v1/cases")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/cases", "/v1/cases/{case_id}", "/v1/cases/{case_id}/review", "/healthz"}
    assert "<title>dermgraph review</title>" in client.get("/").text


def test_no_tokens_means_no_app(tmp_path):
    from serve.app import Settings, create_app

    with pytest.raises(ValueError, match="no tokens"):
        create_app(object(), Settings(data_dir=tmp_path))


def test_bad_uploads_are_rejected_with_clear_errors(client):
    r = post_case(client, image=b"%PDF-1.4 not an image at all")
    assert r.status_code == 422 and "not a usable image" in r.json()["detail"] and "unrecognised format" in r.json()["detail"]
    r = post_case(client, data={"metadata": json.dumps({"agee": 3})})
    assert r.status_code == 422 and "invalid metadata" in r.json()["detail"]
    assert client.post("/v1/cases", headers=AUTH).status_code == 422  # no image
    r = post_case(client, data={"metadata": json.dumps({"site": "x" * 300})})  # the agent's input limits (issue 15)
    assert r.status_code == 422 and "metadata.site: 300 characters, limit 200" in r.json()["detail"]


def test_oversized_upload_is_413(tmp_path):
    with TestClient(make_app(tmp_path, max_upload_bytes=4096)) as c:
        r = post_case(c, image=png_bytes(size=(400, 400), colour=(1, 2, 3)) + b"\0" * 8000)
        assert r.status_code == 413 and "too large" in r.json()["detail"]
        assert c.get("/v1/cases", headers=AUTH).json() == []


def test_pixel_bomb_is_rejected(tmp_path):
    with TestClient(make_app(tmp_path, max_pixels=100 * 100)) as c:
        r = post_case(c, image=png_bytes(size=(200, 200)))
        assert r.status_code == 422 and "too large" in r.json()["detail"] and "decompression bomb" in r.json()["detail"]


@pytest.mark.parametrize("bad", ["..%2F..%2Foutside-the-store", "..", "a%2F..%2Fb", "%2E%2E", "x" * 80])
def test_path_traversal_case_ids_are_rejected(client, bad):
    for url in (f"/v1/cases/{bad}", f"/v1/cases/{bad}/image"):
        r = client.get(url, headers=AUTH)
        assert r.status_code in (400, 404), (url, r.status_code)
        assert "root:" not in r.text
    assert client.get("/v1/cases/..%5C..%5Cwin.ini", headers=AUTH).status_code == 400  # reaches the handler: refused by the id check


def test_rate_limit_per_token(tmp_path):
    with TestClient(make_app(tmp_path, rate_limit=3)) as c:
        codes = [c.get("/v1/cases", headers=AUTH).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]


def test_images_are_stored_by_hash_without_exif_and_nothing_private_is_logged(tmp_path, caplog):
    photo = png_bytes(exif=True)
    caplog.set_level("DEBUG")  # everything the server and the libraries it calls log, at every level
    with TestClient(make_app(tmp_path)) as c:
        r = post_case(c, {"question": "itchy since May", "metadata": json.dumps({"history": "Patient Jane Roe"})}, image=photo)
        assert r.status_code == 200
        again = post_case(c, image=photo)
    stored = list((tmp_path / "data" / "images").iterdir())
    assert len(stored) == 1 and stored[0].name == f"{r.json()['diagnosis']['image_sha256']}.png"
    assert again.json()["diagnosis"]["image_sha256"] == r.json()["diagnosis"]["image_sha256"]
    assert b"SecretCameraMaker" not in stored[0].read_bytes() and b"Exif" not in stored[0].read_bytes()
    text = caplog.text
    assert "Jane Roe" not in text and "itchy" not in text and "SecretCameraMaker" not in text
    assert r.json()["case_id"] in text


def test_model_calls_do_not_block_the_event_loop(tmp_path):
    """While a case is inside a (blocked) model call, the server still answers other requests."""
    import threading

    import httpx

    from agent.testing import TestLLM, backends
    from tests.serve_helpers import ServerThread, make_agent

    entered, release = threading.Event(), threading.Event()

    class BlockingLLM(TestLLM):
        def score_continuations(self, *a, **k):
            entered.set()
            assert release.wait(60)
            return super().score_continuations(*a, **k)

    app = make_app(tmp_path, agent=make_agent(tmp_path, backends(llm=BlockingLLM())))
    with ServerThread(app) as srv:
        result = {}
        t = threading.Thread(target=lambda: result.update(r=httpx.post(f"{srv.url}/v1/cases", files={"image": ("x.png", png_bytes(), "image/png")}, headers=AUTH, timeout=60)))
        t.start()
        assert entered.wait(30)
        assert httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 200
        listed = httpx.get(f"{srv.url}/v1/cases", headers=AUTH, timeout=5)
        assert listed.status_code == 200 and [c["status"] for c in listed.json()] == ["running"]
        assert "r" not in result  # the case is still inside the model call
        release.set()
        t.join(30)
        assert result["r"].status_code == 200 and result["r"].json()["status"] == "awaiting_review"
