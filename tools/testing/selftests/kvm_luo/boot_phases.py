#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Split each kexec of a test's serial log into phases, on the TSC.

The log must come from kernels booted with printk.time=1 (each kernel line
carries its own timestamp), and from a VMM that writes the TSC into the kernel
log ("kvm-luo-vmm: tsc T EVENT", tools/kvm_luo_vmm): that line's timestamp
places the kernel's clock on the TSC, which does not stop across a kexec in
QEMU. The kernel's timestamps run at the TSC rate it calibrated ("tsc:
Refined ..." or "tsc: Detected ...").

For every kexec from kernel K to kernel K+1 it prints one JSON object per
line ("PHASES: {...}"), each phase in ms, in order:

  exit_to_load    the VMM's exit to init's kexec into the next stage (init
                  loads the next kernel and its image)
  reboot          init's kexec to "Starting new kernel": device shutdown,
                  LUO's freeze and KHO's finalization
  jump            "Starting new kernel" to the new kernel's clock starting:
                  purgatory, decompression, and the start of setup_arch() if
                  the clock starts there (tsc_early_khz=, which init passes
                  with klu.early_tsc=1; without it the clock starts only at
                  tsc_init() and the phases up to "mem_init" are all in jump)
  setup_arch      to "Zone ranges:" (memblock, KHO's handover data and
                  scratch, NUMA, the direct map, KHO's radix tree)
  memmap          to "Kernel command line:" (the zones, sparse and the
                  memory map: free_area_init(), memmap_init())
  early_params    to "mem auto-init:" (parameters, early caches, traps)
  kho_and_free    to "SLUB:" (KHO's reservation of preserved memory, and
                  memblock_free_all() giving the rest to the page allocator)
  mem_init        to "Memory:" (the rest of early boot: slab, scheduler,
                  timers, SMP, page_alloc_init_late())
  initcalls       to "Freeing unused kernel image": initcalls (LUO, KHO's
                  late init, the built-in handlers)
  init_modules    to "KLU: loaded" (init loads KVM's modules, which register
                  the KVM handlers; null when KVM is built in)
  init_to_vmm     to the VMM's start in the new kernel

and "total" from the VMM's exit to its start. The kernel's timestamps are
placed on the TSC from the VMM's mark nearest to each, at the rate the kernel
calibrated; the offset the scheduler clock takes when it is marked stable
(tens of ms under TCG) is not corrected for, in the phases up to "mem_init". A phase whose lines are missing
is null. Usage: boot_phases.py LOG...

With --bench SIZE=LOG... (build/bench.sh), the logs are those of a VMM that
alternates live updates (odd kexecs) and bare kexecs (even ones) of the same
kernel and image (kvm-luo-vmm --updates N): it prints the medians of the
blackouts and of the bare kexecs with their spread, the median of each
update's blackout less the bare kexec after it, the phases of each kind of
kexec side by side, and one "BENCH-RATIOS:" line.
"""
import json
import re
import sys

TS = re.compile(r'^\[\s*(\d+\.\d+)\] (.*)$')
# What a terminal reset at a boot leaves before the first line.
ESCAPES = re.compile(r'^(\x1b[^A-Za-z]*[A-Za-z])+')
MARK = re.compile(r'^kvm-luo-vmm: tsc (\d+) (\w+)')
# The TSC's rate: refined late in the boot, or detected early ("MHz TSC" when
# it differs from the CPU's, else "MHz processor").
RATES = [re.compile(r'^tsc: Refined TSC clocksource calibration: (\d+\.\d+) MHz'),
         re.compile(r'^tsc: Detected (\d+\.\d+) MHz TSC'),
         re.compile(r'^tsc: Detected (\d+\.\d+) MHz processor')]

# The new kernel's lines that end each of its phases, in order.
NEW_KERNEL = [
    ('setup_arch', 'Zone ranges:'),
    ('memmap', 'Kernel command line:'),
    ('early_params', 'mem auto-init:'),
    ('kho_and_free', 'SLUB:'),
    ('mem_init', 'Memory:'),
    ('initcalls', 'Freeing unused kernel image'),
    ('init_modules', 'KLU: loaded'),
]
ORDER = (['exit_to_load', 'reboot', 'jump'] + [p for p, _ in NEW_KERNEL] +
         ['init_to_vmm', 'total'])


class Kernel:
    """One kernel's lines: (seconds, text)."""

    def __init__(self):
        self.lines = []
        self.mhz = None
        self.rank = len(RATES)
        self.marks = []     # (seconds, tsc, event)

    def add(self, secs, text):
        self.lines.append((secs, text))
        for rank, rate in enumerate(RATES):
            m = rate.match(text)
            if m and rank <= self.rank:
                self.mhz, self.rank = float(m.group(1)), rank
        m = MARK.match(text)
        if m:
            self.marks.append((secs, int(m.group(1)), m.group(2)))

    def first(self, prefix, after=0.0):
        for secs, text in self.lines:
            if secs >= after and text.startswith(prefix):
                return secs
        return None

    def last(self, prefix):
        found = None
        for secs, text in self.lines:
            if text.startswith(prefix):
                found = secs
        return found

    def tsc(self, secs):
        """The TSC at this kernel's timestamp SECS, from its nearest mark."""
        if secs is None or not self.marks or not self.mhz:
            return None
        msecs, mtsc, _ = min(self.marks, key=lambda m: abs(m[0] - secs))
        return mtsc + (secs - msecs) * self.mhz * 1e6


def kernels(path):
    ks = []
    with open(path, errors='replace') as f:
        for raw in f:
            m = TS.match(ESCAPES.sub('', raw.rstrip('\r\n')))
            if not m:
                continue
            secs, text = float(m.group(1)), m.group(2)
            if text.startswith('Linux version ') or not ks:
                ks.append(Kernel())
            ks[-1].add(secs, text)
    return ks


def phases(old, new):
    """The phases of the kexec from OLD to NEW, in ms (None if unknown)."""
    mhz = new.mhz or old.mhz
    exits = [m for m in old.marks if m[2] == 'exit']
    starts = [m for m in new.marks if m[2] == 'start']
    if not mhz or not exits or not starts:
        return None

    def ms(a, b):
        return None if a is None or b is None else round((b - a) / mhz / 1e3, 1)

    exit_tsc = exits[-1][1]
    load = old.tsc(old.first('KLU: kexec into stage', exits[-1][0]))
    going = old.tsc(old.last('kexec_core: Starting new kernel'))
    start_tsc = starts[0][1]
    p = {'exit_to_load': ms(exit_tsc, load), 'reboot': ms(load, going),
         'total': ms(exit_tsc, start_tsc)}
    # Each phase from the last line found before it: a missing line leaves
    # its phase null and the next one longer.
    prev = new.tsc(0.0)
    p['jump'] = ms(going, prev)
    for name, prefix in NEW_KERNEL:
        end = new.tsc(new.first(prefix))
        p[name] = ms(prev, end)
        prev = end if end is not None else prev
    p['init_to_vmm'] = ms(prev, start_tsc)
    return {k: p[k] for k in ORDER}


# "vmm: blackout B ms / bare kexec K ms = R", one per update (kvm-luo-vmm).
PAIR = re.compile(r'vmm: blackout (\d+) ms / bare kexec (\d+) ms = ([\d.]+)')
# The blackout's steps, as the VMM reports them after each update.
STEP = re.compile(r'vmm:   (\S.*\S)\s+(-?[\d.]+) ms$')
# The VMM's own steps in the blackout (kvm-luo-vmm --steps): the stop's and the restore's,
# both said by the new kernel's VMM once the guest runs, the stop's first.
VMM_STEPS = re.compile(r"vmm: \[kernel \d+\] the (stop|restore)'s steps \(ms\): (.*)$")
ENTERS = re.compile(r'vCPU \d+ enters$')


def vmm_steps(kind, said):
    """The steps of one "steps" line in the blackout, as (name, ms): the restore's up to the
    first vCPU's entry into the guest, which ends the blackout."""
    steps = []
    for item in said.split('; '):
        name, _, said_ms = item.rpartition(' ')
        try:
            took = float(said_ms)
        except ValueError:
            continue
        if kind == 'restore' and ENTERS.match(name):
            steps.append(('a vCPU enters', took))
            break
        steps.append((name, took))
    return [(f'{kind}: {name}', took) for name, took in steps]


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def spread(xs):
    xs = [x for x in xs if x is not None]
    return f'{min(xs):.0f} to {max(xs):.0f}' if xs else '-'


def fmt(x, digits=1):
    return '-' if x is None else f'{x:.{digits}f}'


def bench(args):
    runs = {}
    for arg in args:
        size, _, path = arg.partition('=')
        pairs, steps, own, totals, stop = [], {}, {}, [], None
        with open(path, errors='replace') as f:
            for line in f:
                line = line.rstrip('\r\n')
                m = PAIR.search(line)
                if m:
                    pairs.append(tuple(float(g) for g in m.groups()))
                m = STEP.search(line)
                if m:
                    steps.setdefault(m.group(1), []).append(float(m.group(2)))
                m = VMM_STEPS.search(line)
                if m:
                    said = vmm_steps(m.group(1), m.group(2))
                    for name, took in said:
                        own.setdefault(name, []).append(took)
                    # Each update's own total: its stop's steps and its restore's.
                    total = sum(took for _, took in said)
                    if m.group(1) == 'stop':
                        stop = total
                    elif stop is not None:
                        totals.append(stop + total)
                        stop = None
        ks = kernels(path)
        kexecs = [phases(a, b) for a, b in zip(ks, ks[1:])]
        runs[size] = {
            'pairs': pairs, 'steps': steps, 'own': own, 'totals': totals,
            'update': [p for p in kexecs[0::2] if p],
            'bare': [p for p in kexecs[1::2] if p],
        }

    print(f'{"guest":>6} {"runs":>4}  {"blackout ms":>22}  {"bare kexec ms":>22}  '
          f'{"blackout / bare":>17}  {"blackout - bare ms":>24}')
    ratios = {}
    for size, r in runs.items():
        b, k, q = (list(x) for x in zip(*r['pairs'])) if r['pairs'] else ([], [], [])
        # Each update against the bare kexec after it, in ms.
        d = [x - y for x, y in zip(b, k)]
        print(f'{size:>6} {len(q):>4}  {fmt(median(b), 0):>7} ({spread(b):>12})  '
              f'{fmt(median(k), 0):>7} ({spread(k):>12})  '
              f'{fmt(median(q), 2):>5} ({min(q, default=0):.2f}-{max(q, default=0):.2f})  '
              f'{fmt(median(d), 0):>7} ({spread(d):>14})')
        ratios[f'blackout_vs_bare_kexec_{size}'] = median(q)
    sizes = list(runs)
    print('the blackout\'s steps, median ms (the VMM\'s TSC):')
    print(f'  {"":<32}' + ''.join(f'{s:>10}' for s in sizes))
    for step in runs[sizes[0]]['steps']:
        print(f'  {step:<32}' + ''.join(
            f'{fmt(median(runs[s]["steps"].get(step, []))):>10}' for s in sizes))
    names = []
    for s in sizes:
        names += [n for n in runs[s]['own'] if n not in names]
    if names:
        print('the VMM\'s own steps in the blackout, median ms (kvm-luo-vmm --steps):')
        for name in names:
            print(f'  {name:<44}' + ''.join(
                f'{fmt(median(runs[s]["own"].get(name, []))):>10}' for s in sizes))
        # Not the sum of the medians above: steps of one update may be missing, or overlap.
        label = "in all (median of each update's sum)"
        print(f'  {label:<44}' + ''.join(
            f'{fmt(median(runs[s]["totals"])):>10}' for s in sizes))
    print('each kexec in phases, median ms (kernel timestamps on the TSC; '
          'boot_phases.py says what each is):')
    cols = [(s, 'update') for s in sizes] + [(s, 'bare') for s in sizes]
    print(f'  {"":<14}' + ''.join(f'{s + " " + kind:>14}' for s, kind in cols))
    for name in ORDER:
        print(f'  {name:<14}' + ''.join(
            f'{fmt(median([p[name] for p in runs[s][kind]])):>14}'
            for s, kind in cols))
    if len(sizes) > 1:
        first = median([p[0] for p in runs[sizes[0]]['pairs']])
        last = median([p[0] for p in runs[sizes[-1]]['pairs']])
        if first and last:
            ratios[f'blackout_{sizes[-1]}_vs_{sizes[0]}'] = last / first
    print('BENCH-RATIOS: ' + ' '.join(
        f'{k}={fmt(v, 3) if v is not None else "none"}' for k, v in ratios.items()))
    ok = all(v is not None for v in ratios.values()) and all(
        r['pairs'] for r in runs.values())
    return 0 if ok else 1


def main(paths):
    if paths[:1] == ['--bench']:
        return bench(paths[1:])
    for path in paths:
        ks = kernels(path)
        for i, (old, new) in enumerate(zip(ks, ks[1:])):
            p = phases(old, new)
            if p:
                print('PHASES: ' + json.dumps({'log': path, 'kexec': i + 1,
                                              **p}))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
