"""report.html for `finetune eval`: the page a person looks at instead of reading report.json.

One self-contained file (docs/evaluation.md has the schema it reads): it is opened from disk,
mailed, or archived next to the adapter, so it loads nothing from anywhere: CSS and JS are inline,
the plots are SVG drawn here, and a Content-Security-Policy forbids every fetch, so even a mistake
here cannot make the page phone home. Every string from the chats is untrusted: it reaches the
page only through html.escape, and the JSON the blind test needs is escaped so that a message
containing `</script>` cannot end the script element it sits in.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from datetime import datetime
from html import escape

REAL_COLOUR = "#4b4b4b"
# Okabe-Ito: told apart by people with the common colour blindnesses; real keeps the grey.
SYSTEM_COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#999933", "#882255"]
MAX_BARS = 12  # labels per chart: emoji and endings have long tails nobody reads
EXAMPLES_SHOWN = 30  # the rest sit behind a "show all" toggle
BLIND_SHOWN = 20
SAVE_NAME = "bunshin-blind-votes.json"

# (key, heading, what is best, tooltip). "real": closest to the real replies' own figure.
SUMMARY_COLUMNS = [
    ("style_distance", "style distance", "lower", "mean of the per-feature distances; lower is closer, 0 is the same"),
    ("chrf", "chrF", "higher", "mean sentence chrF against the real reply (0-100); higher is closer"),
    ("chrf_corpus", "chrF (corpus)", "higher", "chrF over all samples at once"),
    ("loss", "loss", "lower", "per-token loss of the real replies under the model"),
    ("perplexity", "perplexity", "lower", "exp(loss): how surprised the model is by the real replies"),
    ("stock_rate", "stock-phrase rate", "real", "share of replies that are one canned phrase; best is nearest to real"),
    ("verbatim_rate", "verbatim-repeat rate", "lower", "share of replies that copy training text word for word"),
]
SUMMARY_LABELS = {
    "mean_chars": "mean length (chars)",
    "median_chars": "median length (chars)",
    "mean_messages": "messages per reply",
    "distinct_2": "distinct-2 (variety)",
    "empty_rate": "empty replies",
}
PERCENT_KEYS = {"stock_rate", "verbatim_rate", "empty_rate", "distinct_2"}


def render_report(report: dict) -> str:
    """The whole page for one report.json dict; keys the schema marks optional may be missing."""
    systems = report.get("systems") or {}
    colours = {name: SYSTEM_COLOURS[i % len(SYSTEM_COLOURS)] for i, name in enumerate(systems)}
    persona = (report.get("dataset") or {}).get("persona") or "the persona"
    sections = [
        _header(report, persona),
        _summary(report, systems, colours),
        _feature_distances(report, systems, colours),
        _plots(report, systems, colours),
        _blind(report, persona),  # before the sections that quote replies (stock phrases, verbatim, examples)
        _stock_phrases(report, systems, colours),
        _verbatim(report, systems, colours),
        _examples(report, systems, colours),
    ]
    script = _SCRIPT
    csp_hash = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    # default-src 'none': no fetch of any kind; only the one script below (by hash) may run.
    csp = (f"default-src 'none'; script-src 'sha256-{csp_hash}'; style-src 'unsafe-inline'; "
           "img-src data:; base-uri 'none'; form-action 'none'")
    return (
        "<!DOCTYPE html>\n<html lang=\"ja\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<link rel=\"icon\" href=\"data:,\">\n"
        f"<title>bunshin eval · {escape(persona)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(sections)
        + f"\n<script type=\"application/json\" id=\"blind-data\">{_script_json(_blind_data(report, persona))}</script>"
        + f"\n<script>{script}</script>\n</body>\n</html>\n"
    )


# ---- small helpers -------------------------------------------------------------------------------

def _script_json(value) -> str:
    """JSON that is safe inside <script>: no `</script>`, `<!--`, or JS line terminators can appear.

    These characters only ever occur inside JSON strings, where the \\u escapes mean the same."""
    text = json.dumps(value, ensure_ascii=False)
    for char, code in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, code)
    return text


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _fmt(value, percent: bool = False) -> str:
    v = _number(value)
    if v is None:
        return "–"
    if percent:
        return f"{v * 100:.1f}%"
    if isinstance(value, int):
        return str(value)
    return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"


def _tick(value: float, percent: bool) -> str:
    return f"{value * 100:g}%" if percent else f"{value:g}"


def _nice_top(top: float) -> float:
    """The axis end: the next 1, 2, 2.5 or 5 times a power of ten, so the ticks read as round numbers."""
    if top <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(top))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= top * (1 - 1e-9))


def _date(created) -> str:
    try:
        t = datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    except ValueError:
        return str(created or "")
    return t.strftime("%Y-%m-%d %H:%M ") + (t.tzname() or "")


def _text(message, css: str = "msg") -> str:
    """A chat message: escaped; its line breaks stay line breaks (white-space: pre-wrap in the CSS)."""
    if message is None:
        return f'<div class="{css} missing">(no reply)</div>'
    if message == "":
        return f'<div class="{css} missing">(empty)</div>'
    return f'<div class="{css}">{escape(str(message))}</div>'


def _context(turns) -> str:
    rows = "".join(
        f'<div class="turn"><span class="who">{escape(str(t.get("speaker", "")))}</span>{_text(t.get("text"))}</div>'
        for t in turns or [] if isinstance(t, dict)
    )
    return f'<div class="ctx">{rows}</div>' if rows else '<div class="ctx missing">(no context)</div>'


def _swatch(colour: str) -> str:
    return f'<span class="sw" style="background:{colour}"></span>'


def _legend(colours: dict[str, str]) -> str:
    items = [f"<span>{_swatch(REAL_COLOUR)}real</span>"] + [f"<span>{_swatch(c)}{escape(n)}</span>" for n, c in colours.items()]
    return f'<div class="legend">{"".join(items)}</div>'


def _best(values: dict[str, float | None], best: str, real: float | None = None) -> set[str]:
    """Names holding the best figure of a column; nothing to mark when fewer than two can compete."""
    known = {n: v for n, v in values.items() if v is not None}
    if len(known) < 2:
        return set()
    if best == "real":
        if real is None:
            return set()
        known = {n: abs(v - real) for n, v in known.items()}
        best = "lower"
    target = min(known.values()) if best == "lower" else max(known.values())
    marked = {n for n, v in known.items() if math.isclose(v, target, rel_tol=1e-9, abs_tol=1e-12)}
    return set() if len(marked) == len(known) else marked  # a tie all round has no best


def _cell(value, best: bool, percent: bool = False, extra: str = "") -> str:
    mark = '<span class="star" title="best in this column">★</span>' if best else ""
    return f'<td class="num{" best" if best else ""}">{_fmt(value, percent)}{extra}{mark}</td>'


# ---- sections -------------------------------------------------------------------------------------

def _header(report: dict, persona: str) -> str:
    dataset = report.get("dataset") or {}
    adapter = report.get("adapter")
    if adapter:
        model = f'adapter <code>{escape(str(adapter.get("path", "")))}</code> on <code>{escape(str(adapter.get("base_model", "")))}</code>'
    else:
        model = "no adapter (only the systems given with --system)"
    facts = [
        f'<strong>{escape(_fmt(report.get("samples")))}</strong> samples',
        model,
        escape(_date(report.get("created"))),
        f'dataset <code>{escape(str(dataset.get("path", "")))}</code>',
        f'seed {escape(_fmt(report.get("seed")))}',
        f'bunshin {escape(str(report.get("bunshin_version", "")))}',
    ]
    generation = report.get("generation")
    if generation:
        facts.append("generation: " + ", ".join(f"{escape(str(k))} {escape(str(v))}" for k, v in generation.items()))
    nav = "".join(
        f'<a href="#{anchor}">{label}</a>'
        for anchor, label in [("summary", "summary"), ("features", "features"), ("plots", "plots"),
                              ("blind", "blind test"), ("phrases", "stock phrases"),
                              ("verbatim", "verbatim repeats"), ("examples", "examples")]
    )
    return (
        f'<header><h1>How close is the clone of <span class="persona">{escape(persona)}</span>?</h1>'
        f'<p class="facts">{" · ".join(facts)}</p>'
        f'<p class="howto">How to read it: <strong>style distance</strong> (how {escape(persona)} writes: length, '
        "endings, emoji, scripts) — lower is closer, 0 is the same; <strong>chrF</strong> (the wording of each "
        "reply against the real one, 0–100) — higher is closer. ★ marks the best system in a column.</p>"
        f"<nav>{nav}</nav></header>"
    )


def _summary(report: dict, systems: dict, colours: dict[str, str]) -> str:
    real = report.get("real") or {}

    def figure(entry: dict, key: str):
        return (entry.get("verbatim") or {}).get("rate") if key == "verbatim_rate" else entry.get(key)

    columns = [c for c in SUMMARY_COLUMNS if any(_number(figure(s, c[0])) is not None for s in systems.values())]
    real_figures = {key: _number(figure(real, key)) for key, *_ in columns}
    best = {
        key: _best({n: _number(figure(s, key)) for n, s in systems.items()}, rule, real_figures[key])
        for key, _, rule, _ in columns
    }
    head = "".join(f'<th title="{escape(tip)}">{escape(label)}</th>' for _, label, _, tip in columns)
    rows = []
    for name, system in systems.items():
        cells = []
        for key, *_ in columns:
            extra = ""
            if key == "verbatim_rate" and (system.get("verbatim") or {}).get("count") is not None:
                extra = f' <span class="muted">({_fmt(system["verbatim"]["count"])})</span>'
            cells.append(_cell(figure(system, key), name in best[key], key in PERCENT_KEYS, extra))
        rows.append(f'<tr><th>{_swatch(colours[name])}{escape(name)}</th>{"".join(cells)}</tr>')
    if real:
        cells = "".join(_cell(real_figures[key], False, key in PERCENT_KEYS) for key, *_ in columns)
        rows.append(f'<tr class="realrow"><th>{_swatch(REAL_COLOUR)}real replies</th>{cells}</tr>')
    table = (f'<div class="wide"><table class="grid"><thead><tr><th>system</th>{head}</tr></thead>'
             f'<tbody>{"".join(rows)}</tbody></table></div>' if systems else '<p class="muted">No systems were scored.</p>')
    return f'<section id="summary"><h2>Summary</h2>{table}{_shape(real, systems, colours)}</section>'


def _shape(real: dict, systems: dict, colours: dict[str, str]) -> str:
    """Reply length, variety and empty replies: nearest to the real replies is best."""
    keys = list(real.get("summary") or {})
    for system in systems.values():
        keys += [k for k in (system.get("summary") or {}) if k not in keys]
    if not keys:
        return ""
    real_summary = real.get("summary") or {}
    head = "".join(f"<th>{escape(SUMMARY_LABELS.get(k, k))}</th>" for k in keys)
    best = {k: _best({n: _number((s.get("summary") or {}).get(k)) for n, s in systems.items()}, "real",
                     _number(real_summary.get(k))) for k in keys}
    rows = [f'<tr class="realrow"><th>{_swatch(REAL_COLOUR)}real replies</th>'
            + "".join(_cell(real_summary.get(k), False, k in PERCENT_KEYS) for k in keys) + "</tr>"]
    for name, system in systems.items():
        summary = system.get("summary") or {}
        rows.append(f"<tr><th>{_swatch(colours[name])}{escape(name)}</th>"
                    + "".join(_cell(summary.get(k), name in best[k], k in PERCENT_KEYS) for k in keys) + "</tr>")
    return ('<h3>Reply shape <span class="muted">(★ nearest to the real replies)</span></h3>'
            f'<div class="wide"><table class="grid"><thead><tr><th></th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _feature_distances(report: dict, systems: dict, colours: dict[str, str]) -> str:
    features = report.get("features") or {}
    if not features or not systems:
        return '<section id="features"><h2>Style distance per feature</h2><p class="muted">No features.</p></section>'
    distances = {f: {n: _number(((s.get("style") or {}).get(f) or {}).get("distance")) for n, s in systems.items()}
                 for f in features}
    top = max([d for row in distances.values() for d in row.values() if d is not None] or [1.0]) or 1.0
    head = "".join(f"<th>{_swatch(colours[n])}{escape(n)}</th>" for n in systems)
    rows = []
    for key, feature in features.items():
        best = _best(distances[key], "lower")
        cells = []
        for name in systems:
            d = distances[key][name]
            bar = (f'<span class="minibar" style="width:{d / top * 100:.1f}%;background:{colours[name]}"></span>'
                   if d is not None else "")
            mark = '<span class="star" title="closest for this feature">★</span>' if name in best else ""
            cells.append(f'<td class="dist{" best" if name in best else ""}"><span class="track">{bar}</span>'
                         f"{_fmt(d)}{mark}</td>")
        measure = f' <span class="muted">{escape(str(feature.get("measure", "")))}</span>' if isinstance(feature, dict) else ""
        label = feature.get("label", key) if isinstance(feature, dict) else key
        rows.append(f"<tr><th>{escape(str(label))}{measure}</th>{''.join(cells)}</tr>")
    overall = {n: _number(s.get("style_distance")) for n, s in systems.items()}
    best = _best(overall, "lower")
    rows.append('<tr class="total"><th>style distance (mean)</th>'
                + "".join(_cell(overall[n], n in best) for n in systems) + "</tr>")
    return ('<section id="features"><h2>Style distance per feature <span class="muted">(lower is closer)</span></h2>'
            f'<div class="wide"><table class="grid dists"><thead><tr><th>feature</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div></section>')


def _real_value(report: dict, key: str, systems: dict) -> dict:
    value = ((report.get("real") or {}).get("profile") or {}).get(key)
    if isinstance(value, dict):
        return value
    for system in systems.values():  # every style entry repeats real's value; use it if the profile lacks it
        value = ((system.get("style") or {}).get(key) or {}).get("real")
        if isinstance(value, dict):
            return value
    return {}


def _plots(report: dict, systems: dict, colours: dict[str, str]) -> str:
    charts = []
    for key, feature in (report.get("features") or {}).items():
        series = [("real", REAL_COLOUR, _real_value(report, key, systems))]
        for name, system in systems.items():
            value = ((system.get("style") or {}).get(key) or {}).get("system")
            series.append((name, colours[name], value if isinstance(value, dict) else {}))
        label = feature.get("label", key) if isinstance(feature, dict) else key
        charts.append(_bar_chart(str(label), series))
    if not charts:
        return ""
    return (f'<section id="plots"><h2>Real against each system</h2>{_legend(colours)}'
            f'<div class="charts">{"".join(charts)}</div></section>')


def _chart_labels(series: list[tuple[str, str, dict]]) -> tuple[list[str], int]:
    """The labels to draw, in the data's own order (length buckets are ordered); a long list loses
    the labels no one used, then, if still long, is cut to the MAX_BARS biggest, biggest first."""
    labels: list[str] = []
    for _, _, values in series:
        labels += [str(k) for k in values if str(k) not in labels]
    total = len(labels)
    if total > MAX_BARS:
        labels = [lab for lab in labels if any(_number(v.get(lab)) for _, _, v in series)]
    if len(labels) <= MAX_BARS:
        return labels, total

    def weight(label: str) -> tuple[float, float]:
        found = [_number(v.get(label)) or 0.0 for _, _, v in series]
        return found[0], max(found)

    return sorted(labels, key=lambda lab: (max(weight(lab)), weight(lab)[0]), reverse=True)[:MAX_BARS], total


def _bar_chart(title: str, series: list[tuple[str, str, dict]]) -> str:
    """Horizontal grouped bars, one group per label, real first: labels of any length stay readable."""
    labels, total = _chart_labels(series)
    if not labels:
        return f'<figure class="chart"><figcaption>{escape(title)}</figcaption><p class="muted">no data</p></figure>'
    values = [[_number(v.get(lab)) for _, _, v in series] for lab in labels]
    known = [x for row in values for x in row if x is not None]
    percent = bool(known) and all(0 <= x <= 1 for x in known)
    top = _nice_top(max([abs(x) for x in known] or [0.0]))
    bar = 10 if len(series) <= 3 else 7 if len(series) <= 5 else 5
    group = len(series) * (bar + 1) + 8
    left, plot, pad = 118, 300, 24
    height = len(labels) * group + 22
    width = left + plot + pad
    parts = []
    for t in (0, 0.5, 1):  # gridlines at 0, half and the top value
        x = left + t * plot
        parts.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height - 18}" class="grid"/>'
                     f'<text x="{x:.1f}" y="{height - 5}" class="tick">{_tick(top * t, percent)}</text>')
    for i, label in enumerate(labels):
        y0 = i * group + 4
        short = label if len(label) <= 14 else label[:13] + "…"
        parts.append(f'<text x="{left - 6}" y="{y0 + group / 2 - 3:.1f}" class="lab"><title>{escape(label)}</title>'
                     f"{escape(short)}</text>")
        for j, (name, colour, _) in enumerate(series):
            v = values[i][j]
            w = max(0.0, (v or 0.0) / top * plot)
            tip = f"{name} · {label}: {_fmt(v, percent)}"
            parts.append(f'<rect class="bar" x="{left}" y="{y0 + j * (bar + 1)}" width="{w:.2f}" height="{bar}" '
                         f'fill="{colour}"><title>{escape(tip)}</title></rect>')
    cut = f' <span class="muted">({len(labels)} of {total} labels)</span>' if total > len(labels) else ""
    if not any(known):
        cut += ' <span class="muted">(none in any reply set)</span>'
    return (f'<figure class="chart"><figcaption>{escape(title)}{cut}</figcaption>'
            f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="{escape(title)}">{"".join(parts)}</svg></figure>')


def _phrase_list(phrases, rate) -> str:
    items = "".join(
        f'<li><span class="count">{escape(_fmt(p.get("count")))}×</span>{_text(p.get("reply"))}</li>'
        for p in (phrases or [])[:15] if isinstance(p, dict)
    )
    body = f'<ol class="phrases">{items}</ol>' if items else '<p class="muted">none</p>'
    return f'<p class="muted">stock-phrase rate {_fmt(rate, True)}</p>{body}'


def _stock_phrases(report: dict, systems: dict, colours: dict[str, str]) -> str:
    real = report.get("real") or {}
    cards = [f'<div class="card"><h3>{_swatch(REAL_COLOUR)}real replies</h3>'
             f'{_phrase_list(real.get("stock_phrases"), real.get("stock_rate"))}</div>']
    cards += [f'<div class="card"><h3>{_swatch(colours[n])}{escape(n)}</h3>'
              f'{_phrase_list(s.get("stock_phrases"), s.get("stock_rate"))}</div>' for n, s in systems.items()]
    return ('<section id="phrases"><h2>Stock phrases <span class="muted">(the same reply given again and again)'
            f'</span></h2><div class="cards">{"".join(cards)}</div></section>')


def _highlight(reply: str, match: str) -> str:
    """The reply with the copied text marked; if the match is not found as-is, both are shown."""
    at = reply.find(match) if match else -1
    if at < 0:
        extra = f'<div class="msg">copied text: <mark>{escape(match)}</mark></div>' if match else ""
        return _text(reply) + extra
    end = at + len(match)
    return f'<div class="msg">{escape(reply[:at])}<mark>{escape(match)}</mark>{escape(reply[end:])}</div>'


def _verbatim(report: dict, systems: dict, colours: dict[str, str]) -> str:
    chars = report.get("verbatim_chars")
    blocks = []
    for name, system in systems.items():
        verbatim = system.get("verbatim") or {}
        examples = [e for e in verbatim.get("examples") or [] if isinstance(e, dict)]
        rows = "".join(
            f'<li>{_highlight(str(e.get("reply") or ""), str(e.get("match") or ""))}'
            f'<div class="muted">from a message by {escape(str(e.get("speaker", "?")))} in train.jsonl · '
            f'sample {escape(str(e.get("id", "")))}</div></li>'
            for e in examples
        )
        body = f'<ul class="verbatim">{rows}</ul>' if rows else '<p class="muted">no examples</p>'
        figures = (f'{_fmt(verbatim.get("rate"), True)} of replies, {_fmt(verbatim.get("count"))} in all'
                   if verbatim else "not measured")
        blocks.append(f'<div class="card"><h3>{_swatch(colours[name])}{escape(name)}</h3>'
                      f'<p class="muted">{figures}</p>{body}</div>')
    return ('<section id="verbatim"><h2>Verbatim repeats <span class="muted">(privacy: replies that copy at least '
            f'{escape(_fmt(chars))} characters of training text)</span></h2>'
            f'<div class="cards">{"".join(blocks) or "<p class=muted>No systems.</p>"}</div></section>')


def _example(example: dict, systems: dict, colours: dict[str, str]) -> str:
    replies = example.get("replies") or {}
    cells = [f'<div class="reply" style="border-color:{REAL_COLOUR}"><div class="tag">{_swatch(REAL_COLOUR)}real</div>'
             f'{_text(example.get("real"))}</div>']
    names = list(systems) + [n for n in replies if n not in systems]
    for name in names:
        colour = colours.get(name, "#bbb")
        cells.append(f'<div class="reply" style="border-color:{colour}"><div class="tag">{_swatch(colour)}'
                     f"{escape(name)}</div>{_text(replies.get(name))}</div>")
    return (f'<article class="example"><div class="id muted">{escape(str(example.get("id", "")))}</div>'
            f'{_context(example.get("context"))}<div class="replies">{"".join(cells)}</div></article>')


def _examples(report: dict, systems: dict, colours: dict[str, str]) -> str:
    examples = [e for e in report.get("examples") or [] if isinstance(e, dict)]
    shown = "".join(_example(e, systems, colours) for e in examples[:EXAMPLES_SHOWN])
    rest = examples[EXAMPLES_SHOWN:]
    more = (f'<details><summary>show all {len(examples)} examples</summary>'
            f'{"".join(_example(e, systems, colours) for e in rest)}</details>') if rest else ""
    return ('<section id="examples"><h2>Side by side <span class="muted">(the context, the real reply, each '
            f'system\'s reply)</span></h2>{shown or "<p class=muted>No examples.</p>"}{more}</section>')


def _blind_item(i: int, item: dict) -> str:
    picks = "".join(
        f'<button type="button" class="pick" data-pick="{which}"><span class="which">{which}</span>'
        f'{_text(item.get(which))}</button>'
        for which in ("first", "second")
    )
    return (f'<article class="blind-item" data-i="{i}"><div class="id muted">#{i + 1} · against '
            f'{escape(str(item.get("system", "")))}</div>{_context(item.get("context"))}'
            f'<div class="pair">{picks}</div><p class="verdict" aria-live="polite"></p></article>')


def _selection_note(selection) -> str:
    """How the pairs were chosen (report.json's blind_selection), in a sentence."""
    if not isinstance(selection, dict) or _number(selection.get("pairs")) is None:
        return ""
    left_out = selection.get("left_out") if isinstance(selection.get("left_out"), dict) else {}
    conversations = _number(selection.get("conversations"))
    parts = [f'{_fmt(selection.get("pairs"))} pairs from {_fmt(selection.get("samples"))} held-out samples'
             + (f", {_fmt(selection.get('conversations'))} conversations" if conversations is not None else "")]
    shown, same = _number(left_out.get("shown_elsewhere")) or 0, _number(left_out.get("same_reply")) or 0
    if shown:
        parts.append(f"{_fmt(left_out['shown_elsewhere'])} left out because a reply would also show up in another "
                     "pair (quoted, repeated or in its context), which would give the answer away")
    if same:
        parts.append(f"{_fmt(left_out['same_reply'])} because the generated reply was the real one")
    return f'<p class="muted" id="blind-selection">{escape("; ".join(parts))}.</p>'


def _blind(report: dict, persona: str) -> str:
    items = [b for b in report.get("blind") or [] if isinstance(b, dict)]
    if not items:
        return '<section id="blind"><h2>Blind test</h2><p class="muted">No blind pairs in this report.</p></section>'
    shown = "".join(_blind_item(i, b) for i, b in enumerate(items[:BLIND_SHOWN]))
    more = (f"<details><summary>show all {len(items)} pairs</summary>"
            + "".join(_blind_item(i, b) for i, b in enumerate(items[BLIND_SHOWN:], BLIND_SHOWN))
            + "</details>") if len(items) > BLIND_SHOWN else ""
    return (
        '<section id="blind"><h2>Blind test</h2>'
        f"<p>Which reply did {escape(persona)} really write? Give this page to friends who know {escape(persona)}; "
        "each clicks the reply they think is real, and the page tells them after each pick. Vote before "
        "scrolling on: the sections below quote replies, and the side-by-side examples show the answers. "
        "No reply here appears anywhere else in the test, so every pair is judged on its own.</p>"
        f"{_selection_note(report.get('blind_selection'))}"
        '<p class="muted">How to read the score: the interval is the exact 95% (Clopper-Pearson) interval for the '
        "rate of picking the real reply. The whole interval above 50%: the voters could tell which reply was real. "
        "Holding 50% and ending below 75%, halfway from a coin to always right: they could not. Otherwise more "
        "votes are needed. The votes of this browser are counted together; save them to keep a copy.</p>"
        '<div class="scorebox"><p id="blind-score">No votes yet.</p><p id="blind-verdict"></p>'
        '<ul id="blind-per-system"></ul>'
        f'<button type="button" id="blind-save" disabled>save votes ({SAVE_NAME})</button> '
        '<button type="button" id="blind-reset">start over</button></div>'
        f"{shown}{more}</section>"
    )


def _blind_data(report: dict, persona: str) -> dict:
    """What the script needs: the answers, kept out of the page's text so nothing shows before a vote."""
    return {
        "persona": persona,
        "created": report.get("created") or "",
        "fingerprint": (report.get("dataset") or {}).get("fingerprint") or "",
        "file": SAVE_NAME,
        "items": [{"id": b.get("id"), "system": b.get("system"), "real_is": b.get("real_is")}
                  for b in report.get("blind") or [] if isinstance(b, dict)],
    }


_CSS = """
:root { --real: #4b4b4b; --line: #ddd; --muted: #666; --bg: #fafafa; --ok: #1a7f37; --bad: #c62828; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1200px; padding: 24px; background: var(--bg); color: #222; line-height: 1.5;
  font-family: system-ui, -apple-system, "Segoe UI", "Hiragino Sans", "Hiragino Kaku Gothic ProN", "Noto Sans CJK JP",
    "Noto Sans JP", "Yu Gothic UI", "Yu Gothic", Meiryo, "Source Han Sans", "Apple Color Emoji", "Segoe UI Emoji",
    "Noto Color Emoji", sans-serif; }
h1 { font-size: 1.6rem; margin: 0 0 .3rem; } h2 { margin: 2rem 0 .6rem; border-bottom: 2px solid var(--line); }
h3 { font-size: 1rem; margin: .8rem 0 .3rem; }
.persona { color: #0072B2; } .muted { color: var(--muted); font-weight: normal; font-size: .9em; }
.facts { margin: 0; color: var(--muted); } .howto { background: #fff; border-left: 4px solid #0072B2; padding: .5rem .8rem; }
code { font-size: .9em; background: #eee; padding: 0 .25em; border-radius: 3px; }
nav a { margin-right: 1rem; }
table.grid { border-collapse: collapse; background: #fff; margin: .4rem 0; }
table.grid th, table.grid td { border: 1px solid var(--line); padding: .3rem .6rem; text-align: left; white-space: nowrap; }
table.grid thead th { background: #f0f0f0; font-size: .9em; cursor: help; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { background: #e8f5e9; font-weight: 600; } .star { color: #e69f00; margin-left: .25em; }
tr.realrow th, tr.realrow td { color: var(--muted); } tr.total th, tr.total td { border-top: 2px solid #999; }
.wide { overflow-x: auto; max-width: 100%; }
td.dist { min-width: 130px; font-variant-numeric: tabular-nums; }
.track { display: inline-block; width: 60px; height: 8px; background: #eee; margin-right: .4rem; vertical-align: middle; }
.minibar { display: block; height: 100%; }
.sw { display: inline-block; width: .8em; height: .8em; border-radius: 2px; margin-right: .35em; vertical-align: -.05em; }
.legend { display: flex; flex-wrap: wrap; gap: .4rem 1.2rem; margin: .4rem 0 .8rem; }
.charts { display: grid; align-items: start; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 1rem; }
figure.chart { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: .5rem .7rem; }
figcaption { font-weight: 600; margin-bottom: .3rem; }
svg.chart { width: 100%; max-width: 640px; height: auto; display: block; font-size: 11px; }
svg.chart .grid { stroke: #e4e4e4; } svg.chart .tick { fill: var(--muted); text-anchor: middle; font-size: 10px; }
svg.chart .lab { text-anchor: end; fill: #333; } svg.chart rect.bar:hover { opacity: .75; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 1rem; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: .4rem .8rem; min-width: 0; }
ol.phrases, ul.verbatim { padding-left: 1.2rem; margin: .3rem 0; } ul.verbatim li { margin-bottom: .6rem; }
.count { float: right; color: var(--muted); font-variant-numeric: tabular-nums; margin-left: .5rem; }
mark { background: #ffe08a; }
.msg { white-space: pre-wrap; overflow-wrap: anywhere; word-break: normal; }
.reply .msg, button.pick .msg { max-height: 16em; overflow-y: auto; }
.missing { color: var(--muted); font-style: italic; }
article.example, article.blind-item { background: #fff; border: 1px solid var(--line); border-radius: 6px;
  padding: .6rem .8rem; margin: .8rem 0; }
.id { font-size: .8em; }
.ctx { border-left: 3px solid var(--line); padding-left: .6rem; margin: .3rem 0 .6rem; color: #444; }
.turn { display: flex; gap: .5rem; } .who { font-weight: 600; white-space: nowrap; } .who::after { content: ":"; }
.turn .msg { min-width: 0; }
.replies { display: grid; grid-template-columns: repeat(auto-fit, minmax(220px, 1fr)); gap: .5rem; }
.reply { border-top: 4px solid; background: #f7f7f7; padding: .3rem .5rem; min-width: 0; }
.tag { font-size: .8em; color: var(--muted); }
.scorebox { position: sticky; top: 0; z-index: 1; background: #fff; border: 1px solid var(--line); border-radius: 6px;
  padding: .4rem .8rem; box-shadow: 0 2px 6px rgba(0,0,0,.06); }
#blind-score { font-weight: 600; margin: .2rem 0; } #blind-per-system { margin: 0 0 .4rem; }
#blind-verdict { margin: .2rem 0; } #blind-verdict.could_tell { color: var(--bad); }
#blind-verdict.could_not_tell { color: var(--ok); }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: .6rem; }
button { font: inherit; cursor: pointer; }
button.pick { text-align: left; background: #f7f7f7; border: 2px solid var(--line); border-radius: 6px;
  padding: .4rem .6rem; min-width: 0; color: inherit; display: flex; flex-direction: column;
  justify-content: flex-start; }
button.pick:hover:enabled { border-color: #0072B2; }
button.pick:disabled { cursor: default; }
.which { display: block; font-size: .8em; color: var(--muted); text-transform: uppercase; }
.voted button.pick.is-real { border-color: var(--ok); background: #e8f5e9; }
.voted button.pick.picked:not(.is-real) { border-color: var(--bad); background: #fdecea; }
.verdict { margin: .4rem 0 0; font-weight: 600; } .verdict.right { color: var(--ok); } .verdict.wrong { color: var(--bad); }
details > summary { cursor: pointer; color: #0072B2; margin: .6rem 0; }
@media (max-width: 600px) { .pair { grid-template-columns: 1fr; } body { padding: 12px; } }
"""

# The blind test. It never writes chat text into the page (that HTML is escaped in Python); it only
# toggles classes and writes its own sentences with textContent.
_SCRIPT = """
(() => {
  "use strict";

  // What k right picks in n votes say. The exact Clopper-Pearson 95% interval: the rates p for which k
  // is in neither 2.5% tail of Binomial(n, p), found by bisection. finetune/binomial.py is the Python
  // twin, with the reasons for the verdict's thresholds; the tests hold both to scipy's figures.
  const CHANCE = 0.5, CAN_TELL = 0.75, ALPHA = 0.05;

  function logChoose(n) {
    const logFactorial = [0];
    for (let i = 1; i <= n; i++) logFactorial.push(logFactorial[i - 1] + Math.log(i));
    return logFactorial.map((_, j) => logFactorial[n] - logFactorial[j] - logFactorial[n - j]);
  }

  function solve(k, n, upper) {  // p where P(X >= k) (upper) or P(X <= k) is ALPHA / 2
    const logC = logChoose(n);
    const from = upper ? k : 0, to = upper ? n : k;
    let lo = 0, hi = 1;
    for (let step = 0; step < 100; step++) {
      const mid = (lo + hi) / 2;
      if (mid === lo || mid === hi) break;
      const logP = Math.log(mid), logQ = Math.log1p(-mid);
      let tail = 0;
      for (let j = from; j <= to; j++) tail += Math.exp(logC[j] + j * logP + (n - j) * logQ);
      if ((tail < ALPHA / 2) === upper) lo = mid; else hi = mid;
    }
    return (lo + hi) / 2;
  }

  function clopperPearson(k, n) {
    if (!n) return [0, 1];
    return [k === 0 ? 0 : solve(k, n, true), k === n ? 1 : solve(k, n, false)];
  }

  function judge(right, total) {
    const [low, high] = clopperPearson(right, total);
    const verdict = total && low > CHANCE ? "could_tell" : total && high < CAN_TELL ? "could_not_tell" : "not_enough";
    return {right: right, total: total, rate: total ? right / total : null, low: low, high: high, verdict: verdict};
  }

  window.bunshinBlind = {clopperPearson: clopperPearson, judge: judge};  // for the tests, and a reader's console

  const data = JSON.parse(document.getElementById("blind-data").textContent);
  const items = data.items;
  const key = "bunshin-blind:" + data.created + ":" + data.fingerprint;
  const scoreText = document.getElementById("blind-score");
  if (!scoreText) return;
  const verdictBox = document.getElementById("blind-verdict");
  const perSystem = document.getElementById("blind-per-system");
  const saveButton = document.getElementById("blind-save");
  const systems = [...new Set(items.map((item) => item.system))];
  let votes = load();  // item index -> "first" | "second"

  function load() {
    let saved = {};
    try { saved = JSON.parse(localStorage.getItem(key) || "{}") || {}; } catch (e) { saved = {}; }
    const kept = {};
    for (const [i, vote] of Object.entries(saved)) {
      const item = items[Number(i)];
      // a vote from another report (same key, changed pairs) is dropped, not counted against the wrong pair
      if (item && vote && vote.id === item.id && (vote.picked === "first" || vote.picked === "second")) {
        kept[i] = vote.picked;
      }
    }
    return kept;
  }

  function store() {
    const saved = {};
    for (const [i, picked] of Object.entries(votes)) saved[i] = {id: items[i].id, picked: picked};
    try {
      if (Object.keys(saved).length) localStorage.setItem(key, JSON.stringify(saved));
      else localStorage.removeItem(key);
    } catch (e) { /* storage refused (private window): the votes last for this visit only */ }
  }

  function voteList() {
    return Object.keys(votes).map(Number).sort((a, b) => a - b).map((i) => ({
      id: items[i].id, system: items[i].system, picked: votes[i], correct: votes[i] === items[i].real_is,
    }));
  }

  function score() {
    const all = {right: 0, total: 0};
    const by = {};
    for (const vote of voteList()) {
      const s = by[vote.system] || (by[vote.system] = {right: 0, total: 0});
      for (const tally of [all, s]) { tally.total += 1; if (vote.correct) tally.right += 1; }
    }
    const judged = {};
    for (const [name, t] of Object.entries(by)) judged[name] = judge(t.right, t.total);
    return {all: judge(all.right, all.total), by: judged};
  }

  const pct = (x) => Math.round(100 * x) + "%";
  // the interval rounded outwards, so the shown one always holds the exact one
  const figures = (j) => pct(j.rate) + ", 95% interval " + Math.floor(100 * j.low) + "–" + Math.ceil(100 * j.high) + "%";
  const SHORT = {could_tell: "could tell", could_not_tell: "could not tell", not_enough: "not enough votes yet"};

  function verdictText(j) {
    if (j.verdict === "could_tell") {
      return "Your friends could tell which reply was real: the whole interval is above a coin's 50%.";
    }
    if (j.verdict === "could_not_tell") {
      return "Your friends could not tell which reply was real (no better than a coin): the interval stays "
        + "below 75%, halfway from guessing to always right.";
    }
    return "Not enough votes yet to say whether your friends could tell which reply was real"
      + (j.total ? ": the interval holds 50% and reaches 75%." : ".");
  }

  function show() {
    for (const article of document.querySelectorAll("article.blind-item")) {
      const i = Number(article.dataset.i);
      const picked = votes[i];
      const verdict = article.querySelector(".verdict");
      article.classList.toggle("voted", picked !== undefined);
      for (const button of article.querySelectorAll("button.pick")) {
        const which = button.dataset.pick;
        button.disabled = picked !== undefined;
        button.classList.toggle("picked", picked === which);
        // the answer reaches the page only after a vote
        button.classList.toggle("is-real", picked !== undefined && items[i].real_is === which);
      }
      if (picked === undefined) {
        verdict.textContent = "";
        verdict.className = "verdict";
      } else {
        const right = picked === items[i].real_is;
        verdict.textContent = right ? "Right: that is the real reply." : "Wrong: the real reply was the " + items[i].real_is + " one.";
        verdict.className = "verdict " + (right ? "right" : "wrong");
      }
    }
    const s = score();
    scoreText.textContent = s.all.total
      ? s.all.total + " of " + items.length + " pairs judged; the real reply picked in " + s.all.right + ": "
        + figures(s.all) + " (a coin: 50%)"
      : "No votes yet: " + items.length + " pairs to judge.";
    verdictBox.textContent = verdictText(s.all);
    verdictBox.className = s.all.verdict;
    perSystem.textContent = "";
    if (systems.length > 1) {
      for (const name of systems) {
        const j = s.by[name];
        const li = document.createElement("li");
        li.dataset.system = name;
        li.textContent = name + ": " + (j ? j.right + " of " + j.total + " (" + figures(j) + "): " + SHORT[j.verdict]
                                          : "no votes yet");
        perSystem.appendChild(li);
      }
    }
    saveButton.disabled = !s.all.total;
  }

  document.getElementById("blind").addEventListener("click", (event) => {
    const button = event.target.closest("button.pick");
    if (!button || button.disabled) return;
    const i = Number(button.closest("article.blind-item").dataset.i);
    if (votes[i] !== undefined) return;
    votes[i] = button.dataset.pick;
    store();
    show();
  });

  saveButton.addEventListener("click", () => {
    const s = score();
    const payload = {
      persona: data.persona, created: data.created, fingerprint: data.fingerprint, votes: voteList(),
      score: Object.assign({}, s.by, {all: s.all}),  // "all" wins over a system of that name
    };
    const url = URL.createObjectURL(new Blob([JSON.stringify(payload, null, 2)], {type: "application/json"}));
    const link = document.createElement("a");
    link.href = url;
    link.download = data.file;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  });

  document.getElementById("blind-reset").addEventListener("click", () => {
    if (Object.keys(votes).length && !confirm("Forget all your votes on this report?")) return;
    votes = {};
    store();
    show();
  });

  show();
})();
"""
