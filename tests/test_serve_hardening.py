"""`dermgraph serve` hardening: private data folder, settings checked before the port is bound, failed logins
limited, reviews tied to the token, logs without patient data, no secrets in the environment, the LangGraph
server's path input opt-in, and the review CLI's error paths."""

import json
import logging
import logging.config
import os
import stat

import pytest

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from dermgraph.cli import app as cli  # noqa: E402
from serve import langgraph_app  # noqa: E402
from serve.app import ENV_SETTINGS, app_from_env, create_app, log_config  # noqa: E402
from serve.settings import Settings, SettingsError, fingerprint, load_tokens, secure_data_dir  # noqa: E402
from tests.serve_helpers import make_agent, png_bytes  # noqa: E402

runner = CliRunner()
SECRET = "s3cret-token-for-dr-a-0123456789"
OTHER = "another-long-token-9876543210"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(autouse=True)
def keep_umask_and_env(monkeypatch):
    """serve sets the process umask and its settings variable: give both back after each test."""
    old = os.umask(0o022)
    os.umask(old)
    monkeypatch.setenv(ENV_SETTINGS, "")
    monkeypatch.delenv("DERMGRAPH_API_TOKENS", raising=False)
    yield
    os.umask(old)


@pytest.fixture
def no_bind(monkeypatch):
    """uvicorn.run replaced: a command that reaches it would have bound the port."""
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: calls.append((a, k, os.environ.get(ENV_SETTINGS))))
    return calls


def serve(*args, **env):
    return runner.invoke(cli, ["serve", *args], env=env or None)


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def post_case(client, token, data=None):
    return client.post("/v1/cases", files={"image": ("x.png", png_bytes(), "image/png")}, data=data or {}, headers=auth(token))


# 1. patient data readable by the user only -----------------------------------------------------


def test_data_folder_and_files_are_private(tmp_path):
    data = tmp_path / "data"
    with TestClient(create_app(make_agent(tmp_path), Settings(data_dir=data, tokens=[SECRET]))) as c:
        assert post_case(c, SECRET).status_code == 200
    assert mode(data) == 0o700 and mode(data / "images") == 0o700
    assert [mode(p) for p in (data / "images").iterdir()] == [0o600]


def test_existing_loose_folder_is_tightened_and_a_foreign_one_refused(tmp_path, monkeypatch):
    data = tmp_path / "loose"
    (data / "images").mkdir(parents=True)
    os.chmod(data, 0o755)
    (data / "cases.sqlite").write_bytes(b"")
    os.chmod(data / "cases.sqlite", 0o644)
    notes = secure_data_dir(data)
    assert mode(data) == 0o700 and mode(data / "cases.sqlite") == 0o600
    assert any("0755 -> 0700" in n for n in notes)
    assert secure_data_dir(data) == []  # nothing left to tighten

    monkeypatch.setattr(os, "getuid", lambda: os.stat(data).st_uid + 1)
    with pytest.raises(SettingsError, match="belongs to another account"):
        secure_data_dir(data)


# 2, 3. settings and agent configuration checked before the port is bound -------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--review", "sometimes"], "--review: Input should be 'never', 'always', 'on_abstain' or 'on_revise' (got 'sometimes')"),
        (["--where", "nowhere"], "--where: Input should be 'morphology' or 'verify'"),
        (["--rate-limit", "0"], "--rate-limit: Input should be greater than or equal to 1"),
        (["--max-upload-mb", "0"], "--max-upload-mb: Input should be greater than or equal to 0.001"),
        (["--set", "foo.bar=1"], "invalid agent configuration: foo: "),
        (["--config", "/no/such/config.yaml"], "invalid agent configuration: --config /no/such/config.yaml: no such file"),
        (["--backends", "no.such.module:make"], "--backends no.such.module:make: No module named 'no'"),
    ],
)
def test_bad_settings_fail_in_one_line_before_binding(tmp_path, no_bind, args, message):
    res = serve("--data-dir", str(tmp_path / "d"), *args, DERMGRAPH_API_TOKENS=SECRET)
    assert res.exit_code == 2 and no_bind == []
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), res.stderr
    assert "Traceback" not in res.output and "serving on" not in res.stderr
    assert not (tmp_path / "d").exists()  # nothing written either


def test_bad_yaml_config_is_one_line(tmp_path, no_bind):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("review: {when: sometimes}\n")
    res = serve("--config", str(cfg), DERMGRAPH_API_TOKENS=SECRET)
    assert res.exit_code == 2 and no_bind == [] and len(res.stderr.strip().splitlines()) == 1
    assert "invalid agent configuration: review.when: Input should be" in res.stderr


def test_settings_review_policy_is_typed():
    with pytest.raises(ValueError, match="when"):
        Settings(review={"when": "sometimes"})
    assert Settings(review="on_abstain").review.when == "on_abstain"


# 4. failed authentication limited per address; short tokens refused ---------------------------------


