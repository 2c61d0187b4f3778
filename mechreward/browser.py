"""The static feature browser: an HTML site in a run dir that opens from disk (no server, no network).

`write_browser(run_dir, rows, report)` writes `<run_dir>/browser/`:

    index.html, app.js, style.css   copied from `mechreward/browser_assets/` (vanilla HTML/JS/CSS)
    data.js                         `window.MECHREWARD_DATA = {...}`: meta, images, one row per feature
    img/*.png                       the density histogram and, when a G1 run is given, its plots

The data travel as a script (not JSON fetched at run time) because browsers refuse `fetch` of
`file://` URLs. The page has an overview (summary, density histogram, G1 plots), a sortable and
filterable feature table, and a panel per feature (`index.html#feature-<i>`) with its
statistics, the logit effect of its decoder direction and its top contexts, each token shaded by
the feature's activation on it; pack features are marked helpful / harmful.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from . import io

ASSETS = Path(__file__).resolve().parent / "browser_assets"
ASSET_FILES = ("index.html", "app.js", "style.css")
G1_PLOTS = (("score_by_outcome.png", "G1: pack score by outcome (validation)"),
            ("null_distribution.png", "G1: random-pack null distribution, pack ρ marked"))


def _summary(report: dict, g1: dict | None) -> list[list]:
    c = report.get("density_classes", {})
    out = [["tokens", f"{report.get('tokens', 0):,}"], ["token source", report.get("token_source", "")],
           ["dead / rare / healthy / dense", " / ".join(str(c.get(k, 0)) for k in ("dead", "rare", "healthy", "dense"))]]
    if report.get("rollouts"):
        r = report["rollouts"]
        out.append(["rollouts", f"{r['n_responses']} responses, {r['n_correct']} correct ({r['pooling']} pooling)"])
    if g1:
        flags = ", ".join(g1.get("flags") or []) or "none"
        out.append(["G1 verdict", f"{g1.get('verdict')} (ρ = {g1.get('spearman_rho', float('nan')):.3f}, "
                                  f"CI {g1.get('ci95')}, flags {flags})"])
    return out


MAX_DATA_BYTES = 16 << 20
"""Bound on data.js: above it, the contexts shown per feature are cut (the highest-activating are kept)."""


def _bounded_payload(meta: dict, shown: list, rows: Sequence[dict], max_bytes: int) -> str:
    def dump(rs):
        return json.dumps({"meta": meta, "images": shown, "features": list(rs)}, ensure_ascii=True,
                          allow_nan=False, default=str)

    payload = dump(rows)
    n = max((len(r.get("contexts") or []) for r in rows), default=0)
    while len(payload) > max_bytes and n > 1:
        n = max(1, n // 2)
        meta["contexts_per_feature_shown"] = n
        payload = dump([{**r, "contexts": r["contexts"][:n]} if r.get("contexts") else r for r in rows])
    return payload


def write_browser(run_dir: str | Path, rows: Sequence[dict], report: dict, g1_dir: str | Path | None = None,
                  images: Sequence[str | Path] = (), max_bytes: int = MAX_DATA_BYTES) -> Path:
    """Write the browser into `<run_dir>/browser/` and return the path of its index.html.

    data.js stays under `max_bytes` where it can: the contexts per feature are halved until it
    fits (`meta.contexts_per_feature_shown` says how many are shown; features.json keeps all)."""
    out = Path(run_dir) / "browser"
    (out / "img").mkdir(parents=True, exist_ok=True)
    for name in ASSET_FILES:
        io.write_bytes(out / name, (ASSETS / name).read_bytes())
    shown = []
    for p in images:
        p = Path(p)
        if p.exists():
            shutil.copyfile(p, out / "img" / p.name)
            shown.append({"src": f"img/{p.name}", "caption": "feature density (log10 fire rate; healthy range dashed)"})
    g1 = None
    if g1_dir is not None:
        g1_dir = Path(g1_dir)
        if (g1_dir / "report.json").exists():
            g1 = json.loads((g1_dir / "report.json").read_text())
            if "verdict" not in g1:
                g1 = None
        for name, caption in G1_PLOTS:
            if (g1_dir / name).exists():
                shutil.copyfile(g1_dir / name, out / "img" / f"g1_{name}")
                shown.append({"src": f"img/g1_{name}", "caption": caption})
    sae = report.get("sae") or {}
    meta = {"model": report.get("model"), "layer": report.get("layer"), "sae_path": sae.get("path"),
            "d_sae": sae.get("d_sae"), "k": sae.get("k"), "tokens": report.get("tokens", 0),
            "logit_effect": report.get("logit_effect"), "summary": _summary(report, g1)}
    payload = _bounded_payload(meta, shown, rows, max_bytes)
    io.write_text(out / "data.js", "window.MECHREWARD_DATA = " + payload + ";\n")
    return out / "index.html"
