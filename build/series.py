#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
#
# Export the work as a git format-patch series against the base, in the shape
# patches/export.plan gives it, and check it. Run through build/series.sh,
# which assembles the tree first and passes the paths in the environment.
#
#   series.py export   write the series to $KLU_TOP/series/
#   series.py check    export, then run checkpatch.pl --strict on every patch
#                      and build every prefix of the series (rust/ and the
#                      directories of the C files each patch touches)

import os
import re
import shutil
import subprocess
import sys
import time

TOP = os.environ["KLU_TOP"]
CACHE = os.environ["KLU_CACHE"]
BASE = os.environ["KLU_BASE"]
SRC = os.environ["KLU_SRC"]
DIRS = os.environ["KLU_DIRS"].split()
PATCHES = os.path.join(TOP, "patches")
PLAN = os.path.join(PATCHES, "export.plan")
COVER = os.path.join(PATCHES, "cover-letter")
REPO = os.path.join(CACHE, "series-git")
OUT = os.path.join(TOP, "series")


class Bad(Exception):
    pass


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, **kw)


def out(cmd, **kw):
    return run(cmd, stdout=subprocess.PIPE, **kw).stdout


class Entry:
    def __init__(self, group, patches, line):
        self.group = group
        self.patches = patches
        self.line = line
        self.adds = []
        self.files = []
        self.subject = None
        self.body = []
        self.trailers = []


def parse_plan():
    groups, entries, group = [], [], None
    with open(PLAN) as f:
        for n, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if line.startswith("## "):
                group = line[3:].strip()
                groups.append(group)
                continue
            if not line.strip() or line.startswith("#"):
                continue
            word, _, rest = line.strip().partition(" ")
            if not line.startswith(" "):
                if word == "patch" and rest.split():
                    entries.append(Entry(group, rest.split(), n))
                elif word == "new" and not rest:
                    entries.append(Entry(group, [], n))
                else:
                    raise Bad(f"{PLAN}:{n}: expected 'patch NNNN...' or 'new'")
                if group is None:
                    raise Bad(f"{PLAN}:{n}: a patch before the first '## group'")
                continue
            if not entries:
                raise Bad(f"{PLAN}:{n}: '{word}' outside a patch")
            e = entries[-1]
            if word == "add" and rest.split():
                e.adds += rest.split()
            elif word == "subject" and rest:
                e.subject = rest
            elif word == "body":
                e.body.append(rest)
            elif word == "trailer" and rest:
                e.trailers.append(rest)
            else:
                raise Bad(f"{PLAN}:{n}: unknown line '{line.strip()}'")
    for e in entries:
        if not e.patches and (e.subject is None or not e.body):
            raise Bad(f"{PLAN}:{e.line}: a 'new' patch needs a subject and a body")
    return groups, entries


def series_patches():
    with open(os.path.join(PATCHES, "series")) as f:
        return [l.strip() for l in f if l.strip() and not l.startswith("#")]


def project_files():
    files = out(["git", "-C", TOP, "ls-files", "--cached", "--others",
                 "--exclude-standard", "--"] + DIRS).split("\n")
    return sorted(f for f in files if f and os.path.isfile(os.path.join(TOP, f)))


def patch_targets(path):
    t = set()
    with open(path, errors="replace") as f:
        for line in f:
            m = re.match(r"^(?:\+\+\+ b|--- a)/(\S+)", line)
            if m:
                t.add(m.group(1))
    return t


