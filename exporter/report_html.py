"""report.html: one self-contained page (figures embedded as PNG) built from report.json and any eval-*.json.

Built from the JSON files only, so `edgeslim report FOLDER` can rebuild it at any time, and what the page shows is
exactly what was recorded. Sections: summary, quality of what ships (held-out perplexity against the dense model),
budgets (predicted vs measured vs budget), per-layer ranks, basis spectra, parity, and task metrics of dense vs
compressed vs shipped models.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from exporter.errors import UsageError

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}.pass{color:#187a2f;font-weight:600}.fail{color:#b3261e;font-weight:600}
img{max-width:100%}details{margin:.5em 0}pre{white-space:pre-wrap;background:#f6f6f6;padding:.4em;margin:0}
"""


def write_html(folder: Path) -> Path:
    """Build `folder`/report.html; returns its path."""
    report_file = folder / "report.json"
    if not report_file.is_file():
        raise UsageError(f"{folder}: no report.json here; pass a folder written by `edgeslim export`")
    try:
        report = json.loads(report_file.read_text())
        evaluations = [json.loads(p.read_text()) for p in sorted(folder.glob("eval-*.json"))]
    except json.JSONDecodeError as exc:
        raise UsageError(f"{folder}: a report file is not valid JSON ({exc}); re-run the export or the eval") from None
    evaluations = report.get("evaluations", []) + evaluations  # export --eval first, then later `edgeslim eval`s
    path = folder / "report.html"
    partial = folder / ".report.html.partial"
    partial.write_text(render(report, evaluations), encoding="utf-8")
    os.replace(partial, path)
    return path


