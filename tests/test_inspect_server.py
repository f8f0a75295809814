"""knnlm inspect's server as a user meets it: started by the CLI on a free loopback port,
driven in headless Chromium (Debian's chromium + chromium-driver, through selenium), loaded by
8 concurrent clients with valid and malformed requests, and stopped with Ctrl-C.

Outside CI a missing browser skips the browser test; with CI=true it fails it."""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np
import pytest

from test_inspect import TEXT, brute_force
from tiny import run_cli, small_datastore

K, WEIGHT, TEMP = 6, 0.3, 2.0


@pytest.fixture(scope="module")
def ds_dir(lm, small_corpus, tmp_path_factory):
    return small_datastore(lm, small_corpus, tmp_path_factory.mktemp("inspect_server") / "ds")


@pytest.fixture(scope="module")
def server(tiny_lm_dir, ds_dir):
    """``knnlm inspect`` in its own process; yields (process, host, port)."""
    cmd = [sys.executable, "-m", "knnlm", "inspect", "-m", str(tiny_lm_dir), "-d", str(ds_dir),
           "--k-max", "16", "--k", str(K), "--knn-weight", str(WEIGHT), "--knn-temperature",
           str(TEMP), "--max-pending", "8"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # the URL line, printed once listening
    if "http://" not in line:
        proc.kill()
        pytest.fail(f"knnlm inspect did not start: {line!r} {proc.stderr.read()[-2000:]}")
    url = urlparse(line.split()[line.split().index("on") + 1])
    yield proc, url.hostname, url.port
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def call(host, port, method, path, body=b"", headers=None) -> tuple[int, dict, bytes, float]:
    """One request on its own connection: (status, headers, body, seconds)."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    start = time.perf_counter()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return (
            resp.status,
            {k.lower(): v for k, v in resp.getheaders()},
            data,
            time.perf_counter() - start,
        )
    finally:
        conn.close()


def answer(data: bytes) -> dict:
    out = json.loads(data)
    out.pop("searches", None)  # the server's running count of searches
    out.get("view", {}).pop("searches", None)
    return out


# -- the browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI: chromium and chromium-driver must be installed (.ci/run does)")
        pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver)")
    if os.environ.get("CI") != "true":
        pytest.importorskip("selenium")
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1600"):  # fmt: skip
        opts.add_argument(arg)
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))
    yield drv
    drv.quit()


def wait(drv, check, what: str):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # An element read while the page redraws it is stale: look again on the next poll.
    waiter = WebDriverWait(drv, 30, poll_frequency=0.05,
                           ignored_exceptions=[StaleElementReferenceException])  # fmt: skip
    return waiter.until(lambda d: check(d), message=what)


def read_token(drv) -> dict:
    """What the page shows for the chosen token, from its elements' data attributes."""
    from selenium.webdriver.common.by import By

    rows = drv.find_elements(By.CSS_SELECTOR, "#neighbours tbody tr")
    out = {"rows": [int(r.get_attribute("data-row")) for r in rows],
           "dist": [float(r.get_attribute("data-distance")) for r in rows],
           "weights": [float(r.get_attribute("data-weight")) for r in rows]}  # fmt: skip
    for name in ("lm", "knn", "mix"):
        out[name] = float(drv.find_element(By.ID, f"p-{name}").get_attribute("data-value"))
        out["top_" + name] = [
            (int(r.get_attribute("data-id")), float(r.get_attribute("data-p")))
            for r in drv.find_elements(By.CSS_SELECTOR, f"#dist-{name} tbody tr")
        ]
    return out


def check_shown(shown: dict, ref: dict) -> None:
    assert shown["rows"] == ref["rows"].tolist()
    np.testing.assert_allclose(shown["dist"], ref["dist"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(shown["weights"], ref["weights"], atol=2e-5)
    for name in ("lm", "knn", "mix"):
        assert shown[name] == pytest.approx(ref[name][ref["target"]], abs=2e-5)
        top = shown["top_" + name]
        assert top and all(p == pytest.approx(ref[name][i], abs=2e-5) for i, p in top)
        np.testing.assert_allclose([p for _, p in top], np.sort(ref[name])[::-1][: len(top)],
                                   atol=2e-5)  # fmt: skip


def show_text_and_click(drv, n_tokens: int, index: int) -> None:
    from selenium.webdriver.common.by import By

    wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".tok")) == n_tokens, "tokens")
    drv.find_element(By.CSS_SELECTOR, f'.tok[data-index="{index}"]').click()
    wait(drv, lambda d: f"#{index} " in d.find_element(By.ID, "chosen").text
         and d.find_elements(By.CSS_SELECTOR, "#neighbours tbody tr"), "the token's details")  # fmt: skip