def test_failed_logins_are_rate_limited_per_address(tmp_path):
    app = create_app(make_agent(tmp_path), Settings(data_dir=tmp_path / "d", tokens=[SECRET], auth_failures=3))
    with TestClient(app, client=("203.0.113.7", 5000)) as attacker, TestClient(app, client=("198.51.100.1", 5000)) as other:
        codes = [attacker.get("/v1/cases", headers=auth(f"guess-{i}")).status_code for i in range(4)]
        assert codes == [401, 401, 401, 429]
        r = attacker.get("/v1/cases", headers=auth(SECRET))  # a right guess is not revealed while blocked
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "failed authentication" in r.json()["detail"]
        assert other.get("/v1/cases", headers=auth(SECRET)).status_code == 200


def test_failure_counts_do_not_grow_without_bound(monkeypatch):
    from types import SimpleNamespace

    from serve.app import RateLimiter

    clock = [0.0]
    monkeypatch.setattr("serve.app.time", SimpleNamespace(monotonic=lambda: clock[0]))
    lim = RateLimiter(1)
    lim.max_keys = 3
    for i in range(4):
        assert lim.allow(f"10.0.0.{i}") is None
    assert lim.allow("10.0.0.1") is not None  # within the minute: still counted
    clock[0] = 61.0
    assert lim.allow("10.0.0.9") is None and set(lim.hits) == {"10.0.0.9"}
    assert lim.allow("10.0.0.5", record=False) is None and "10.0.0.5" not in lim.hits


def test_short_tokens_are_refused_at_startup(tmp_path, no_bind):
    res = serve("--data-dir", str(tmp_path / "d"), DERMGRAPH_API_TOKENS="change-me")
    assert res.exit_code == 2 and no_bind == [] and "shorter than 16 characters" in res.stderr and "change-me" not in res.stderr


# 5. reviews recorded under the token's name --------------------------------------------------------


def test_tokens_file_names_tokens_and_stays_compatible(tmp_path):
    f = tmp_path / "tokens"
    f.write_text(f"# comment\n{OTHER}\ndr-a:{SECRET}\n")
    tokens = load_tokens(f)
    assert [t.name for t in tokens][1] == "dr-a" and tokens[0].name.startswith("sha256:") and OTHER not in tokens[0].name
    assert SECRET not in repr(tokens) and tokens[1].secret.get_secret_value() == SECRET
    f.write_text("bad name!:" + SECRET)
    with pytest.raises(SettingsError, match="token name"):
        load_tokens(f)


def test_review_is_recorded_under_the_tokens_name(tmp_path):
    app = create_app(make_agent(tmp_path), Settings(data_dir=tmp_path / "d", tokens=[f"dr-a:{SECRET}", OTHER]))
    with TestClient(app) as c:
        ids = [post_case(c, SECRET, {"question": str(i)}).json()["case_id"] for i in range(3)]
        recorded = []
        for cid, token, claimed in zip(ids, [SECRET, SECRET, OTHER], [None, "dr-b", "dr-c"]):
            body = {"diagnosis": "mel"} | ({"reviewer": claimed} if claimed else {})
            r = c.post(f"/v1/cases/{cid}/review", json=body, headers=auth(token))
            assert r.status_code == 200, r.text
            recorded.append(r.json()["diagnosis"]["review"]["records"][-1]["reviewer"])
    fp = fingerprint(OTHER)
    assert recorded == ["dr-a", "dr-b [token dr-a]", f"dr-c [token {fp}]"]


# 6. logs: case ids and timings, never patient data -------------------------------------------------


@pytest.fixture
def serve_log():
    """The logging `dermgraph serve` hands uvicorn, its handler writing to a buffer; restored afterwards."""
    import io

    names = ["dermgraph", "uvicorn", "uvicorn.error", "uvicorn.access", "PIL"]
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names}
    logging.config.dictConfig(log_config())
    buf = io.StringIO()
    for h in logging.getLogger("dermgraph").handlers:
        h.setStream(buf)
    yield buf
    for n, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


def test_created_case_logs_its_id_and_no_patient_data(tmp_path, serve_log):
    with TestClient(create_app(make_agent(tmp_path), Settings(data_dir=tmp_path / "d", tokens=[SECRET]))) as c:
        r = post_case(c, SECRET, {"question": "itchy since May", "metadata": json.dumps({"history": "Patient Jane Roe", "site": "left cheek"})})
        assert r.status_code == 200
        cid = r.json()["case_id"]
        c.post(f"/v1/cases/{cid}/review", json={"diagnosis": "mel", "note": "seen with Jane Roe"}, headers=auth(SECRET))
    text = serve_log.getvalue()
    assert f"INFO:     case {cid} created: awaiting_review in " in text and f"case {cid} reviewed: complete in " in text
    assert "Jane Roe" not in text and "itchy" not in text and "cheek" not in text


# 9. tokens never go into the environment; the workers re-read them -----------------------------------


