"""
The chart writer of the lab: hand-written SVG (no plotting library), line charts in panels and
horizontal bars, for results/NAME.svg.
"""
import math
from html import escape

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]


def ticks(lo, hi, log=False, powers_of_two=False):
    """Round tick values covering [lo, hi]: 1, 2 or 5 times a power of ten apart (about 5 of them), or on a
    log axis the powers of ten (with 2 and 5 between them when the range is under two decades)."""
    if log and powers_of_two:  # lengths and widths of 2^k: ticks on them, every other one past 7 ticks
        a, b = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
        step = 1 if b - a <= 6 else 2
        return [2 ** e for e in range(a, b + step, step)]
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        b = max(b, a + 1)
        steps = (1, 2, 5) if b - a <= 2 else (1,)
        out = [m * 10 ** e for e in range(a, b + 1) for m in steps if lo / 1.0001 <= m * 10 ** e <= hi * 1.0001]
        below = max([m * 10 ** e for e in range(a - 1, b + 1) for m in steps if m * 10 ** e < lo / 1.0001], default=lo)
        above = min([m * 10 ** e for e in range(a, b + 2) for m in steps if m * 10 ** e > hi * 1.0001], default=hi)
        return sorted({*([below] if not out or out[0] > lo * 1.0001 else []), *out,
                       *([above] if not out or out[-1] < hi / 1.0001 else [])})
    if hi <= lo:
        lo, hi = lo - (abs(lo) or 1) * 0.1, hi + (abs(hi) or 1) * 0.1
    raw = (hi - lo) / 5
    step = min(m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10) if m * 10 ** math.floor(math.log10(raw)) >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def tick_label(v):
    """0.25, 1000, 1.5e12: a round value written without float noise."""
    if v == 0 or 1e-4 <= abs(v) < 1e5:
        return f"{v:.10g}"
    mantissa, exponent = f"{v:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def marker(i, x, y, colour):
    """Circle, square, triangle, diamond, ... by series index: series drawn on each other stay apart."""
    shape = i % 4
    if shape == 0:
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>'
    if shape == 1:
        return f'<rect x="{x - 3:.1f}" y="{y - 3:.1f}" width="6" height="6" fill="none" stroke="{colour}" stroke-width="1.5"/>'
    if shape == 2:
        return f'<polygon points="{x:.1f},{y - 4:.1f} {x - 3.5:.1f},{y + 3:.1f} {x + 3.5:.1f},{y + 3:.1f}" fill="{colour}"/>'
    return f'<polygon points="{x:.1f},{y - 4:.1f} {x + 4:.1f},{y:.1f} {x:.1f},{y + 4:.1f} {x - 4:.1f},{y:.1f}" fill="none" stroke="{colour}" stroke-width="1.5"/>'