def test_page_in_a_browser_equals_brute_force(server, browser, lm, ds_dir, tiny_lm_dir, tmp_path,
                                              monkeypatch, capsys):  # fmt: skip
    from selenium.webdriver.common.by import By

    _, host, port = server
    ids = lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    refs = {t: brute_force(lm.model, ds_dir, ids, t, K, WEIGHT, TEMP) for t in range(1, len(ids))}
    drv = browser
    drv.get(f"http://{host}:{port}/")
    wait(drv, lambda d: "datastore" in d.find_element(By.ID, "about").text, "the page's config")
    drv.find_element(By.ID, "text").send_keys(TEXT)
    drv.find_element(By.ID, "analyse").click()
    show_text_and_click(drv, len(ids), 4)
    for tok in drv.find_elements(By.CSS_SELECTOR, ".tok:not(.first)"):  # coloured by the gain
        r = refs[int(tok.get_attribute("data-index"))]
        gain = math.log(r["mix"][r["target"]]) - math.log(r["lm"][r["target"]])
        assert float(tok.get_attribute("data-gain")) == pytest.approx(gain, abs=1e-4)
        assert tok.value_of_css_property("background-color").startswith("rgba(")
    check_shown(read_token(drv), refs[4])
    nll = [-math.log(r["mix"][r["target"]]) for r in refs.values()]
    shown = float(drv.find_element(By.ID, "ppl-knnlm").get_attribute("data-value"))
    assert shown == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)
    assert drv.find_elements(By.CSS_SELECTOR, "#figure svg polyline")

    # The weight control: the mixture moves as the reference says, the neighbours stay.
    drv.execute_script("const w = document.getElementById('weight'); w.value = '0.7';"
                       "w.dispatchEvent(new Event('change'));")  # fmt: skip
    ref = brute_force(lm.model, ds_dir, ids, 4, K, 0.7, TEMP)
    want = ref["mix"][ref["target"]]
    wait(drv, lambda d: abs(float(d.find_element(By.ID, "p-mix").get_attribute("data-value"))
                            - want) < 2e-5, "the mixture at weight 0.7")  # fmt: skip
    check_shown(read_token(drv), ref)

    # Generation mode: each step is the mixture's likeliest token, shown with its probability.
    drv.execute_script("document.getElementById('steps').value = '2';")
    drv.find_element(By.ID, "generate").click()
    wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#steps-table tbody tr")) == 2,
         "two generation steps")  # fmt: skip
    first = drv.find_element(By.CSS_SELECTOR, "#steps-table tbody tr td:nth-child(5)")
    ref = brute_force(lm.model, ds_dir, [*ids, 0], len(ids), K, 0.7, TEMP)
    assert float(first.get_attribute("data-value")) == pytest.approx(ref["mix"].max(), abs=2e-5)

    # The static export of the same text at the same settings shows the same numbers.
    (tmp_path / "t.txt").write_text(TEXT)
    code, _, err = run_cli(monkeypatch, capsys, "inspect", "-m", tiny_lm_dir, "-d", ds_dir,
                           "--k-max", "16", "--k", K, "--knn-weight", WEIGHT,
                           "--knn-temperature", TEMP, "--text", tmp_path / "t.txt",
                           "--html", tmp_path / "page.html")  # fmt: skip
    assert code == 0, err
    drv.get((tmp_path / "page.html").as_uri())
    show_text_and_click(drv, len(ids), 4)
    check_shown(read_token(drv), refs[4])
    assert drv.find_element(By.ID, "analyse").get_attribute("disabled")


# -- load and bad input --------------------------------------------------------------------

