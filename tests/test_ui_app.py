"""`python -m mlx_clip.ui` end to end: one server on a random port over the shared trained run
(conftest.trained_run) and a folder of held-out built-in images; the JSON API checked against
mlx_clip.inference, its limits and what it refuses to serve, then the page in headless Chromium.

The browser tests need Debian's chromium and chromium-driver (scripts/setup.sh dev installs them)
and skip, saying so, where /usr/bin/chromium or /usr/bin/chromedriver is missing. Screenshots go to
the test's tmp dir; MLX_CLIP_UI_SCREENSHOT=docs/ui.png also copies one there for the README."""

import base64
import importlib.util
import io
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAINED_GRID, TRAINED_SIZE
from PIL import Image

from mlx_clip.data.synthetic import generate
from mlx_clip.data.synthetic_scene import COLORS, SHAPES

# The trained run tells these three colours apart on every held-out image (its shapes and the
# other colours only well above chance): the zero-shot check asks for a colour.
LABELS = ["red", "green", "blue"]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Held-out images (never trained on) as PNG files, and each one's colour name."""
    folder = tmp_path_factory.mktemp("ui_images")
    data = generate(12, TRAINED_SIZE, seed=0, part="val", split="single", grid=TRAINED_GRID)
    colours = []
    for i, (image, label, caps) in enumerate(zip(data.images, data.labels, data.captions, strict=True)):
        Image.fromarray(image).save(folder / f"img_{i:02d}.png")
        (folder / f"img_{i:02d}.txt").write_text("\n".join(caps) + "\n")  # the captions pool
        colours.append(list(COLORS)[int(label) // len(SHAPES)])
    return folder, colours


@pytest.fixture(scope="module")
def runs_root(trained_run, tmp_path_factory):
    """runs/run: a copy of the trained run; runs/live: a run "training" now (its lock names this
    process), whose metrics.jsonl the tests append to."""
    root = tmp_path_factory.mktemp("ui_runs")
    shutil.copytree(trained_run, root / "run", symlinks=True)
    live = root / "live"
    live.mkdir()
    config = (trained_run / "config.yaml").read_text().replace("\n  steps: 120\n", "\n  steps: 400\n")
    (live / "config.yaml").write_text(config.replace("\n  lr: 0.001\n", "\n  lr: 0.0005\n"))
    (live / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    append_train(live, range(2, 12, 2))
    make_sweep(root / "study")
    return root


def make_sweep(study_dir):
    """A finished 3-trial sweep as the sweep CLI leaves it (sweep.json, trial_<n>/ run dirs), its
    second trial the best; without optuna only the trial run directories."""
    for n in range(3):
        (study_dir / f"trial_{n}").mkdir(parents=True)
        (study_dir / f"trial_{n}" / "config.yaml").write_text(f"optim:\n  lr: {10.0 ** -(n + 2)}\n")
    storage = f"sqlite:///{study_dir / 'study.db'}"
    meta = {"study": "study", "storage": storage, "metric": "zeroshot_top1", "direction": "maximize"}
    (study_dir / "sweep.json").write_text(json.dumps(meta))
    if importlib.util.find_spec("optuna") is None:
        return
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="study", storage=storage, direction="maximize")
    for n, value in enumerate((0.2, 0.6, 0.4)):
        study.enqueue_trial({"lr": 10.0 ** -(n + 2)})
        trial = study.ask()
        trial.suggest_float("lr", 1e-5, 1.0, log=True)
        trial.set_user_attr("reason", f"zeroshot_top1 of trial {n}")
        study.tell(trial, value)


def append_train(run, steps):
    with open(run / "metrics.jsonl", "a") as f:
        for step in steps:
            record = {
                "event": "train",
                "step": step,
                "loss": 4.0 - step / 100,
                "lr": 5e-4,
                "img_per_s": 320.0,
            }
            f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="module")
def server(runs_root, images):
    from mlx_clip.ui.__main__ import build, parse_args

    args = parse_args(["--runs", str(runs_root), "--port", "0", "--index", str(images[0])])
    httpd = build(args)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(server, path=""):
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def call(server, path, body=None, headers=None, raw=None):
    """(status, JSON answer) of a GET (body None) or a POST of JSON (or raw bytes)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url(server, path), data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def b64(path):
    return base64.b64encode(Path(path).read_bytes()).decode()


@pytest.fixture(scope="module")
def loaded(trained_run):
    import mlx_clip

    return mlx_clip.load(trained_run)


# ---------------------------------------------------------------------------------------- API


def test_runs_api_lists_the_trained_run(server, images):
    status, out = call(server, "/api/runs")
    assert status == 200
    rows = {r["name"]: r for r in out["runs"]}
    assert rows["run"]["status"] == "finished" and rows["run"]["step"] == rows["run"]["total_steps"] == 120
    assert rows["live"]["status"] == "running" and rows["live"]["eta_s"] > 0
    (sweep,) = out["sweeps"]
    assert sweep["name"] == "study" and [t["run"] for t in sweep["trials"]] == [
        f"study/trial_{n}" for n in range(3)
    ]
    _, detail = call(server, "/api/run?name=run")
    assert len(detail["train"]) == 60 and detail["config"]["train"]["steps"] == 120
    _, models = call(server, "/api/models")
    assert [c["name"] for c in models["checkpoints"]] == ["run"] and models["folders"] == [images[0].name]
    _, diff = call(server, "/api/diff?name=run&name=live")
    assert {r["key"]: r["values"] for r in diff["rows"]} == {
        "optim.lr": {"run": 0.001, "live": 0.0005},
        "train.steps": {"run": 120, "live": 400},
    }


def test_embeddings_match_inference(server, loaded, images):
    from mlx_clip.inference import encode_images, encode_texts

    model, tokenizer, preprocess = loaded
    texts = ["a red circle", "a photo of a big blue cross"]
    status, out = call(server, "/v1/embeddings", {"input": texts})
    assert status == 200 and out["object"] == "list" and out["model"] == "run", out
    assert [d["index"] for d in out["data"]] == [0, 1] and {d["object"] for d in out["data"]} == {"embedding"}
    got = np.array([d["embedding"] for d in out["data"]])
    np.testing.assert_allclose(got, encode_texts(model, tokenizer, texts), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert out["usage"]["prompt_tokens"] == out["usage"]["total_tokens"] > 0

    paths = sorted(images[0].glob("*.png"))[:3]
    status, out = call(
        server, "/v1/embeddings", {"images": [b64(p) for p in paths], "encoding_format": "base64"}
    )
    assert status == 200 and out["usage"]["images"] == 3
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in out["data"]])
    np.testing.assert_allclose(got, encode_images(model, preprocess, paths), atol=1e-5)


def test_classify_json_and_multipart(server, images):
    folder, colours = images
    i = next(k for k, c in enumerate(colours) if c in LABELS)
    path = folder / f"img_{i:02d}.png"
    status, out = call(server, "/v1/classify", {"image": b64(path), "labels": LABELS})
    assert status == 200 and out["probability"] == "softmax"
    assert out["top"][0]["label"] == colours[i] and abs(sum(out["probs"].values()) - 1) < 1e-5

    boundary = "----mlxclip"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="labels"\r\n\r\n' + "\n".join(LABELS) + "\r\n",
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n",
    ]
    body = "".join(parts).encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, multi = call(server, "/v1/classify", raw=body, headers=headers)
    assert status == 200 and multi["probs"] == pytest.approx(out["probs"], abs=1e-6)


def test_search_uses_the_predict_index_and_serves_thumbnails(server, images):
    folder, _ = images
    status, out = call(server, "/v1/search", {"query": "a red circle", "top": 5})
    assert status == 200 and out["images"] == 12 and len(out["results"]) == 5
    scores = [r["score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)
    assert any((folder / ".mlx_clip_index").glob("*.safetensors"))  # predict --index's cache
    with urllib.request.urlopen(url(server, out["results"][0]["thumbnail"])) as r:
        assert r.headers["Content-Type"] == "image/png"
        assert Image.open(io.BytesIO(r.read())).size == (TRAINED_SIZE, TRAINED_SIZE)


def test_captions_rank_by_similarity(server, loaded, images):
    from mlx_clip.inference import encode_images, encode_texts

    model, tokenizer, preprocess = loaded
    path = sorted(images[0].glob("*.png"))[0]
    pool = ["a red circle", "a green square", "a blue cross", "a yellow triangle"]
    status, out = call(server, "/v1/captions", {"image": b64(path), "captions": pool, "top": 4})
    assert status == 200
    expected = (encode_images(model, preprocess, [path]) @ encode_texts(model, tokenizer, pool).T)[0]
    assert [c["caption"] for c in out["captions"]] == [pool[j] for j in np.argsort(-expected, kind="stable")]

    folder_captions = {t for p in images[0].glob("*.txt") for t in p.read_text().splitlines()}
    status, out = call(server, "/v1/captions", {"image": b64(path), "top": 3})  # no pool: the folder's
    assert status == 200 and len(out["captions"]) == 3
    assert {c["caption"] for c in out["captions"]} <= folder_captions


def test_requests_are_batched(server):
    service = server.RequestHandlerClass.app.service
    before, service.batch_wait_s = service.batches, 0.3  # a long window: all 8 arrive within it
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(lambda t: call(server, "/v1/embeddings", {"input": t}), map(str, range(8)))
            )
    finally:
        service.batch_wait_s = 0.005
    assert all(status == 200 for status, _ in answers)
    assert service.batches - before < 8


def bomb_png() -> bytes:
    """A PNG of 9500 x 9500 one-bit pixels: small on disk, over training's max_image_pixels."""
    buf = io.BytesIO()
    Image.new("1", (9500, 9500)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"image": base64.b64encode(b"not an image").decode(), "labels": LABELS}, 400, "not an image"),
        ({"image": "###", "labels": LABELS}, 400, "not valid base64"),
        ({"labels": LABELS}, 400, "no image"),
        ({"image": "", "labels": []}, 400, '"labels" is missing'),
        ("bomb", 400, "decompression bomb"),
        ("strip", 400, "aspect ratio"),
        (b"{not json", 400, "not JSON"),
        ({"image": "", "labels": LABELS, "model": "../etc"}, 404, "no run named"),
    ],
)
def test_bad_requests_are_4xx_with_a_message(server, body, status, message):
    if body == "bomb":
        body = {"image": base64.b64encode(bomb_png()).decode(), "labels": LABELS}
    if body == "strip":
        buf = io.BytesIO()
        Image.new("RGB", (400, 4)).save(buf, format="PNG")
        body = {"image": base64.b64encode(buf.getvalue()).decode(), "labels": LABELS}
    raw = body if isinstance(body, bytes) else None
    got, out = call(server, "/v1/classify", None if raw else body, raw=raw)
    assert got == status and message in out["error"]["message"]


