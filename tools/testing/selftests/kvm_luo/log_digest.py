#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
#
# log_digest.py LOG: a failed test's serial log in at most 12 lines, for a
# reader who has only the runner's output (CI keeps no logs): what init and
# the test said last, the first kernel trouble, and, when a hung machine was
# asked (or the kernel oopsed), one line per distinct backtrace with its
# innermost telling frames first, and the first locks held.

import re
import sys

WIDTH, FRAMES = 150, 6
# Lines each part may take: 12 in all.
BUDGET = {"init": 1, "test": 3, "kernel": 1, "trace": 5, "lock": 2}

TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\]\s?")
FRAME = re.compile(r"^\s*(\? )?([A-Za-z_][\w.]*)\+0x[0-9a-f]+/0x[0-9a-f]+")
RIP = re.compile(r"^RIP: [0-9a-f]+:([A-Za-z_][\w.]*)\+")
WHO_TASK = re.compile(r"^task:(\S+)\s+state:(\S+)")
WHO_CPU = re.compile(r"^CPU: (\d+) .*?PID: (\d+) Comm: (\S+)")
HELD = re.compile(r"^\s*#\d+: [0-9a-f]+ (\(.*)")
# What run_vmtests.sh's kernel_trouble() calls trouble.
TROUBLE = re.compile(r"Kernel panic|BUG:|Oops|WARNING:|general protection|"
                     r"UBSAN:|new suspected memory leaks|"
                     r"INFO: task .* blocked|detected stalls|soft lockup")
# Frames that say how a task waits or how a report is printed, not where.
DULL = re.compile(
    r"^(__?schedule\w*|schedule\w*|preempt_schedule\w*|"
    r"(__)?mutex_lock\w*|rwsem_down\w*|down_(read|write)\w*|rt_mutex\w*|"
    r"__wait_for_common|wait_for_common\w*|io_schedule\w*|do_nanosleep|"
    r"hrtimer_nanosleep|asm_\w+|entry_SYSCALL\w*|do_syscall_64|"
    r"x64_sys_call|__x64_sys_\w+|__do_sys_\w+|ret_from_fork\w*|kthread|"
    r"worker_thread|process_one_work|nmi_\w+|\w*nmi_backtrace\w*|"
    r"default_do_nmi|exc_nmi|unknown_nmi_error|v?panic\w*|sys_info\w*|"
    r"dump_stack\w*|show_stack|sched_show_task|show_state_filter|"
    r"do_\w*fault\w*|handle_mm_fault|exc_page_fault|lock_\w+|_raw_\w+|"
    r"__pv_queued\w*|debug_show_all_locks|arch_trigger\w*|trigger_\w+|"
    r"handle_bug|exc_invalid_op|__warn\w*|warn_slowpath\w*|report_bug|"
    r"kasan_\w+|__kasan_\w+|print_report|print_address_description\w*|"
    r"__asan_\w+|check_memory_region|__lock_acquire\w*|check_noncircular|"
    r"print_circular_bug\w*|validate_chain|check_prev_add|"
    r"ubsan_\w+|__ubsan_\w+)$")


def rust_name(name):
    """A Rust v0 symbol (_R...) as crate::function, or path::function of a
    generic function's instance (its type arguments left out)."""
    if not name.startswith("_R"):
        return name
    generic = name.startswith("_RI")
    body, idents, i = name[2:], [], 0
    while i < len(body):
        c = body[i]
        if generic and idents and c == "I":
            break
        if c in "Bs":
            # A back reference or a disambiguator: a base-62 number, _.
            end = body.find("_", i)
            if end < 0:
                break
            i = end + 1
        elif c.isdigit():
            # An identifier: its length, a _ if it starts with _ or a digit.
            m = re.match(r"(\d+)_?", body[i:])
            start = i + m.end()
            idents.append(body[start:start + int(m.group(1))])
            i = start + int(m.group(1))
        else:
            i += 1
    idents = [w for w in idents if w]
    if not idents:
        return name
    if generic:
        return "::".join(idents[-2:])
    return f"{idents[0]}::{idents[-1]}"


def printable(line):
    line = "".join(c if " " <= c <= "~" else "?" for c in line)
    return line if len(line) <= WIDTH else line[:WIDTH - 3] + "..."


def traces_of(lines):
    """(who, frames) per backtrace, each introduced by a task or CPU line and
    ended by the next one. Inside <NMI> only the interrupted RIP counts: the
    rest is the NMI's own handling. A RIP in user space (CS 0033) says so."""
    traces, cur, in_nmi = [], None, False
    for line in lines:
        if line.startswith("NMI backtrace for cpu") and "skipped" in line:
            traces.append((line, []))
            continue
        task, cpu = WHO_TASK.match(line), WHO_CPU.match(line)
        if task or cpu:
            who = f"{task.group(1)} ({task.group(2)})" if task else \
                f"cpu {cpu.group(1)}, {cpu.group(3)}[{cpu.group(2)}]"
            cur, in_nmi = (who, []), False
            traces.append(cur)
            continue
        if cur is None:
            continue
        stripped = line.strip()
        if stripped in ("<NMI>", "</NMI>"):
            in_nmi = stripped == "<NMI>"
            continue
        rip, frame = RIP.match(line), FRAME.match(line)
        if line.startswith("RIP: 0033:"):
            name = "(user space)"
        elif rip:
            name = rip.group(1)
        elif frame and not frame.group(1) and not in_nmi:
            name = frame.group(2)
        else:
            continue
        if not DULL.match(name):
            name = rust_name(name)
            if name not in cur[1]:
                cur[1].append(name)
    return traces


def digest(lines):
    parts = {k: [] for k in BUDGET}
    said = [ln for ln in lines if ln.startswith("KLU: ") and "kmemleak" not in ln]
    parts["init"] = ["init: " + ln[5:] for ln in said[-1:]]
    words = [ln for ln in lines
             if ln.startswith(("# ", "not ok ", "Bail out"))]
    parts["test"] = ["test: " + ln for ln in words[-BUDGET["test"]:]]
    trouble = next((ln for ln in lines if TROUBLE.search(ln)), None)
    if trouble:
        parts["kernel"] = ["kernel: " + trouble]
    # One line per distinct stack, with how many showed it.
    count, order = {}, []
    for who, frames in traces_of(lines):
        line = f"{who}: {' < '.join(frames[:FRAMES])}" if frames else who
        key = " < ".join(frames[:FRAMES]) if frames else who
        if key not in count:
            count[key] = [line, 0]
            order.append(key)
        count[key][1] += 1
    parts["trace"] = [line + (f" (x{n})" if n > 1 else "")
                      for line, n in (count[k] for k in order)]
    held = []
    for ln in lines:
        m = HELD.match(ln)
        if m and m.group(1) not in held:
            held.append(m.group(1))
    parts["lock"] = ["lock: " + h for h in held]
    out = []
    for part, limit in BUDGET.items():
        out += [printable(ln) for ln in parts[part][:limit]]
    return out


def main():
    try:
        with open(sys.argv[1], errors="replace") as f:
            text = f.read()
        lines = [TIMESTAMP.sub("", ln) for ln in text.replace("\r", "").split("\n")]
        for line in digest(lines):
            print("#   " + line)
    except Exception as e:  # a digest must never hide the runner's summary
        print(f"#   (no digest: {type(e).__name__}: {e})")


main()