def render(report: dict, evaluations: list[dict]) -> str:
    profile, plan = report["profile"], report["plan"]
    title = f"{report['model']} on {profile['name']}"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{STYLE}</style></head>",
        f"<body><h1>{_e(title)}</h1>",
        _summary(report),
        *_quality(report.get("quality"), report["profile"]["precision"]),
        _tokenizer(report.get("tokenizer")),
        "<section id='budgets'><h2>Budgets</h2>", _figure(_budget_figure(report["checks"])),
        _checks_table(report["checks"]), "</section>",
        "<section id='ranks'><h2>Per-layer ranks</h2>",
        f"<p>{len([x for x in plan['layers'] if x['rank'] is not None])} of {len(plan['layers'])} projections "
        f"factorized ({plan['allocation']} allocation); {plan['keep_ratio']:.1%} of their weights kept"
        + ("" if plan.get("vocabulary") is None else f"; {plan['vocabulary']:,} vocabulary rows kept, the rest "
           "sharing one") + ".</p>",
        _figure(_ranks_figure(plan["layers"])), "</section>",
    ]
    if report.get("spectra"):
        parts += ["<section id='spectra'><h2>Basis importance</h2>",
                  f"<p>What {_e(report['method'])} thinks each basis is worth, in keeping order (cumulative share); "
                  "the dashed line is where the layer was cut.</p>",
                  _figure(_spectra_figure(report["spectra"])), "</section>"]
    parts += ["<section id='parity'><h2>Parity in onnxruntime</h2>", _parity_table(report), "</section>"]
    parts += _providers(report)
    for index, evaluation in enumerate(evaluations):
        parts += [f"<section id='evaluation-{index}' class='evaluation'><h2>Task metrics: {_e(evaluation['task'])}"
                  f"</h2>", _evaluation(evaluation), "</section>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary(report: dict) -> str:
    verdict = "<span class='pass'>validated, every budget and the quality gate met</span>" if report["passed"] else (
        "<span class='fail'>FAILED</span><ul>" + "".join(f"<li>{_e(f)}</li>" for f in report["failures"]) + "</ul>")
    profile, artifact = report["profile"], report["artifact"]
    rows = [("model", report["model"]), ("target application", report["task"]), ("selection method", report["method"]),
            ("device profile", f"{profile['name']}: {profile['description']}"),
            ("precision", artifact["precision"]), ("file", f"{artifact['file_bytes'] / 2**20:.1f} MiB"),
            ("providers not available here", ", ".join(report["providers_not_available"]) or "none")]
    table = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<section id='summary'><h2>Summary</h2><p>{verdict}</p><table>{table}</table></section>"


def _quality(quality: dict | None, precision: str) -> list[str]:
    """The held-out quality of what ships next to the dense model at the same precision and in fp32."""
    if quality is None:
        return []
    bars = [(f"shipped {precision} (onnxruntime)", quality["shipped_perplexity"]),
            (f"dense {precision}, rounded to nearest (onnxruntime)", quality["reference_perplexity"]),
            ("dense fp32 (PyTorch)", quality["dense_fp32_perplexity"])]
    figure, axis = plt.subplots(figsize=(8, 2.2))
    axis.barh([name for name, _ in bars], [value for _, value in bars], color=["#3b6fb6", "#888", "#bbb"])
    axis.axvline(quality["reference_perplexity"] * quality["max_ratio"], color="black", linestyle="--",
                 label=f"gate: {quality['max_ratio']:g}x the dense {precision} model")
    axis.invert_yaxis()
    axis.set_xlabel(f"held-out {quality['task']} perplexity (lower is better)")
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    text = (f"<p>{quality['tokens']} held-out tokens of {_e(quality['task'])} (never the calibration split), windows "
            f"of {quality['window']}: perplexity {quality['shipped_perplexity']:.2f} against "
            f"{quality['reference_perplexity']:.2f} for the dense model at {_e(precision)}, ratio "
            f"{quality['ratio']:.3f} (limit {quality['max_ratio']:g}): {_verdict(quality['passed'])}. Next token the "
            f"same as the dense {_e(precision)} model's at {quality['top1_vs_reference']:.1%} of positions, KL "
            f"{quality['kl_vs_reference']:.3f} nats/token.</p>")
    return ["<section id='quality'><h2>Quality of what ships</h2>", text, _figure(figure), "</section>"]


def _tokenizer(check: dict | None) -> str:
    """Whether the runtime's tokenizer gives the ids the quality above was measured on."""
    if not check:
        return ""
    if not check["runtime"]:
        return "<p>The runtime's tokenizer was not checked: onnxruntime-genai is not installed here.</p>"
    text = (f"<p>{_e(check['runtime'])} encodes {check['texts'] - check['differing']} of {check['texts']} held-out "
            f"texts into the same token ids: {_verdict(check['passed'])}"
            + (f" (first difference: {_e(check['first_difference'])})" if check["differing"] else "") + ".")
    if check.get("bos_left_out"):
        text += (f" The model's tokenizer starts a text with {_e(check['bos_left_out'])}, which the runtime adds "
                 "only when told; the quality above was measured without it.")
    return text + "</p>"


def _providers(report: dict) -> list[str]:
    """What each execution provider could run of the graph, and the ORT-format package where one was made."""
    rows = "".join(
        f"<tr><td>{_e(f['provider'])}</td><td>{'yes' if f['installed'] else 'no'}</td>"
        f"<td>{f['supported_nodes'] if f['known'] else ''} / {f['nodes']}</td><td>{_e(f['summary'])}</td></tr>"
        for f in report.get("providers", []))
    parts = ["<section id='providers'><h2>Execution providers</h2><p>By operator type, from each provider's "
             "operator list (exporter.providers); nodes a provider cannot take run on the CPU provider.</p>",
             "<table><tr><th>provider</th><th>installed here</th><th>nodes it could take</th><th>what that means"
             f"</th></tr>{rows}</table>"]
    package = report.get("ort_package")
    if package:
        m = package["measurement"]
        parts.append(f"<p>ORT format: {_e(package['model_file'])} ({package['model_bytes'] / 1e6:.1f} MB) with "
                     f"{_e(package['operators_file'])} for a minimal build; greedy tokens "
                     f"{'identical to' if package['tokens_identical'] else 'DIFFERENT from'} the .onnx's; peak "
                     f"{m['peak_memory_bytes'] / 2**20:.1f} MiB, decode {m['decode_ms_per_token']:.1f} ms/token, "
                     f"prefill {m['prefill_ms']:.0f} ms (measured here).</p>")
    return [*parts, "</section>"]


def _budget_figure(checks: list[dict]):
    figure, axis = plt.subplots(figsize=(8, 0.6 + 0.8 * len(checks)))
    labels = [f"{c['metric']} ({c['unit']})" for c in checks]
    for offset, key, name in ((-0.2, "predicted", "predicted (device)"), (0.2, "measured", "measured (here)")):
        values = [100 * (c[key] or 0) / c["budget"] for c in checks]
        axis.barh([i + offset for i in range(len(checks))], values, height=0.4, label=name)
    axis.axvline(100, color="black", linestyle="--", label="budget")
    axis.set_yticks(range(len(checks)), labels)
    axis.invert_yaxis()
    axis.set_xlabel("% of budget")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def _ranks_figure(layers: list[dict]):
    figure, axis = plt.subplots(figsize=(10, 3))
    full = [min(x["d_in"], x["d_out"]) for x in layers]
    kept = [f if x["rank"] is None else x["rank"] for x, f in zip(layers, full, strict=True)]
    axis.bar(range(len(layers)), full, color="#ddd", width=1.0, label="full rank")
    axis.bar(range(len(layers)), kept, color="#3b6fb6", width=1.0, label="kept rank (dense: full)")
    return _labelled(figure, axis, "projection (model order)", "rank")


def _spectra_figure(spectra: list[dict]):
    figure, axis = plt.subplots(figsize=(8, 3.5))
    for spectrum in spectra:
        cumulative = list(itertools.accumulate(spectrum["scores"]))
        line = axis.plot(range(1, len(cumulative) + 1), cumulative, label=spectrum["layer"])[0]
        if spectrum["kept"]:
            axis.axvline(spectrum["kept"], color=line.get_color(), linestyle="--", linewidth=1)
    return _labelled(figure, axis, "bases kept", "cumulative share of importance")


def _labelled(figure, axis, xlabel: str, ylabel: str):
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def _evaluation_figure(models: list[dict]):
    graded = [m for m in models if m["score"] is not None]
    panels = 2 if graded else 1
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 3))
    axes = [axes] if panels == 1 else list(axes)
    names = [m["label"] for m in models]
    axes[-1].barh(names, [m["perplexity"] for m in models], color="#888")
    axes[-1].set_xscale("log")
    axes[-1].set_xlabel("answer perplexity (log; lower is better)")
    if graded:
        axes[0].barh([m["label"] for m in graded], [100 * m["score"] for m in graded], color="#3b6fb6")
        axes[0].set_xlabel(f"{graded[0]['metric']} (%)")
        axes[0].set_xlim(0, 100)
    for axis in axes:
        axis.invert_yaxis()
    figure.tight_layout()
    return figure