VALID = [
    {"text": TEXT, "token": 4},
    {"text": TEXT, "k": 3, "knn_weight": 0.9, "token": 2},
    {"text": "the river and the stone bridge", "temperature": 0.5},
    {"text": "a quiet winter road", "k": 16, "token": 3},
]
BAD = {  # kind -> (method, path, body)
    "not json": ("POST", "/api/view", b"{not json"),
    "not an object": ("POST", "/api/view", b"[1, 2, 3]"),
    "text not a string": ("POST", "/api/view", b'{"text": 5}'),
    "k out of range": ("POST", "/api/view", b'{"text": "the old house", "k": 99}'),
    "k not a number": ("POST", "/api/view", b'{"text": "the old house", "k": "9"}'),
    "weight out of range": ("POST", "/api/view", b'{"text": "a b", "knn_weight": -1}'),
    "token out of range": ("POST", "/api/view", b'{"text": "the old house", "token": 999}'),
    "unknown field": ("POST", "/api/view", b'{"text": "a b", "path": "/etc/passwd"}'),
    "empty text": ("POST", "/api/view", b'{"text": ""}'),
    "too many tokens": ("POST", "/api/view", json.dumps({"text": "the " * 400}).encode()),
    "text too long": ("POST", "/api/view", json.dumps({"text": "x" * 30_000}).encode()),
    "body too large": ("POST", "/api/view", b" " * 70_000),
    "deeply nested": ("POST", "/api/view", b"[" * 30_000 + b"]" * 30_000),
    "not a number": ("POST", "/api/view", b'{"text": "a b", "knn_weight": NaN}'),
    "steps out of range": ("POST", "/api/generate", b'{"text": "the old", "steps": 1000}'),
    "wrong method": ("GET", "/api/view", b""),
    "no such path": ("GET", "/api/../../etc/passwd", b""),
    "no such asset": ("GET", "/assets/view.py", b""),
}


def test_load_and_bad_input(server):
    """200 requests from 8 concurrent clients, a quarter valid: no 5xx, the server stays up,
    every valid answer equals its single-request answer. Prints the figures as JSON."""
    proc, host, port = server
    single = [answer(call(host, port, "POST", "/api/view", json.dumps(b).encode())[2])
              for b in VALID]  # fmt: skip
    rng = random.Random(0)
    jobs = []
    for _ in range(200):
        if rng.random() < 0.25:
            i = rng.randrange(len(VALID))
            jobs.append(("valid", i, ("POST", "/api/view", json.dumps(VALID[i]).encode())))
        elif rng.random() < 0.2:
            jobs.append(
                ("random bytes", None, ("POST", "/api/view", rng.randbytes(rng.randrange(1, 300))))
            )
        else:
            kind = rng.choice(sorted(BAD))
            jobs.append((kind, None, BAD[kind]))

    def run(job):
        kind, i, (method, path, body) = job
        status, _, data, seconds = call(host, port, method, path, body)
        return kind, i, status, data, seconds

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))
    by_kind: dict[str, dict[str, int]] = {}
    for kind, i, status, data, _ in results:
        by_kind.setdefault(kind, {}).setdefault(str(status), 0)
        by_kind[kind][str(status)] += 1
        assert status < 500, (kind, status, data[:200])
        if kind == "valid":
            assert status == 200 and answer(data) == single[i]
        else:
            assert 400 <= status < 500, (kind, status)
            if status != 404 and status != 405:
                assert json.loads(data)["error"]
    lat = np.array([r[4] for r in results]) * 1000
    print(json.dumps({"requests": len(jobs), "concurrency": 8, "p50_ms": round(float(np.percentile(lat, 50)), 2),
                      "p99_ms": round(float(np.percentile(lat, 99)), 2), "by_kind": by_kind}))  # fmt: skip
    assert proc.poll() is None
    assert call(host, port, "GET", "/api/config")[0] == 200


def test_beyond_the_queue_a_429_with_retry_after_and_no_mixed_answers(server):
    """24 slow requests at once against a queue of 8: the overflow gets 429 + Retry-After,
    every served one equals its single-request answer."""
    _, host, port = server
    bodies = [{"text": "the old house", "steps": 16, "k": 1 + i % 3} for i in range(24)]
    single = {b["k"]: answer(call(host, port, "POST", "/api/generate", json.dumps(b).encode())[2])
              for b in bodies[:3]}  # fmt: skip
    start = threading.Barrier(24)

    def run(b):
        start.wait()
        return b, call(host, port, "POST", "/api/generate", json.dumps(b).encode())

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(run, bodies))
    statuses = [r[1][0] for r in results]
    assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses
    for b, (status, headers, data, _) in results:
        if status == 429:
            assert headers.get("retry-after") == "1" and json.loads(data)["error"]
        else:
            assert answer(data) == single[b["k"]]


def test_ctrl_c_stops_the_server_and_its_process(server):
    proc, host, port = server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) in (0, 130)  # 130: the shell's code for a command Ctrl-C ended
    err = proc.stderr.read()
    assert "Traceback" not in err, err
    with pytest.raises(OSError):
        call(host, port, "GET", "/api/config")
