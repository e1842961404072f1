"""Checks SASS for writes to registers an in-flight wgmma (HGMMA) still reads.

wgmma.mma_async reads its register A fragments asynchronously, until the
wgmma.wait_group that retires its group; PTX makes writing them earlier
undefined. ptxas treats the HGMMA as the last use of those values and may give
their registers to newer values (it did in the Marlin kernel: the next block's
dequantization overwrote the fragments of the group still running). This
script walks a kernel's SASS (``cuobjdump -sass``), finds every loop (a
backward branch), runs its body twice in order, tracking the wgmma groups in
flight (``HGMMA ... gsb0`` closes a group, ``WARPGROUP.DEPBAR.LE gsb0, N``
leaves at most N), and reports any instruction whose destination register is
an A operand of a group in flight. Straight-line code outside loops is walked
once. Only the A operands are checked: the accumulators are the HGMMA's own
destination registers, kept in place from one wgmma to the next, and the
Marlin kernel fences them after its final wait_group 0.

    cuobjdump -sass marlin_selftest | python3 tools/check_wgmma_registers.py [--function REGEX]

Exit status 1 when a hazard is found, 2 when no HGMMA was found.
"""
import argparse
import re
import sys

INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
FUNC = re.compile(r"Function : (\S+)")
ARCH = re.compile(r"code for (sm_\w+)")
REG = re.compile(r"^R(\d+)$")


def parse_functions(text):
    """{"arch:mangled name": [(address, instruction text)]} from cuobjdump -sass output
    (a fat binary holds each kernel once per architecture)."""
    funcs, cur, arch = {}, None, "?"
    for line in text.splitlines():
        m = ARCH.search(line)
        if m:
            arch, cur = m.group(1), None
            continue
        m = FUNC.search(line)
        if m:
            cur = funcs.setdefault(f"{arch}:{m.group(1)}", [])
            continue
        m = INSTR.search(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2)))
    return funcs


def opcode_and_operands(ins):
    ins = re.sub(r"^@!?U?P\w+\s+", "", ins)  # predicate guard
    parts = ins.split(None, 1)
    ops = [o.strip() for o in parts[1].split(",")] if len(parts) > 1 else []
    return parts[0], ops


def dest_registers(opcode, ops):
    """Registers an instruction writes (its first operand, widened by the opcode's width)."""
    base = opcode.split(".")[0]
    if base in ("HGMMA", "STS", "STG", "ST", "RED", "BAR", "BRA", "WARPGROUP", "SYNCS", "UBLKCP",
                "UTMALDG", "LDGSTS", "EXIT", "NOP", "DEPBAR", "MEMBAR", "FENCE", "WARPSYNC", "BSSY",
                "BSYNC", "CALL", "RET", "YIELD", "ERRBAR", "CCTL") or not ops:
        return set()
    m = REG.match(ops[0].split(".")[0])
    if not m:
        return set()
    width = 1
    if ".128" in opcode:
        width = 4
    elif ".64" in opcode or "WIDE" in opcode or opcode.startswith(("CS2R", "DADD", "DMUL", "DFMA")):
        width = 2
    r = int(m.group(1))
    return set(range(r, r + width))


def hgmma_a_registers(ops):
    """The A fragment registers of an HGMMA with A from registers (4 of them), else none."""
    m = REG.match(ops[1]) if len(ops) > 1 else None
    return set(range(int(m.group(1)), int(m.group(1)) + 4)) if m else set()


def check(instrs):
    """Hazards as (address, instruction, register) over every loop body and the whole function."""
    hazards = []
    bodies = [instrs]
    index_of = {addr: i for i, (addr, _) in enumerate(instrs)}
    for i, (addr, ins) in enumerate(instrs):  # loops: backward branches
        m = re.search(r"BRA\s+(?:`\()?0x([0-9a-f]+)", ins)
        if m:
            target = int(m.group(1), 16) & 0xFFFFF
            for a, j in index_of.items():
                if a & 0xFFFFF == target and j < i:
                    bodies.append(instrs[j:i + 1] * 2)
    for body in bodies:
        pending, open_group = [], set()
        for addr, ins in body:
            opcode, ops = opcode_and_operands(ins)
            if opcode.startswith("HGMMA"):
                open_group |= hgmma_a_registers(ops)
                if any(o.startswith("gsb0") for o in ops):
                    pending.append(open_group)
                    open_group = set()
                continue
            m = re.match(r"WARPGROUP\.DEPBAR\.LE", opcode)
            if m:
                keep = int(ops[-1], 16) if ops else 0
                while len(pending) > keep:
                    pending.pop(0)
                continue
            busy = set().union(open_group, *pending)
            for r in dest_registers(opcode, ops) & busy:
                hazards.append((addr, ins, r))
    return sorted(set(hazards))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--function", default=".", help="regex on the mangled kernel name")
    args = ap.parse_args()
    funcs = parse_functions(sys.stdin.read())
    checked, bad = 0, 0
    for name, instrs in funcs.items():
        if not re.search(args.function, name) or not any(i.startswith("HGMMA") for _, i in instrs):
            continue
        checked += 1
        hazards = check(instrs)
        print(f"{name}: {len(instrs)} instructions, {'OK' if not hazards else f'{len(hazards)} hazards'}")
        for addr, ins, r in hazards[:20]:
            print(f"  /*{addr:04x}*/ {ins}   writes R{r}, read by an HGMMA in flight")
        bad += bool(hazards)
    if not checked:
        print("no kernel with HGMMA found")
        return 2
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