def test_serve_passes_the_tokens_file_not_the_tokens(tmp_path, no_bind):
    f = tmp_path / "tokens"
    f.write_text(f"dr-a:{SECRET}\n")
    data = tmp_path / "data"
    os.makedirs(data)
    os.chmod(data, 0o755)
    res = serve("--tokens-file", str(f), "--data-dir", str(data), "--backends", "agent.testing:backends", "--review", "always", "--where", "morphology")
    assert res.exit_code == 0, res.output
    (args, kwargs, env), = no_bind
    assert SECRET not in env and json.loads(env)["tokens_file"] == str(f.resolve())
    assert kwargs["log_config"]["loggers"]["dermgraph"]["level"] == "INFO"
    assert "0755 -> 0700" in res.stderr and mode(data) == 0o700 and "serving on" in res.stderr

    os.environ[ENV_SETTINGS] = env  # what the worker reads
    with TestClient(app_from_env()) as c:
        r = post_case(c, SECRET)
        assert r.status_code == 200 and r.json()["diagnosis"]["review_request"]["stage"] == "morphology"
    assert mode(data / "cases.sqlite") == 0o600
    assert all(mode(p) == 0o600 for p in data.glob("cases.sqlite*"))


# 10. consistent limits and one-line messages --------------------------------------------------------


def test_limits_and_messages_are_consistent(tmp_path):
    app = create_app(make_agent(tmp_path), Settings(data_dir=tmp_path / "d", tokens=[SECRET], max_pixels=100 * 100))
    with TestClient(app) as c:
        r = c.post("/v1/cases", files={"image": ("x.png", png_bytes(size=(200, 200)), "image/png")}, headers=auth(SECRET))
        assert r.status_code == 422 and "--max-pixels" in r.json()["detail"] and "limits.max_image_pixels" not in r.json()["detail"]
        assert post_case(c, SECRET, {"question": "x" * 3000}).status_code == 200  # under limits.max_question_chars (4000)
        r = post_case(c, SECRET, {"question": "x" * 4001})
        assert r.status_code == 422 and r.json()["detail"] == "invalid question: 4001 characters, limit 4000 (limits.max_question_chars)"
        cid = post_case(c, SECRET).json()["case_id"]
        r = c.post(f"/v1/cases/{cid}/review", json={"reviewer": "   ", "diagnosis": "mel"}, headers=auth(SECRET))
        assert r.status_code == 422 and r.json()["detail"] == "invalid request: reviewer: reviewer must not be blank (omit it to record the token's name)"
        r = c.post(f"/v1/cases/{cid}/review", json={"findings": {"blue_whitish_veil": "maybe"}}, headers=auth(SECRET))
        assert r.status_code == 422 and "\n" not in r.json()["detail"] and "valid: absent, present" in r.json()["detail"]
        r = post_case(c, SECRET, {"metadata": json.dumps({"agee": 3})})
        assert r.json()["detail"] == "invalid metadata: agee: Extra inputs are not permitted"


# 7, 8. the review CLI -------------------------------------------------------------------------------


def test_review_cli_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("DERMGRAPH_BACKENDS", "agent.testing:backends")
    store = tmp_path / "cases.sqlite"
    make_agent(tmp_path).diagnose(png_bytes(), thread_id="case-1", review="always")
    res = runner.invoke(cli, ["review", "show", "nope", "--store", str(store)])
    assert res.exit_code == 2 and res.stderr.strip() == "error: no case 'nope'"
    res = runner.invoke(cli, ["review", "resume", "case-1", "--store", str(store), "--reviewer", "  ", "--diagnosis", "mel"])
    assert res.exit_code == 2 and res.stderr.strip() == "error: --reviewer must not be blank"

    typo = tmp_path / "typo" / "cases.sqlite"
    for cmd in (["list"], ["show", "case-1"], ["resume", "case-1", "--diagnosis", "mel", "--reviewer", "dr-a"]):
        res = runner.invoke(cli, ["review", *cmd, "--store", str(typo)])
        assert res.exit_code == 2 and f"no case store at {typo}" in res.stderr, res.output
    assert not typo.parent.exists()


# 11. the LangGraph server reads files only when allowed ------------------------------------------------


def test_langgraph_paths_are_opt_in(tmp_path, monkeypatch):
    from agent.imageio import ImageInputError

    existing, missing, not_image = tmp_path / "x.png", tmp_path / "nothing.png", tmp_path / "notes.txt"
    existing.write_bytes(png_bytes())
    not_image.write_text("secret notes")
    monkeypatch.delenv(langgraph_app.ENV_ALLOW_PATHS, raising=False)
    messages = set()
    for p in (existing, missing, not_image, "/etc/passwd"):
        with pytest.raises(ImageInputError) as err:
            langgraph_app.decode_image_input(str(p))
        messages.add(str(err.value))
    assert messages == {f"cannot read image '<input>': image must be base64 or a data:image/...;base64, URL (file paths are off; {langgraph_app.ENV_ALLOW_PATHS}=1 on the server allows them)"}

    monkeypatch.setenv(langgraph_app.ENV_ALLOW_PATHS, "1")
    assert langgraph_app.decode_image_input(str(existing)) == existing
