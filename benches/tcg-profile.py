#!/usr/bin/env python3
"""Host CPU per MB moved, by category, from a `perf report --stdio --sort sym` of the QEMU
process recorded with -perfmap (benches/tcg-profile.sh).

usage: tcg-profile.py KALLSYMS REPORT RATE_MB_PER_S SECONDS [IOPS]

With IOPS, each figure is also given as host CPU us per I/O.

Translated guest code appears as `guest-0x<guest address>`; kernel addresses are named from
the guest's /proc/kallsyms. Categories: guest kernel payload work (rxe's copies and CRCs), other
guest kernel code, guest user code, QEMU's TB lookup / softmmu TLB / translation, other QEMU
code (helpers, device models, main loop), and host kernel work done for QEMU's threads.
"""
import bisect
import collections
import re
import sys

PAYLOAD = {"memcpy", "__memcpy", "crc32_body", "crc32_le_base", "rxe_crc32.isra.0", "rxe_mr_copy",
           "copy_data"}
TCG_PREFIXES = ("helper_lookup_tb_ptr", "qht_lookup", "tlb_", "tb_", "get_page_addr_code",
                "curr_cflags", "cpu_get_tb_cpu_state", "tcg_", "cpu_exec", "probe_access",
                "qemu_ram_block_from_host")


def main():
    if len(sys.argv) not in (5, 6):
        sys.exit(__doc__)
    ks = sorted((int(a, 16), n) for a, n in (l.split()[:2] for l in open(sys.argv[1]) if l.strip()))
    addrs = [a for a, _ in ks]
    text = open(sys.argv[2]).read()
    m = re.search(r"Event count \(approx\.\): (\d+)", text)
    if not m:
        sys.exit("no event count in the report")
    cpu_s = int(m.group(1)) / 1e9
    mb = float(sys.argv[3]) * float(sys.argv[4])
    # us per I/O = ms per MB * MB per I/O * 1000
    per_io = float(sys.argv[3]) / float(sys.argv[5]) * 1000 if len(sys.argv) == 6 else None
    col = lambda v: f"{v:.2f} | {v * per_io:.1f}" if per_io else f"{v:.2f}"
    unit = " | host CPU us per I/O" if per_io else ""
    sep = "|---" if per_io else ""
    cats, syms = collections.Counter(), collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+\[(.)\]\s+(.*)", line)
        if not m:
            continue
        ms_per_mb = float(m.group(1)) / 100 * cpu_s * 1000 / mb
        sym = m.group(3).strip()
        g = re.match(r"guest-0x([0-9a-f]+)", sym)
        if g:
            a = int(g.group(1), 16)
            if a < 0xFFFF800000000000:
                cat, name = "guest user code", "(user)"
            else:
                i = bisect.bisect_right(addrs, a) - 1
                name = ks[i][1] if i >= 0 else "?"
                cat = "guest kernel: payload (rxe copies, CRCs)" if name in PAYLOAD else "guest kernel: other"
                name = "guest " + name
        elif sym.startswith(TCG_PREFIXES):
            cat, name = "QEMU: TB lookup, softmmu TLB, translation", sym
        elif sym.startswith("0x") or sym.startswith(("helper_", "g_", "aio_", "qemu_", "object_",
                                                     "memory_", "address_space", "flatview", "nvme_")):
            cat, name = "QEMU: other (helpers, devices, main loop)", sym
        else:
            cat, name = "host kernel for QEMU's threads", sym
        cats[cat] += ms_per_mb
        syms[name] += ms_per_mb
    print(f"host CPU {cpu_s:.1f} s for ~{mb:.0f} MB: {cpu_s * 1000 / mb:.1f} ms per MB (all QEMU threads)")
    print()
    print(f"| category | host CPU ms per MB{unit} |")
    print(f"|---|---{sep}|")
    for c, v in cats.most_common():
        print(f"| {c} | {col(v)} |")
    print(f"| (symbols perf did not list) | {col(cpu_s * 1000 / mb - sum(cats.values()))} |")
    print()
    print(f"| top symbols | host CPU ms per MB{unit} |")
    print(f"|---|---{sep}|")
    for s, v in syms.most_common(int(__import__("os").environ.get("TOP", "15"))):
        print(f"| {s} | {col(v)} |")


if __name__ == "__main__":
    main()
