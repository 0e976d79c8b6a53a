"""`encdiff serve`: the API in-process (TestClient), a real uvicorn process under bounded concurrent load and
disconnects, a fuzz of the request body (never a 5xx), and the web page driven by a real headless Chromium."""

import base64
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import randomize_  # noqa: E402
from encdiff import Autoencoder, UNet  # noqa: E402
from encdiff.pipeline import DenoiserSpec, Generator, Sampling  # noqa: E402
from encdiff.presets import AUTOENCODERS, UNETS  # noqa: E402
from encdiff.server import ServerLimits, create_app  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
ARTIFACTS = Path(os.environ.get("ENCDIFF_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory) -> Path:
    """A tiny class-conditional latent generator (random weights, 16x16 images) saved as a folder."""
    import dataclasses

    unet = randomize_(UNet(dataclasses.replace(UNETS["tiny"], in_channels=4, out_channels=4, sample_size=8,
                                               num_classes=3, null_class=True)), seed=1)
    autoencoder = randomize_(Autoencoder(AUTOENCODERS["tiny"]), seed=2)
    generator = Generator(unet, DenoiserSpec(kind="edm", sigma_data=1.0), autoencoder, ["red", "green", "blue"],
                          Sampling(steps=6, guidance_scale=2.0))
    return generator.save_pretrained(tmp_path_factory.mktemp("gen") / "tiny")


@pytest.fixture(scope="module")
def client(generator_dir):
    app = create_app(Generator.from_pretrained(generator_dir), ServerLimits(max_images=8, max_steps=30))
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        yield c


def decode(png: str) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(base64.b64decode(png))))).permute(2, 0, 1)


def test_model_health_and_openapi_describe_the_service(client):
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/v1/model").json()
    assert info["classes"] == ["red", "green", "blue"] and info["image_size"] == 16
    assert info["sampling"] == {"sampler": "dpmpp_2m", "steps": 6, "schedule": "karras", "guidance_scale": 2.0,
                                "sigmas": None, "guidance_interval": None, "guidance_kind": "classifier-free",
                                "decoder": "full"}
    assert info["guidance_kinds"] == ["classifier-free"] and info["sizes"] == ["16x16"]
    assert info["limits"]["max_images"] == 8
    schema = client.get("/openapi.json").json()
    body = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"class", "num_images", "steps", "sampler", "guidance", "seed"} <= set(body)
    page = client.get("/")
    assert page.status_code == 200 and "<script src=\"/app.js\">" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_generate_gives_the_pixels_of_the_library_and_the_cli(client, generator_dir, tmp_path):
    response = client.post("/v1/generate", json={"class": "green", "num_images": 2, "seed": 11})
    assert response.status_code == 200, response.text
    data = response.json()
    assert [i["seed"] for i in data["images"]] == [11, 12] and {i["class"] for i in data["images"]} == {"green"}
    assert data["sampling"]["guidance_scale"] == 2.0
    served = torch.stack([decode(i["png"]) for i in data["images"]])
    library = Generator.from_pretrained(generator_dir).images([11, 12], torch.tensor([1, 1]))
    assert torch.equal(served, library)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cli = subprocess.run([sys.executable, "-m", "encdiff", "sample", str(generator_dir), "--class", "green", "--num",
                          "2", "--seed", "11", "--out-dir", str(tmp_path)], env=env, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    for i, seed in enumerate((11, 12)):
        assert torch.equal(torch.from_numpy(np.array(Image.open(tmp_path / f"{seed:06d}.png"))).permute(2, 0, 1),
                           served[i])


def test_the_stream_reports_progress_previews_then_the_result(client):
    with client.stream("POST", "/v1/generate/stream", json={"num_images": 2, "steps": 5, "seed": 3}) as response:
        assert response.status_code == 200
        text = "".join(response.iter_text())
    events = [(block.split("\n")[0][len("event: "):], json.loads(block.split("\n")[1][len("data: "):]))
              for block in text.strip().split("\n\n")]
    progress = [e for kind, e in events if kind == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5] and all(p["of"] == 5 for p in progress)
    assert [("previews" in p) for p in progress] == [False, True, False, True, True]
    assert decode(progress[1]["previews"][0]).shape == (3, 16, 16)
    assert events[-1][0] == "result" and len(events[-1][1]["images"]) == 2
    # no class given: a spread over the classes, as `encdiff sample` does
    assert [i["class"] for i in events[-1][1]["images"]] == ["red", "green"]


@pytest.mark.parametrize("body, field", [
    ({"num_images": 0}, "num_images"), ({"num_images": 9}, "num_images"), ({"num_images": "2"}, "num_images"),
    ({"steps": 31}, "steps"), ({"steps": 2.5}, "steps"), ({"sampler": "nope"}, "sampler"),
    ({"guidance": 0}, "guidance"), ({"guidance": 21}, "guidance"), ({"guidance": "inf"}, "guidance"),
    ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"seed": True}, "seed"),
    ({"class": "purple"}, "class"), ({"class": 3}, "class"), ({"class": ["red"]}, "class"),
    ({"colour": "red"}, "colour"), ({"size": "24x16"}, "size"), ({"size": "16"}, "size"), ({"size": 16}, "size"),
])
def test_bad_values_are_422_naming_the_field(client, body, field):
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 422, response.text
    assert field in [e["loc"][-1] for e in response.json()["detail"]] or any(
        field in e["loc"] for e in response.json()["detail"])