def resolve(entries, patches, files):
    """Give every source patch and project file to exactly one entry."""
    byname = {}
    for p in patches:
        byname.setdefault(p[:4], []).append(p)
    used = {}
    for e in entries:
        names = []
        for num in e.patches:
            if num not in byname:
                raise Bad(f"{PLAN}:{e.line}: no patch {num} in patches/series")
            if len(byname[num]) != 1:
                raise Bad(f"{PLAN}:{e.line}: several patches numbered {num}")
            if num in used:
                raise Bad(f"{PLAN}:{e.line}: patch {num} already exported at line {used[num]}")
            used[num] = e.line
            names.append(byname[num][0])
        e.patches = names
    missing = [p for p in patches if p[:4] not in used]
    if missing:
        raise Bad(f"{PLAN}: patches not exported: {' '.join(missing)}")

    owner, dirs = {}, []
    for e in entries:
        for a in e.adds:
            if a.endswith("/"):
                dirs.append((a, e))
            elif a not in files:
                raise Bad(f"{PLAN}:{e.line}: {a} is not a project file")
            elif a in owner:
                raise Bad(f"{PLAN}:{e.line}: {a} is added twice")
            else:
                owner[a] = e
    dirs.sort(key=lambda d: -len(d[0]))
    for f in files:
        if f in owner:
            continue
        for prefix, e in dirs:
            if f.startswith(prefix):
                owner[f] = e
                break
        else:
            raise Bad(f"{PLAN}: project file {f} is in no patch")
    for prefix, e in dirs:
        if not any(o is e and f.startswith(prefix) for f, o in owner.items()):
            raise Bad(f"{PLAN}:{e.line}: {prefix} adds no file")
    for f, e in owner.items():
        if os.path.exists(os.path.join(BASE, f)):
            raise Bad(f"{f} exists in the base: keep changes to it as a patch")
        e.files.append(f)


def source_message(path):
    """Subject and body of a format-patch file, without its sign-offs."""
    with open(path, errors="replace") as f:
        lines = f.read().split("\n")
    i = next(i for i, l in enumerate(lines) if l.startswith("Subject: "))
    subject = lines[i][len("Subject: "):]
    i += 1
    while lines[i].startswith(" "):
        subject += lines[i]
        i += 1
    subject = re.sub(r"^\[PATCH[^\]]*\] ", "", subject)
    end = lines.index("---", i)
    body = [l for l in lines[i:end] if not l.startswith("Signed-off-by: ")]
    while body and not body[0].strip():
        body.pop(0)
    while body and not body[-1].strip():
        body.pop()
    return subject, body


def git(*args, **kw):
    return out(["git", "-c", "core.autocrlf=false", "-c", "core.hooksPath=/dev/null",
                "-C", REPO] + list(args), **kw)