def test_limits_and_what_is_never_served(server, trained_run):
    app = server.RequestHandlerClass.app
    with socket.create_connection(server.server_address[:2]) as sock:  # headers only, no body sent
        sock.sendall(
            f"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Length: {app.max_upload + 1}\r\n"
            "Content-Type: application/json\r\n\r\n".encode()
        )
        answer = sock.makefile("rb").read().decode()  # to the end: the server closes the connection
    assert answer.startswith("HTTP/1.1 413") and "over the limit" in answer  # from Content-Length alone
    assert call(server, "/api/runs", headers={"Host": "evil.example:80"})[0] == 403  # DNS rebinding
    for path in (
        "/api/run?name=..",
        f"/api/run?name={trained_run.parent.parent}",  # above the root
        "/api/thumb?folder=ui_images0&path=../run/config.yaml",
        "/api/thumb?folder=nope&path=img_00.png",
        "/static/../runs.py",
        "/static/index.html",
    ):
        assert call(server, path)[0] == 404, path
    assert call(server, "/api/runs")[0] == 200  # the server is still up


# ------------------------------------------------------------------------------------ browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} missing: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver's path given: Selenium Manager stays idle
    flags = (
        "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking"
    )
    more = (
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    )
    for flag in (*flags.split(), *more):  # --disable-dev-shm-usage: a container's small /dev/shm
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def screenshot(driver, tmp_path, name):
    """Into the test's tmp dir, and to $MLX_CLIP_UI_SCREENSHOT (the README's picture) when set."""
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    target = os.environ.get("MLX_CLIP_UI_SCREENSHOT")
    if target and name == "runs":
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return path