def svg_lines(panels, width=380, height=260, cols=2):
    """Hand-written SVG line charts (no plotting library). panels: [dict(title, xlabel, ylabel,
    series={name: [(x, y), ...]}, logx=False, logy=False, marks=[(x, label)])]. One legend for all panels.
    Ticks fall at round values; each series has its own dash, marker shape and a small sideways offset, so
    that series lying on each other stay visible; marks draw dashed vertical lines (e.g. a trained length)."""
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
        out.append(f'<rect x="{x}" y="{y - 5}" width="14" height="4" fill="{colour[n]}"/>' + marker(i, x + 7, y - 3, colour[n])
                   + f'<text x="{x + 18}" y="{y}">{escape(n)}</text>')
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
        xs, ys = [x for x, _ in pts] + [v for v, _ in p.get("marks", [])], [y for _, y in pts]
        two = lambda v: v > 0 and float(v).is_integer() and int(v) & (int(v) - 1) == 0
        xt = ticks(min(xs), max(xs), p.get("logx"), all(map(two, xs)))
        yt = ticks(min(ys), max(ys), p.get("logy"), all(map(two, ys)))
        fx = math.log10 if p.get("logx") else (lambda v: v)
        fy = math.log10 if p.get("logy") else (lambda v: v)
        x0, x1, y0, y1 = fx(xt[0]), fx(xt[-1]), fy(yt[0]), fy(yt[-1])
        X = lambda v: left + w * (fx(v) - x0) / (x1 - x0)
        Y = lambda v: top + h * (1 - (fy(v) - y0) / (y1 - y0))
        for xv in xt:
            out.append(f'<text x="{X(xv):.1f}" y="{top + h + 14}" text-anchor="middle">{tick_label(xv)}</text>'
                       f'<line x1="{X(xv):.1f}" x2="{X(xv):.1f}" y1="{top + h}" y2="{top + h + 4}" stroke="#888"/>')
        for yv in yt:
            out.append(f'<text x="{left - 6}" y="{Y(yv) + 4:.1f}" text-anchor="end">{tick_label(yv)}</text>'
                       f'<line x1="{left - 4}" x2="{left}" y1="{Y(yv):.1f}" y2="{Y(yv):.1f}" stroke="#888"/>')
        for xv, label in p.get("marks", []):  # a vertical marker, e.g. the trained length
            out.append(f'<line x1="{X(xv):.1f}" x2="{X(xv):.1f}" y1="{top}" y2="{top + h}" stroke="#444" stroke-dasharray="3,3"/>'
                       f'<text x="{X(xv) + 3:.1f}" y="{top + 11}">{escape(label)}</text>')
        shown = [n for n in names if n in p["series"]]
        for n, s in p["series"].items():
            s = [(x, y) for x, y in s if y == y and math.isfinite(y)]
            k = shown.index(n)
            dx = 2.0 * (k - (len(shown) - 1) / 2)  # a small sideways offset: series lying on each other stay visible
            dash = ["", "7,3", "2,3", "9,3,2,3"][names.index(n) % 4]
            line = " ".join(f"{X(x) + dx:.1f},{Y(y):.1f}" for x, y in s)
            out.append(f'<polyline points="{line}" fill="none" stroke-width="2" stroke="{colour[n]}" stroke-dasharray="{dash}"/>'
                       if len(s) > 1 else "")
            if len(s) <= 40:  # a marker of its own shape per series
                out += [marker(names.index(n), X(x) + dx, Y(y), colour[n]) for x, y in s]
    return "\n".join(out + ["</svg>"]) + "\n"


def svg_bars(title, xlabel, bars, width=640):
    """Horizontal bars from zero: [(label, value, spread)]; the spread is drawn as a whisker (value ± spread).
    Ticks at round values."""
    row, top = 22, 34
    left = max(120, 6 * max(len(label) for label, _, _ in bars) + 16)  # ~6 px per character at font-size 11
    width = max(width, left + 360, 7 * len(title) + 20)  # room for the bars and the (bold) title
    vals = [v + (s or 0) for _, v, s in bars if v == v]
    xt = ticks(min(0.0, *(v - (s or 0) for _, v, s in bars if v == v)) if vals else 0.0, max(vals) if vals else 1.0)
    lo, hi = xt[0], xt[-1]
    w = width - left - 60
    X = lambda v: left + w * (v - lo) / ((hi - lo) or 1)
    bottom = top + row * len(bars)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{bottom + 40}" '
           f'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-weight="bold">{escape(title)}</text>']
    for t in xt:
        out.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{top}" y2="{bottom + 3}" stroke="#ddd"/>'
                   f'<text x="{X(t):.1f}" y="{bottom + 14}" text-anchor="middle">{tick_label(t)}</text>')
    for i, (label, v, s) in enumerate(bars):
        y = top + row * i
        out.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{escape(label)}</text>')
        if v == v:
            out.append(f'<rect x="{X(0):.1f}" y="{y + 3}" width="{max(1, X(v) - X(0)):.1f}" height="14" fill="{COLOURS[0]}"/>'
                       f'<text x="{X(v) + 4 + (X(v + s) - X(v) if s else 0):.1f}" y="{y + 14}">{v:.3f}</text>')
            if s:
                out.append(f'<line x1="{X(v - s):.1f}" x2="{X(v + s):.1f}" y1="{y + 10}" y2="{y + 10}" stroke="black"/>')
    out.append(f'<text x="{left + w / 2}" y="{bottom + 30}" text-anchor="middle">{escape(xlabel)}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"
