"""The static feature browser in a real headless Chromium (Chrome DevTools Protocol over a websocket).

Needs Debian `chromium` and the `websocket-client` package; skipped with the reason otherwise,
except under CI (`CI=true`, as `.ci/run` sets), where a missing one fails the test.
The page is opened from disk (file://): it must load with no console errors, sort its table
when a header is clicked, and show a feature's contexts in its panel. A screenshot is saved in
the test's tmp dir (its path is printed; run pytest with -s to see it).
"""

import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time

import numpy as np
import pytest

from mechreward.features import FeaturesConfig, characterize
from mechreward.probe import FeaturePack
from mechreward.rollouts import sae_reference
from mechreward.run import Run
from mechreward.sae.formats import load_sae, save_sae
from mechreward.sae.model import SAEConfig, SparseAutoencoder
from needs import missing
from tiny import tiny_model, tiny_tokenizer

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
try:
    import websocket
except ImportError:
    websocket = None



class Page:
    """A minimal CDP client for one page target."""

    def __init__(self, ws_url: str):
        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def send(self, method: str, **params) -> dict:
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            for e in self.events:
                if e.get("method") == method:
                    return e
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(method)

    def eval(self, expr: str):
        r = self.send("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(json.dumps(p["exceptionDetails"])[:300])
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(json.dumps(p.get("args"))[:300])
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(p["entry"].get("text", "")[:300] + " " + p["entry"].get("url", ""))
        return out


@pytest.fixture
def chromium(tmp_path):
    if websocket is None:
        missing("the browser test needs `websocket-client` (pip install websocket-client)")
    if CHROMIUM is None:
        missing("the browser test needs Chromium (apt-get install chromium)")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1400,1000",
         "--allow-file-access-from-files", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        end = time.time() + 60
        while time.time() < end and port is None:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"chromium exited with {proc.returncode}")
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                port = int(m.group(1))
        assert port, "chromium did not report its DevTools port"
        # The DevToolsActivePort file in the profile carries the page-independent browser endpoint;
        # the page target is listed by the HTTP endpoint on localhost.
        import urllib.request

        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        p = Page(page["webSocketDebuggerUrl"])
        yield p
        p.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A real browser site: a tiny model, an SAE, a corpus, a pack and the G1-style plots."""
    root = tmp_path_factory.mktemp("browser")
    model, tok = tiny_model("qwen3"), tiny_tokenizer()
    sae = SparseAutoencoder.from_config(SAEConfig(d_in=64, d_sae=64, k=6, metadata={"layer": 2}), seed=1)
    save_sae(sae, root / "sae")
    sae = load_sae(root / "sae")
    corpus = root / "corpus.txt"
    rng = np.random.default_rng(1)
    words = ["The quick brown fox", "jumps over", "the lazy dog.", "12+7=19.", "#### 19", "<b>&amp;</b>"]
    corpus.write_text("\n".join(" ".join(rng.choice(words, 5)) for _ in range(80)) + "\n")
    pack = FeaturePack(model="tiny", layer=2, hook="model.layers.2", sae=sae_reference(sae),
                       features=[{"index": 7, "weight": 1.0, "role": "helpful"},
                                 {"index": 9, "weight": -1.0, "role": "harmful"}])
    g1 = root / "g1"
    g1.mkdir()
    pack.save(g1 / "feature_pack.json")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in ("score_by_outcome.png", "null_distribution.png"):
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.plot([0, 1], [0, 1])
        fig.savefig(g1 / name)
        plt.close(fig)
    (g1 / "report.json").write_text(json.dumps({"verdict": "PASS", "spearman_rho": 0.41, "ci95": [0.2, 0.6],
                                                "flags": []}))
    cfg = FeaturesConfig(tokens=3000, top_n=6, window=4, pack=str(g1 / "feature_pack.json"), g1_run=str(g1))
    cfg.data.source, cfg.data.context_length, cfg.data.batch_size = str(corpus), 32, 8
    characterize(cfg, Run(root / "run", "features"), model=model, tokenizer=tok, sae=sae)
    rows = json.loads((root / "run" / "features.json").read_text())["features"]
    return root / "run" / "browser" / "index.html", rows


def test_browser_loads_sorts_and_shows_contexts_in_chromium(chromium, site, tmp_path):
    index, rows = site
    page = chromium
    for domain in ("Page", "Runtime", "Log"):
        page.send(f"{domain}.enable")
    page.send("Page.navigate", url=index.as_uri())
    page.wait_event("Page.loadEventFired")
    assert page.errors() == []
    assert page.eval("document.querySelectorAll('#rows tr').length") == len(rows)
    # Overview: density histogram and both G1 plots are there and decoded (naturalWidth > 0).
    imgs = page.eval("[...document.querySelectorAll('#images img')].map(i => [i.getAttribute('src'), i.naturalWidth])")
    assert [s for s, _ in imgs] == ["img/feature_density.png", "img/g1_score_by_outcome.png",
                                    "img/g1_null_distribution.png"]
    assert all(w > 0 for _, w in imgs)
    assert "PASS" in page.eval("document.getElementById('summary').textContent")

    # Sort by max activation: first click descending, second ascending; read the order back.
    def order():
        return page.eval("[...document.querySelectorAll('#rows tr')].map(r => Number(r.dataset.index))")

    page.eval("document.querySelector('th[data-key=max_activation]').click()")
    want = sorted(rows, key=lambda r: (-r["max_activation"], r["index"]))
    assert order() == [r["index"] for r in want]
    assert page.eval("document.querySelector('th[data-key=max_activation]').getAttribute('aria-sort')") == "descending"
    page.eval("document.querySelector('th[data-key=max_activation]').click()")
    assert order() == [r["index"] for r in sorted(rows, key=lambda r: (r["max_activation"], r["index"]))]
    # Sorting by feature index is a different order (the sort really reorders).
    page.eval("document.querySelector('th[data-key=index]').click()")
    assert order() == sorted(r["index"] for r in rows)

    # Filter: pack features only → exactly the two, marked helpful / harmful.
    page.eval("(() => { const c = document.getElementById('pack-only'); c.checked = true; "
              "c.dispatchEvent(new Event('input')); })()")
    assert order() == [7, 9]
    roles = page.eval("[...document.querySelectorAll('#rows td.role-helpful, #rows td.role-harmful')]"
                      ".map(t => t.textContent)")
    assert roles == ["helpful", "harmful"]
    page.eval("(() => { const c = document.getElementById('pack-only'); c.checked = false; "
              "c.dispatchEvent(new Event('input')); })()")

    # Feature panel: click the row of the feature with the most contexts.
    f = max(rows, key=lambda r: (len(r["contexts"]), r["max_activation"]))
    page.eval(f"document.querySelector('#rows tr[data-index=\"{f['index']}\"]').click()")
    time.sleep(0.2)
    assert page.eval("document.getElementById('panel').hidden") is False
    assert page.eval("location.hash") == f"#feature-{f['index']}"
    assert page.eval("document.getElementById('panel-title').textContent").startswith(f"Feature {f['index']}")
    ctx = page.eval("[...document.querySelectorAll('#contexts li.context')].map(li => "
                    "[...li.querySelectorAll('.tok')].map(s => [s.textContent, Number(s.dataset.act), "
                    "s.classList.contains('center'), s.style.backgroundColor]))")
    assert len(ctx) == len(f["contexts"]) > 0
    for shown, c in zip(ctx, f["contexts"]):
        assert [t for t, *_ in shown] == [t if t != "\n" else "⏎" for t in c["tokens"]]
        assert [a for _, a, *_ in shown] == pytest.approx(c["acts"])
        assert [i for i, (_, _, centre, _) in enumerate(shown) if centre] == [c["center"]]
        # tokens where the feature fires are shaded, the others are not
        assert [bool(bg) for *_, bg in shown] == [a > 0 for a in c["acts"]]
    assert page.errors() == []
    shot = page.send("Page.captureScreenshot", format="png")["data"]
    import base64

    path = tmp_path / "feature_browser.png"
    path.write_bytes(base64.b64decode(shot))
    assert path.stat().st_size > 10_000
    print(f"\nfeature browser screenshot: {path}")
