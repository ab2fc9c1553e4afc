"""
The chart writer of the lab: hand-written SVG (no plotting library), line charts in panels and
horizontal bars, for results/NAME.svg.
"""
import math
from html import escape

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]


def svg_lines(panels, width=380, height=260, cols=2):
    """Hand-written SVG line charts (no plotting library). panels: [dict(title, xlabel, ylabel,
    series={name: [(x, y), ...]}, logx=False, logy=False)]. One legend for all panels."""
    names = list(dict.fromkeys(n for p in panels for n in p["series"]))
    colour = {n: COLOURS[i % len(COLOURS)] for i, n in enumerate(names)}
    rows_n, total_w = math.ceil(len(panels) / cols), width * min(cols, len(panels))
    col_w = max(170, 6 * max(map(len, names), default=0) + 30)  # ~6 px per character at font-size 11
    per_row = max(1, total_w // col_w)  # legend entries per line
    legend_h = 16 * math.ceil(len(names) / per_row) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" '
           f'height="{height * rows_n + legend_h}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>']
    for i, n in enumerate(names):
        x, y = 10 + col_w * (i % per_row), 12 + 16 * (i // per_row)
        out.append(f'<rect x="{x}" y="{y - 5}" width="14" height="4" fill="{colour[n]}"/>'
                   f'<text x="{x + 18}" y="{y}">{escape(n)}</text>')
    for k, p in enumerate(panels):
        ox, oy = (k % cols) * width, legend_h + (k // cols) * height
        left, top, w, h = ox + 55, oy + 22, width - 90, height - 62
        out.append(f'<text x="{left + w / 2}" y="{oy + 14}" text-anchor="middle" font-weight="bold">{escape(p["title"])}</text>'
                   f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#888"/>'
                   f'<text x="{left + w / 2}" y="{top + h + 30}" text-anchor="middle">{escape(p["xlabel"])}</text>'
                   f'<text transform="translate({ox + 12},{top + h / 2}) rotate(-90)" text-anchor="middle">'
                   f'{escape(p["ylabel"])}</text>')
        pts = [(x, y) for s in p["series"].values() for x, y in s if y == y and math.isfinite(y)]
        if not pts:
            continue
        fx = math.log10 if p.get("logx") else (lambda v: v)
        fy = math.log10 if p.get("logy") else (lambda v: v)
        x0, x1 = min(fx(x) for x, _ in pts), max(fx(x) for x, _ in pts)
        y0, y1 = min(fy(y) for _, y in pts), max(fy(y) for _, y in pts)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
        X = lambda v: left + w * (fx(v) - x0) / (x1 - x0)
        Y = lambda v: top + h * (1 - (fy(v) - y0) / (y1 - y0))
        for t in range(5):  # ticks, in data units
            xv, yv = x0 + (x1 - x0) * t / 4, y0 + (y1 - y0) * t / 4
            xv, yv = (10 ** xv if p.get("logx") else xv), (10 ** yv if p.get("logy") else yv)
            out.append(f'<text x="{X(xv):.1f}" y="{top + h + 14}" text-anchor="middle">{xv:.3g}</text>'
                       f'<text x="{left - 4}" y="{Y(yv) + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
        for n, s in p["series"].items():  # a dash pattern each, so that lines lying on each other still show
            s = [(x, y) for x, y in s if y == y and math.isfinite(y)]
            dash = ["", "7,3", "2,3", "9,3,2,3"][names.index(n) % 4]
            line = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in s)
            out.append(f'<polyline points="{line}" fill="none" stroke-width="2" stroke="{colour[n]}" stroke-dasharray="{dash}"/>'
                       if len(s) > 1 else "")
            if len(s) <= 12:  # few points: mark them
                out += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="2.5" fill="{colour[n]}"/>' for x, y in s]
    return "\n".join(out + ["</svg>"]) + "\n"


def svg_bars(title, xlabel, bars, width=640, origin=None):
    """Horizontal bars: [(label, value, spread)]; the spread is drawn as a whisker. The axis starts at
    `origin`, or a little below the smallest bar (losses: the differences are what matters)."""
    row, top = 22, 34
    left = max(120, 6 * max(len(label) for label, _, _ in bars) + 16)  # ~6 px per character at font-size 11
    width = max(width, left + 360, 7 * len(title) + 20)  # room for the bars and the (bold) title
    vals = [v + (s or 0) for _, v, s in bars if v == v]
    lo = min(v - (s or 0) for _, v, s in bars if v == v) if vals else 0
    lo, hi = (lo - 0.1 * (max(vals) - lo + 1e-9) if origin is None else origin), max(vals) if vals else 1
    w = width - left - 60
    X = lambda v: left + w * (v - lo) / ((hi - lo) or 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + row * len(bars) + 40}" '
           f'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-weight="bold">{escape(title)}</text>']
    for i, (label, v, s) in enumerate(bars):
        y = top + row * i
        out.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{escape(label)}</text>')
        if v == v:
            out.append(f'<rect x="{left}" y="{y + 3}" width="{max(1, X(v) - left):.1f}" height="14" fill="{COLOURS[0]}"/>'
                       f'<text x="{X(v) + 4 + (X(v + s) - X(v) if s else 0):.1f}" y="{y + 14}">{v:.3f}</text>')
            if s:
                out.append(f'<line x1="{X(v - s):.1f}" x2="{X(v + s):.1f}" y1="{y + 10}" y2="{y + 10}" stroke="black"/>')
    out.append(f'<text x="{left + w / 2}" y="{top + row * len(bars) + 24}" text-anchor="middle">{escape(xlabel)} '
               f'(axis from {lo:.3g})</text>')
    return "\n".join(out + ["</svg>"]) + "\n"
