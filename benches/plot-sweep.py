#!/usr/bin/env python3
"""Plot replicator throughput against block size from replicator-sweep.sh output (markdown).

usage: plot-sweep.py SWEEP.md OUT.svg

One line per (mode, wait, replicas) series, plus the measured bounds per block size as dashed
lines: the serial bound 1/(1/R_read + 1/R_net + 1/R_write) (single-threaded TCG) and the min
bound min(R_read, R_net, R_write) (overlapping stages), for host buffers and, when measured,
p2p buffers, 1 replica. Plain SVG, no dependencies.
"""
import math
import re
import sys


def parse(text):
    series, bounds, bs = {}, {}, None
    names = {
        "**serial bound**": "serial bound 1/(1/R_read+1/R_net+1/R_write)",
        "**min bound**": "min bound min(R_read, R_net, R_write)",
        "**serial bound, p2p buffers**": "serial bound, p2p buffers",
        "**min bound, p2p buffers**": "min bound, p2p buffers",
    }
    for line in text.splitlines():
        m = re.match(r"size \S+, block (\S+),", line)
        if m:
            bs = m.group(1)
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if bs is None or len(cells) < 2:
            continue
        head, _, which = cells[0].partition(", 1 replica")
        if which and head in names:
            bounds.setdefault(names[head], {})[bs] = float(cells[1])
        elif len(cells) >= 4 and cells[0].startswith(("host,", "p2p,")) and cells[3] not in ("", "FAIL"):
            try:
                v = float(cells[3])
            except ValueError:
                continue
            key = f"{cells[0]} ({cells[1]} wait, {cells[2]} replica{'s' if cells[2] != '1' else ''})"
            series.setdefault(key, {})[bs] = v
    return series, bounds


def size_bytes(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


def svg(series, bounds):
    blocks = sorted({b for s in list(series.values()) + list(bounds.values()) for b in s}, key=size_bytes)
    if not blocks:
        sys.exit("no data rows found")
    ymax = max(v for s in list(series.values()) + list(bounds.values()) for v in s.values())
    ymax = math.ceil(ymax * 1.15) or 1
    W, H, L, R, T, B = 760, 440, 70, 260, 40, 60
    pw, ph = W - L - R, H - T - B
    x = lambda b: L + (pw * blocks.index(b) / max(len(blocks) - 1, 1))
    y = lambda v: T + ph - ph * v / ymax
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="22" font-size="15">Replicator throughput vs block size (testbed VM, QEMU TCG, rxe)</text>']
    for i in range(6):
        v = ymax * i / 5
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
    for b in blocks:
        out.append(f'<text x="{x(b):.1f}" y="{T + ph + 20}" text-anchor="middle">{b}</text>')
    out.append(f'<text x="{L + pw / 2}" y="{H - 15}" text-anchor="middle">block size</text>')
    out.append(f'<text x="18" y="{T + ph / 2}" transform="rotate(-90 18 {T + ph / 2})" text-anchor="middle">MB/s</text>')
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    rows = list(series.items()) + list(bounds.items())
    for i, (name, pts) in enumerate(rows):
        is_bound = name in bounds
        color = ("#999" if "p2p" in name else "#444") if is_bound else colors[i % len(colors)]
        dash = (' stroke-dasharray="6 4"' if name.startswith("serial") else ' stroke-dasharray="2 3"') if is_bound else ""
        ordered = [b for b in blocks if b in pts]
        path = " ".join(f"{x(b):.1f},{y(pts[b]):.1f}" for b in ordered)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for b in ordered:
            out.append(f'<circle cx="{x(b):.1f}" cy="{y(pts[b]):.1f}" r="3" fill="{color}"/>')
        ly = T + 10 + i * 48
        out.append(f'<line x1="{L + pw + 15}" x2="{L + pw + 35}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>')
        words, lines = name.split(" "), [""]
        for w in words:
            if len(lines[-1]) + len(w) > 30:
                lines.append("")
            lines[-1] += (" " if lines[-1] else "") + w
        for k, t in enumerate(lines):
            out.append(f'<text x="{L + pw + 40}" y="{ly + 4 + 13 * k}">{t}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    series, bounds = parse(open(sys.argv[1]).read())
    open(sys.argv[2], "w").write(svg(series, bounds))


if __name__ == "__main__":
    main()
