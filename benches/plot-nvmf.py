#!/usr/bin/env python3
"""Plot 4 KiB randread IOPS against queue depth from nvmf-bench.sh output.

usage: plot-nvmf.py NVMF-BENCH-OUTPUT... OUT.svg

Reads the `RESULT phase=sweep ...` lines of one or more runs of the script (several VM boots
are pooled): one line per target, the median IOPS of the runs at
each queue depth, and a vertical bar from the lowest to the highest run. The queue depth axis
is logarithmic (1, 2, 4, ...). Plain SVG, no dependencies.
"""
import math
import statistics
import sys

NAMES = {
    "a": "(a) peerpipe target, host buffers",
    "b": "(b) peerpipe target, p2p buffers (CMB)",
    "c": "(c) kernel nvmet-rdma target",
}
COLORS = {"a": "#1f77b4", "b": "#2ca02c", "c": "#d62728"}


def parse(text):
    """{target: {qd: [iops, ...]}} from the sweep's RESULT lines (failed runs left out)."""
    runs = {}
    for line in text.splitlines():
        if not line.startswith("RESULT ") or "fail=1" in line:
            continue
        kv = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
        if kv.get("phase") != "sweep" or kv.get("rw") != "randread":
            continue
        runs.setdefault(kv["target"], {}).setdefault(int(kv["qd"]), []).append(float(kv["iops"]))
    return runs


def svg(runs, title):
    qds = sorted({q for t in runs.values() for q in t})
    if not qds:
        sys.exit("no RESULT phase=sweep lines found")
    ymax = max(v for t in runs.values() for vs in t.values() for v in vs)
    # round the top up to a multiple of 5 units of the next decade down (2263 -> 2500)
    unit = 5 * 10 ** (math.floor(math.log10(ymax * 1.05)) - 1) if ymax > 0 else 1
    ymax = math.ceil(ymax * 1.05 / unit) * unit or 1
    W, H, L, R, T, B = 780, 440, 70, 250, 44, 60
    pw, ph = W - L - R, H - T - B
    lo, hi = math.log2(qds[0]), math.log2(qds[-1])
    x = lambda q: L + pw * ((math.log2(q) - lo) / (hi - lo) if hi > lo else 0.5)
    y = lambda v: T + ph - ph * v / ymax
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{L}" y="24" font-size="15">{title}</text>',
    ]
    for i in range(6):
        v = ymax * i / 5
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    for q in qds:
        out.append(f'<text x="{x(q):.1f}" y="{T + ph + 20}" text-anchor="middle">{q}</text>')
    out.append(f'<text x="{L + pw / 2}" y="{H - 15}" text-anchor="middle">queue depth (fio iodepth, log scale)</text>')
    out.append(
        f'<text x="18" y="{T + ph / 2}" transform="rotate(-90 18 {T + ph / 2})" text-anchor="middle">IOPS (4 KiB randread)</text>'
    )
    for i, t in enumerate(sorted(runs)):
        pts, color = runs[t], COLORS.get(t, "#444")
        med = {q: statistics.median(v) for q, v in pts.items()}
        ordered = [q for q in qds if q in med]
        path = " ".join(f"{x(q):.1f},{y(med[q]):.1f}" for q in ordered)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for q in ordered:
            out.append(
                f'<line x1="{x(q):.1f}" x2="{x(q):.1f}" y1="{y(min(pts[q])):.1f}" y2="{y(max(pts[q])):.1f}" stroke="{color}" stroke-width="1"/>'
            )
            out.append(f'<circle cx="{x(q):.1f}" cy="{y(med[q]):.1f}" r="3" fill="{color}"/>')
        ly = T + 10 + i * 44
        out.append(f'<line x1="{L + pw + 15}" x2="{L + pw + 35}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/>')
        words, lines = NAMES.get(t, t).split(" "), [""]
        for w in words:
            if len(lines[-1]) + len(w) > 28:
                lines.append("")
            lines[-1] += (" " if lines[-1] else "") + w
        for k, s in enumerate(lines):
            out.append(f'<text x="{L + pw + 40}" y="{ly + 4 + 14 * k}">{s}</text>')
    n = max(len(v) for t in runs.values() for v in t.values())
    out.append(
        f'<text x="{L + pw + 15}" y="{T + ph - 10}" font-size="11">points: median of {n} runs;</text>'
    )
    out.append(f'<text x="{L + pw + 15}" y="{T + ph + 4}" font-size="11">bars: lowest to highest run</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    runs = parse("\n".join(open(f).read() for f in sys.argv[1:-1]))
    title = "NVMe-oF targets: IOPS vs queue depth (testbed VM, QEMU TCG, rxe)"
    open(sys.argv[-1], "w").write(svg(runs, title))


if __name__ == "__main__":
    main()