def _evaluation(evaluation: dict) -> str:
    models = evaluation["models"]
    rows = "".join(
        f"<tr><td>{_e(m['label'])}</td><td>{_e(m['metric'])}</td><td>{_pct(m['score'])}</td>"
        f"<td>{m['perplexity']:.2f}</td><td>{_pct(m['top1_vs_reference'])}</td>"
        f"<td>{'' if m['kl_vs_reference'] is None else format(m['kl_vs_reference'], '.3f')}</td>"
        f"<td>{m['seconds']:.0f}</td></tr>" for m in models)
    head = ("<tr><th>model</th><th>metric</th><th>score</th><th>answer perplexity</th><th>top-1 vs reference</th>"
            "<th>KL vs reference</th><th>seconds</th></tr>")
    note = (f"<p>{evaluation['items']} items (seed {evaluation['seed']}), greedy, at most "
            f"{evaluation['max_new_tokens']} new tokens; reference: {_e(evaluation['reference'] or 'none')}"
            + (f"; code ran sandboxed, network cut off by {_e(evaluation['sandbox_network'])}"
               if evaluation.get("sandbox_network") else "") + ".</p>")
    details = "".join(
        f"<details><summary>{_e(m['label'])}: per item</summary><table><tr><th>item</th><th>result</th>"
        "<th>completion</th></tr>"
        + "".join(f"<tr><td>{_e(i['item'])}</td><td>{_e(i['detail'])}</td><td><pre>{_e(i['completion'][:600])}"
                  "</pre></td></tr>" for i in m["items"])
        + "</table></details>" for m in models)
    return note + _figure(_evaluation_figure(models)) + f"<table>{head}{rows}</table>" + details


def _checks_table(checks: list[dict]) -> str:
    head = ("<tr><th>metric</th><th>budget</th><th>predicted (device)</th><th>measured (here)</th>"
            "<th>judged on</th><th>result</th></tr>")
    rows = "".join(
        f"<tr><td>{_e(c['metric'])}</td><td>{_num(c['budget'], c['unit'])}</td><td>{_num(c['predicted'], c['unit'])}"
        f"</td><td>{_num(c['measured'], c['unit'])}</td><td>{_e(c['judged_on'])}</td><td>{_verdict(c['passed'])}</td>"
        "</tr>" for c in checks)
    return f"<table>{head}{rows}</table>"


def _parity_table(report: dict) -> str:
    head = ("<tr><th>graph</th><th>provider</th><th>max |Δlogits|</th><th>tolerance</th><th>greedy identical</th>"
            "<th>result</th></tr>")
    rows = "".join(
        f"<tr><td>{_e(p['graph'])}</td><td>{_e(p['provider'])}</td><td>{p['max_abs_logit_diff']:.3g}</td>"
        f"<td>{p['tolerance']:.3g}</td><td>{p['greedy_identical']} ({p['greedy_steps']} steps)</td>"
        f"<td>{_verdict(p['passed']) if p.get('gated', True) else 'reported, not gated'}</td></tr>"
        for p in report["parity"])
    return f"<table>{head}{rows}</table>"


def _figure(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<p><img class='figure' alt='figure' src='data:image/png;base64,{data}'></p>"


def _e(value) -> str:
    return html.escape(str(value))


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def _num(value: float | None, unit: str) -> str:
    return "" if value is None else f"{value:,.1f} {_e(unit)}"


def _verdict(passed: bool) -> str:
    return "<span class='pass'>pass</span>" if passed else "<span class='fail'>FAIL</span>"