def test_nan_and_a_huge_or_malformed_body_are_refused_with_4xx(client):
    assert client.post("/v1/generate", content=b'{"guidance": NaN}', headers=JSON).status_code == 422
    assert client.post("/v1/generate", content=b'{"seed": 1e999}', headers=JSON).status_code == 422
    assert client.post("/v1/generate", content=b'{"seed": ', headers=JSON).status_code == 422
    assert client.post("/v1/generate", content=b"[]", headers=JSON).status_code == 422
    assert client.post("/v1/generate", content=b" " * 5000 + b"{}", headers=JSON).status_code == 413
    assert client.post("/v1/generate", content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 415


@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example"}, {"Origin": "null"}, {"Host": "evil.example"},
    {"Origin": "http://127.0.0.1.evil.example:8000"}, {"Sec-Fetch-Site": "cross-site"},
])
def test_cross_origin_state_changes_are_403(client, headers):
    response = client.post("/v1/generate", json={"num_images": 1}, headers=headers)
    assert response.status_code == 403, response.text
    # the same origin is fine, and a GET from anywhere changes nothing
    assert client.post("/v1/generate", json={"num_images": 1, "steps": 1},
                       headers={"Origin": "http://127.0.0.1:8000"}).status_code == 200


def test_fuzzed_bodies_never_get_a_5xx(client):
    rng = random.Random(0)
    values = [None, True, False, 0, 1, -1, 2**31, 2**63, 2**64, -(2**70), 1e308, -1e-308, 0.5, float("nan"),
              float("inf"), "", "cat", "red", "\u202egreen", "\x00", "😀" * 50, "x" * 1000, [], [1], {}, {"a": 1}]
    fields = ["class", "num_images", "steps", "sampler", "guidance", "seed", "extra", ""]
    statuses = []
    for _ in range(300):
        body = {rng.choice(fields): rng.choice(values) for _ in range(rng.randint(0, 4))}
        for key in list(body):
            if key in ("steps",) and isinstance(body[key], int) and not isinstance(body[key], bool) and body[key] > 3:
                body[key] = 3  # keep the valid ones cheap
        raw = json.dumps(body, allow_nan=True).encode()
        if rng.random() < 0.1:
            raw = raw[: rng.randint(0, len(raw))]
        statuses.append(client.post("/v1/generate", content=raw, headers=JSON).status_code)
    assert max(statuses) < 500, sorted(set(statuses))
    assert 200 in statuses and 422 in statuses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(generator_dir):
    """A real `encdiff serve` process on a loopback port: 2 jobs at a time at most."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "encdiff", "serve", str(generator_dir), "--port", str(port),
                                "--queue-size", "2", "--max-steps", "200"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not start within 60 s"
        time.sleep(0.2)
    yield url, process
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow  # a real uvicorn process under load
def test_concurrent_load_is_answered_or_refused_with_429_never_5xx(server):
    url, process = server
    httpx.post(url + "/v1/generate", json={"num_images": 8, "steps": 4}, timeout=60)  # warm up
    before = rss_mib(process.pid)
    statuses, retry_after = [], []
    lock = threading.Lock()

    def client(i: int):
        with httpx.Client(timeout=60) as c:
            for j in range(4):
                r = c.post(url + "/v1/generate", json={"num_images": 8, "steps": 8, "seed": i * 10 + j})
                with lock:
                    statuses.append(r.status_code)
                    if r.status_code == 429:
                        retry_after.append(r.headers.get("retry-after"))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and time.monotonic() - started < 120
    assert len(statuses) == 48 and set(statuses) <= {200, 429}, sorted(set(statuses))
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1  # 12 clients, 2 slots: some must wait
    assert all(r is not None and int(r) > 0 for r in retry_after)
    assert rss_mib(process.pid) - before < 400
    assert httpx.get(url + "/healthz", timeout=5).json()["jobs"] == 0


@pytest.mark.slow  # a real uvicorn process
def test_a_client_that_disconnects_cancels_its_job(server):
    url, _ = server
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url + "/v1/generate/stream", json={"num_images": 8, "steps": 200}) as response:
            for line in response.iter_lines():
                if line.startswith("event: progress"):
                    break  # one step done: hang up
    # 200 steps take several seconds; a cancelled job frees its slot within a step or two
    deadline = time.monotonic() + 5
    while httpx.get(url + "/healthz", timeout=5).json()["jobs"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(url + "/healthz", timeout=5).json()["jobs"] == 0


def chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.slow  # a real browser
@pytest.mark.skipif(chromium() is None, reason="Debian's chromium and chromium-driver are not installed "
                    "(.ci/run installs them)")
def test_the_page_in_a_real_browser_generates_and_shows_the_images(server):
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, _ = server
    browser, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#class option")) == 4)
        Select(driver.find_element(By.ID, "class")).select_by_visible_text("blue")
        for field, value in (("num_images", "3"), ("seed", "42"), ("steps", "6")):
            element = driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == 3)
        captions = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "#gallery a")]
        assert captions == ["blue 42 ↓", "blue 43 ↓", "blue 44 ↓"], captions
        assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "serve-page.png"))
        # the page's image equals the API's
        src = driver.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src")
        api = httpx.post(url + "/v1/generate", json={"class": "blue", "num_images": 1, "seed": 42, "steps": 6},
                         timeout=60).json()
        assert src == "data:image/png;base64," + api["images"][0]["png"]
    finally:
        driver.quit()


def test_a_consistency_student_is_served_with_its_guidance_built_in(generator_dir, tmp_path):
    teacher = Generator.from_pretrained(generator_dir)
    student = Generator(teacher.unet, DenoiserSpec(kind="consistency", sigma_data=1.0), teacher.autoencoder,
                        teacher.class_names, Sampling(sampler="consistency", steps=2, schedule="consistency"),
                        {"guidance_scale": 2.0})
    app = create_app(Generator.from_pretrained(student.save_pretrained(tmp_path / "student")), ServerLimits())
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        info = c.get("/v1/model").json()
        assert info["guidance_built_in"] == 2.0 and info["sampling"]["sampler"] == "consistency"
        refused = c.post("/v1/generate", json={"class": 1, "guidance": 3.0}, headers=JSON)
        assert refused.status_code == 422 and "built in" in refused.text and "guidance" in refused.text
        made = c.post("/v1/generate", json={"class": 1, "seed": 5}, headers=JSON)
        assert made.status_code == 200
        assert torch.equal(decode(made.json()["images"][0]["png"]), student.images([5], torch.tensor([1]))[0])


def test_only_the_samplers_that_fit_the_model_are_offered_and_accepted(client, generator_dir, tmp_path):
    """Issue 25, defect 13: the teacher's page offers no consistency sampling, the student's offers nothing else,
    and a request for a sampler that does not fit is a 422 naming the sampler field."""
    info = client.get("/v1/model").json()
    assert "consistency" not in info["samplers"] and "dpmpp_2m" in info["samplers"]
    refused = client.post("/v1/generate", json={"sampler": "consistency"}, headers=JSON)
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "sampler"]
    teacher = Generator.from_pretrained(generator_dir)
    student = Generator(teacher.unet, DenoiserSpec(kind="consistency", sigma_data=1.0), teacher.autoencoder,
                        teacher.class_names, Sampling(sampler="consistency", steps=2, schedule="consistency"))
    app = create_app(Generator.from_pretrained(student.save_pretrained(tmp_path / "student")), ServerLimits())
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/v1/model").json()["samplers"] == ["consistency"]
        refused = c.post("/v1/generate", json={"sampler": "dpmpp_2m"}, headers=JSON)
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "sampler"]


def test_the_guidance_interval_is_a_request_field_with_the_librarys_pixels(client, generator_dir):
    made = client.post("/v1/generate", json={"class": 2, "seed": 3, "guidance_interval": [0.5, 10]}, headers=JSON)
    assert made.status_code == 200
    expected = Generator.from_pretrained(generator_dir).images([3], torch.tensor([2]), guidance_interval=(0.5, 10.0))
    assert torch.equal(decode(made.json()["images"][0]["png"]), expected[0])
    for bad in ([3, 1], [1], [0, "x"]):
        refused = client.post("/v1/generate", json={"guidance_interval": bad}, headers=JSON)
        assert refused.status_code == 422 and "guidance_interval" in str(refused.json()["detail"][0]["loc"]), bad