def points(driver, chart, run):
    """How many points the page drew for `run` in `chart` (0 while there is no such line)."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, f'#{chart} polyline[data-run="{run}"]')
    return int(found[0].get_attribute("data-points")) if found else 0


def test_page_lists_runs_with_live_curves_and_diff(server, runs_root, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(url(server, "/"))
    row = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-run="run"]'))[0]
    assert "finished" in row.text and "120 / 120" in row.text
    live = browser.find_element(By.CSS_SELECTOR, 'tr[data-run="live"]').text
    assert "running" in live and "10 / 400" in live
    wait_for(browser, lambda d: points(d, "chart-loss", "live") == 5)
    append_train(runs_root / "live", range(12, 22, 2))  # the run goes on: the page's next poll shows it
    wait_for(browser, lambda d: points(d, "chart-loss", "live") == 10 and "20 / 400" in d.find_element(
        By.CSS_SELECTOR, 'tr[data-run="live"]').text)  # fmt: skip
    diff = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#diff tbody tr"))
    assert sorted(r.text.split()[0] for r in diff) == ["optim.lr", "train.steps"]
    trials = browser.find_elements(By.CSS_SELECTOR, '.sweep[data-sweep="study"] tbody tr')
    assert len(trials) == 3
    if importlib.util.find_spec("optuna"):  # the study read: its best trial marked
        assert [t.get_attribute("data-trial") for t in trials if "best" in t.get_attribute("class")] == ["1"]
        assert "zeroshot_top1 of trial 1" in trials[1].text
    assert points(browser, "chart-loss", "run") == 60  # one point per logged train step
    line = browser.find_element(By.CSS_SELECTOR, '#chart-loss polyline[data-run="run"]')
    assert len(line.get_attribute("points").split()) == 60
    assert points(browser, "chart-eval", "run") == 1  # the final evaluation
    assert screenshot(browser, tmp_path, "runs").stat().st_size > 0


def test_page_zero_shot_and_search(server, browser, images, tmp_path):
    from selenium.webdriver.common.by import By

    folder, colours = images
    i = next(k for k, c in enumerate(colours) if c in LABELS)
    browser.get(url(server, "/"))
    browser.find_element(By.CSS_SELECTOR, '.tab[data-tab="try-tab"]').click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#model option[value="run"]'))
    browser.find_element(By.ID, "file").send_keys(str(folder / f"img_{i:02d}.png"))
    wait_for(browser, lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:"))
    labels = browser.find_element(By.ID, "labels")
    labels.clear()
    labels.send_keys("\n".join(LABELS))
    browser.find_element(By.ID, "classify").click()
    rows = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#probs .prob"))
    assert [r.get_attribute("data-label") for r in rows][0] == colours[i]
    assert sorted(r.get_attribute("data-label") for r in rows) == sorted(LABELS)

    browser.find_element(By.ID, "query").send_keys("a red circle")
    browser.find_element(By.ID, "search").click()
    thumbs = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#results img"))
    loaded = lambda d: all(
        d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", t) for t in thumbs
    )  # noqa: E731
    wait_for(browser, loaded)
    assert len(thumbs) == 12 and browser.find_element(By.ID, "error").text == ""

    browser.find_element(By.ID, "captions").click()  # the folder's captions nearest the image
    assert len(wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#caption-list li"))) == 5
    screenshot(browser, tmp_path, "try")


def test_load_benchmark_runs_against_the_server(server, images):
    """benchmarks/ui_load.py's clients for one second: every answer as expected, no 5xx."""
    from benchmarks.ui_load import load

    image = base64.b64encode(sorted(images[0].glob("*.png"))[0].read_bytes()).decode()
    out = load(url(server), image, clients=2, seconds=1.0)
    assert out["requests"] > 0 and out["errors"] == 0 and out["server_errors_5xx"] == 0 and out["alive_after"]


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_full_queue_refuses_and_the_host_default_is_local(runs_root):
    from mlx_clip.ui.__main__ import host_warning, parse_args
    from mlx_clip.ui.model_service import Busy, ModelService
    from mlx_clip.ui.runs import RunsFolder

    service = ModelService(RunsFolder(runs_root), {}, max_pending=1)
    started, gate = threading.Event(), threading.Event()

    def busy(group):  # the inference thread holds its first job until the gate opens
        started.set()
        gate.wait(30)
        return [None] * len(group)

    service._run = busy
    first = ThreadPoolExecutor(2)
    running = first.submit(service.submit, "texts", "run", ["a"])
    assert started.wait(30)
    queued = first.submit(service.submit, "texts", "run", ["b"])
    wait_until(lambda: service.jobs.qsize() == 1)
    with pytest.raises(Busy, match="waiting"):
        service.submit("texts", "run", ["c"])  # the queue is full: refused at once, not queued
    gate.set()
    assert running.result(30) is None and queued.result(30) is None
    first.shutdown()

    assert parse_args(["--runs", str(runs_root)]).host == "127.0.0.1" and host_warning("127.0.0.1") is None
    assert "no login" in host_warning("0.0.0.0")