def export():
    groups, entries = parse_plan()
    patches = series_patches()
    files = project_files()
    resolve(entries, patches, files)
    for key, env in (("user.name", "GIT_COMMITTER_NAME"), ("user.email", "GIT_COMMITTER_EMAIL")):
        if env not in os.environ and subprocess.run(["git", "config", key],
                                                    stdout=subprocess.DEVNULL).returncode:
            raise Bad(f"git config {key} is not set: the series is signed off with it")

    # A repository holding the base version of every file the series
    # changes: the patches need nothing else.
    shutil.rmtree(REPO, ignore_errors=True)
    os.makedirs(REPO)
    git("-c", "init.templateDir=", "init", "-q")
    touched = set()
    for p in patches:
        touched |= patch_targets(os.path.join(PATCHES, p))
    for f in sorted(touched):
        if os.path.isfile(os.path.join(BASE, f)):
            os.makedirs(os.path.dirname(os.path.join(REPO, f)), exist_ok=True)
            shutil.copy2(os.path.join(BASE, f), os.path.join(REPO, f))
    git("add", "-A")
    git("commit", "-q", "-m", "base")
    base = git("rev-parse", "HEAD").strip()

    for e in entries:
        for p in e.patches:
            with open(os.path.join(PATCHES, p)) as f:
                r = subprocess.run(["patch", "-p1", "-s", "-f", "-F0", "--no-backup-if-mismatch",
                                    "-d", REPO], stdin=f, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if r.returncode:
                raise Bad(f"{PLAN}:{e.line}: {p} does not apply in this order:\n{r.stdout}")
        for f in e.files:
            dst = os.path.join(REPO, f)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.join(TOP, f), dst)
        if e.patches:
            subject, body = source_message(os.path.join(PATCHES, e.patches[0]))
        else:
            subject, body = None, []
        if e.subject:
            subject = e.subject
        if e.body:
            body = e.body
        msg = subject + "\n\n" + "\n".join(body).rstrip() + "\n"
        if e.trailers:
            msg += "\n" + "\n".join(e.trailers) + "\n"
        git("add", "-A")
        git("commit", "-q", "-s", "-F", "-", input=msg)

    # The series applied to the base must be the tree make check builds.
    mine = set(git("ls-files").split("\n")) - {""}
    with open(os.path.join(CACHE, "assembled.list")) as f:
        assembled = {l.strip() for l in f if l.strip()}
    differ = sorted(f for f in mine
                    if f not in assembled and not filecmp_same(os.path.join(REPO, f),
                                                               os.path.join(BASE, f)))
    differ += sorted(f for f in assembled if f not in mine)
    differ += sorted(f for f in mine & assembled
                     if not filecmp_same(os.path.join(REPO, f), os.path.join(SRC, f))
                     or os.access(os.path.join(REPO, f), os.X_OK)
                     != os.access(os.path.join(SRC, f), os.X_OK))
    if differ:
        raise Bad("the series applied to the base is not the assembled tree: " +
                  " ".join(differ[:20]))

    shutil.rmtree(OUT, ignore_errors=True)
    git("format-patch", "-q", "--cover-letter", "-o", OUT, f"{base}..HEAD")
    names = sorted(os.listdir(OUT))
    cover_letter(os.path.join(OUT, names[0]), groups, entries)

    # What is sent is the files: applied with git am, they give the same tree.
    head = git("rev-parse", "HEAD").strip()
    git("checkout", "-q", "--detach", base)
    if len(names) < 2:
        raise Bad(f"git format-patch wrote no patch to {OUT}")
    r = subprocess.run(["git", "-C", REPO, "-c", "core.hooksPath=/dev/null",
                        "-c", "core.autocrlf=false", "am", "-q", "--no-3way", "--no-keep-cr"]
                       + [os.path.join(OUT, n) for n in names[1:]],
                       text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    same = not r.returncode and \
        git("rev-parse", "HEAD^{tree}") == git("rev-parse", f"{head}^{{tree}}")
    if r.returncode:
        subprocess.run(["git", "-C", REPO, "am", "--abort"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    git("checkout", "-q", "--detach", head)
    if not same:
        shutil.rmtree(OUT, ignore_errors=True)
        raise Bad(f"git am of the exported patches does not give the series' tree:\n{r.stdout}")
    print(f"series: {len(names) - 1} patches and a cover letter in {OUT}, "
          f"{len(files)} new files; applied to the base with git am they give the "
          "assembled tree")
    return entries


def filecmp_same(a, b):
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read() == fb.read()
    except FileNotFoundError:
        return False


def base_version():
    """The base's version, from its Makefile: 7.3.4, 7.4-rc1."""
    parts = {}
    with open(os.path.join(BASE, "Makefile")) as f:
        for line in f:
            m = re.match(r"(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION) =\s*(\S*)$",
                         line.strip())
            if m and m.group(1) not in parts:
                parts[m.group(1)] = m.group(2)
    if not all(parts.get(k) for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL")):
        raise Bad(f"{BASE}/Makefile: no VERSION, PATCHLEVEL and SUBLEVEL")
    # As the release is tagged (v7.4-rc1; make kernelversion says 7.4.0-rc1).
    version = f"{parts['VERSION']}.{parts['PATCHLEVEL']}"
    if parts["SUBLEVEL"] != "0":
        version += f".{parts['SUBLEVEL']}"
    return version + parts.get("EXTRAVERSION", "")


def cover_letter(path, groups, entries):
    with open(COVER) as f:
        text = f.read().rstrip("\n").split("\n")
    subject, blurb = text[0], text[1:]
    while blurb and not blurb[0].strip():
        blurb.pop(0)
    listing, n = [], 0
    for g in groups:
        members = [e for e in entries if e.group == g]
        first = n + 1
        n += len(members)
        listing.append(f"- {first:2}-{n:2}: {g}")
    blurb = "\n".join(blurb).replace("@GROUPS@", "\n".join(listing))
    blurb = blurb.replace("@BASE@", base_version())
    with open(path) as f:
        letter = f.read()
    if "*** SUBJECT HERE ***" not in letter or "*** BLURB HERE ***" not in letter:
        raise Bad(f"{path}: not git's cover letter template")
    letter = letter.replace("*** SUBJECT HERE ***", subject)
    letter = letter.replace("*** BLURB HERE ***", blurb)
    with open(path, "w") as f:
        f.write(letter)


# series-check -------------------------------------------------------------

TREE = os.path.join(CACHE, "series-tree")
OBJ = os.path.join(CACHE, "cfg", "series")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def reset_tree(paths):
    """The base tree in TREE, for every path this series or the last one
    checked there touches. A file put back gets a new mtime, so that what
    was built from its patched version is rebuilt."""
    touched = os.path.join(TREE, ".klu-touched")
    if not os.path.isfile(os.path.join(TREE, ".klu-copied")):
        log(f"copying the base tree to {TREE}")
        shutil.rmtree(TREE, ignore_errors=True)
        shutil.rmtree(OBJ, ignore_errors=True)
        run(["cp", "-a", BASE, TREE])
        open(os.path.join(TREE, ".klu-copied"), "w").close()
    paths = set(paths)
    if os.path.isfile(touched):
        with open(touched) as f:
            paths |= set(f.read().split())
    with open(touched, "w") as f:
        f.write("\n".join(sorted(paths)) + "\n")
    for f in sorted(paths):
        src, dst = os.path.join(BASE, f), os.path.join(TREE, f)
        if os.path.isfile(src):
            if not filecmp_same(src, dst):
                shutil.copyfile(src, dst)
                os.utime(dst)
        elif os.path.exists(dst):
            os.remove(dst)


# Where to look for the users of a header a patch changes, and how many of
# their directories to build at most (memblock.h has about 50).
INCLUDERS = ["kernel", "mm", "virt", "arch/x86", "lib", "drivers", "block", "fs", "net"]
MAX_INCLUDER_DIRS = 16


def dir_target(f):
    """The make target that compiles the C file f."""
    if f.startswith("virt/kvm/luo/"):
        return "virt/kvm/luo/"
    if f.startswith(("virt/kvm/", "arch/x86/kvm/")):
        return "arch/x86/kvm/"
    if f.endswith(".c") and not f.startswith(("tools/", "rust/", "samples/")):
        return os.path.dirname(f) + "/"
    return None


def targets_for(paths):
    """What to build after a patch that touches paths: rust/, the directories
    of its C files, and those of the C files that include a header it
    changes, unless there are too many."""
    t = {"rust/"}
    for f in paths:
        d = dir_target(f)
        if d:
            t.add(d)
        elif f.startswith("include/") and f.endswith(".h"):
            h = f[len("include/"):]
            r = subprocess.run(["grep", "-rlF", "--include=*.c", f"#include <{h}>"] + INCLUDERS,
                               cwd=TREE, text=True, stdout=subprocess.PIPE)
            dirs = {dir_target(u) for u in r.stdout.split()} - {None}
            if len(dirs) <= MAX_INCLUDER_DIRS:
                t |= dirs
    return sorted(t)


def expected_object(f):
    """The object a build that compiles the source file f writes, if any."""
    if f.startswith(("tools/", "samples/", "Documentation/", "scripts/")):
        return None
    if f.startswith("rust/helpers/") and f.endswith(".c"):
        return "rust/helpers/helpers.o"
    if f.startswith("rust/kernel/") and f.endswith(".rs"):
        return "rust/kernel.o"
    if f.startswith("virt/kvm/luo/guest_memfd/") and f.endswith(".rs"):
        return "virt/kvm/luo/guest_memfd/guest_memfd_luo.o"
    if f.endswith(".c"):
        # A C file another one of its directory includes (a KUnit test
        # included at the end of what it tests) is compiled in that one.
        d, name = os.path.split(f)
        r = subprocess.run(["grep", "-lF", f'#include "{name}"', "--include=*.c", "-r", d],
                           cwd=TREE, text=True, stdout=subprocess.PIPE)
        if r.stdout.split():
            f = r.stdout.split()[0]
    if f.endswith((".c", ".rs")):
        return f.rsplit(".", 1)[0] + ".o"
    return None


def check():
    export()
    names = sorted(n for n in os.listdir(OUT) if not n.startswith("0000-"))
    failed = 0
    results = []

    t0 = time.time()
    for n in names:
        r = subprocess.run([os.path.join(SRC, "scripts", "checkpatch.pl"), "--strict",
                            "--terse", "--no-summary", "--show-types",
                            "--ignore", "FILE_PATH_CHANGES,UNKNOWN_COMMIT_ID",
                            os.path.join(OUT, n)], cwd=SRC, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if r.returncode or r.stdout.strip():
            failed += 1
            results.append(f"FAIL checkpatch {n}")
            print(r.stdout.rstrip())
    log(f"checkpatch --strict: {len(names)} patches in {time.time() - t0:.0f} s")

    commits = git("rev-list", "--reverse", "HEAD").split()[1:]
    every = set()
    for c in commits:
        every |= set(git("diff-tree", "--no-commit-id", "--name-only", "-r", c).split())
    reset_tree(every)
    os.makedirs(OBJ, exist_ok=True)
    make = ["make", "-C", TREE, f"O={OBJ}", "LLVM=-19", "ARCH=x86_64", f"-j{os.cpu_count()}"]
    fragment = os.path.join(TOP, "kernel", "configs", "kvm_luo.config")
    for i, (c, n) in enumerate(zip(commits, names), 1):
        t = time.time()
        diff = git("diff", f"{c}~", c, "--binary")
        run(["patch", "-p1", "-s", "-f", "-F0", "--no-backup-if-mismatch", "-d", TREE], input=diff)
        paths = git("diff-tree", "--no-commit-id", "--name-only", "-r", c).split()
        if i == 1 or any(os.path.basename(p).startswith("Kconfig") for p in paths):
            # The tests' configuration, with lib/test_kho.c, which a patch
            # changes and no other configuration compiles, and KASAN, for
            # arch/x86/mm/kasan_init_64.c.
            with open(fragment) as f, open(os.path.join(OBJ, ".config"), "w") as cfg:
                cfg.write(f.read() + "CONFIG_TEST_KEXEC_HANDOVER=y\nCONFIG_KASAN=y\n")
            run(make + ["-s", "olddefconfig"], stdout=subprocess.DEVNULL)
        tg = targets_for(paths)
        applied = time.time()
        r = subprocess.run(make + ["-s"] + tg, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
        # Errors fail make. Some option probes print rustc errors about
        # clang's output and succeed: only warnings are looked for here.
        warn = [l for l in r.stdout.split("\n") if re.search(r"(: warning: |^warning: )", l)]
        # A source the patch changes that this configuration does not
        # compile is not checked: say so, as a failure.
        missed = []
        for p in paths:
            o = expected_object(p)
            if o and os.path.exists(os.path.join(TREE, p)):
                try:
                    if os.path.getmtime(os.path.join(OBJ, o)) < applied:
                        missed.append(p)
                except FileNotFoundError:
                    missed.append(p)
        ok = r.returncode == 0 and not warn and not missed
        if not ok:
            failed += 1
            print(r.stdout[-6000:])
            if missed:
                print(f"not compiled after {n}: {' '.join(missed)}")
        results.append(f"{'PASS' if ok else 'FAIL'} build {n} {' '.join(tg)}")
        log(f"{'ok  ' if ok else 'FAIL'} {i}/{len(names)} {n} ({time.time() - t:.0f} s)")
    print("\n".join(results))
    print(f"series-check: {len(names)} patches, {failed} failures")
    return failed


def main():
    try:
        if sys.argv[1:] == ["export"]:
            export()
            return 0
        if sys.argv[1:] == ["check"]:
            return 1 if check() else 0
        print("usage: series.py export|check", file=sys.stderr)
        return 2
    except Bad as e:
        print(f"series: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"series: {' '.join(e.cmd)} failed ({e.returncode})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
