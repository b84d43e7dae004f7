#!/usr/bin/env python3
"""Peak memory of `flotilla build --out` for a large image (BENCHMARKS.md, issue 15).

Usage: python3 packaging/build-memory.py BIN [BIN ...]

Writes a 256 MiB file of random bytes and two specs in a temporary directory — one with
the file in `file = [...]` on a busybox base, one with a rootfs tar holding busybox and
the file — then runs `BIN build SPEC --out DIR` for each, each in its own child, and
prints each build's peak RSS (getrusage of the child) and wall time, and the archive's
sha256 (equal across binaries when the archive format is unchanged).
"""
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile

SPEC_FILES = """name = "mem"

[service.web]
port = 8080
command = ["httpd", "-f", "-p", "8080", "-h", "/www"]

[service.web.image]
base = "busybox"
file = [{ src = "big.bin", dest = "/www/big.bin" }]
"""

SPEC_ROOTFS = """name = "memroot"

[service.web]
port = 8080
command = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/srv"]

[service.web.image]
base = "rootfs:root.tar"
"""

MEASURE = """
import resource, subprocess, sys, time
t0 = time.time()
p = subprocess.run(sys.argv[1:], capture_output=True)
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(p.returncode, rss, time.time() - t0)
"""


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    bins = sys.argv[1:]
    if not bins:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "big.bin"), "wb") as f:
            for _ in range(256):
                f.write(os.urandom(1 << 20))
        with tarfile.open(os.path.join(d, "root.tar"), "w") as t:
            t.add("/bin/busybox", arcname="bin/busybox")
            t.add(os.path.join(d, "big.bin"), arcname="srv/big.bin")
        specs = {"files.toml": SPEC_FILES, "rootfs.toml": SPEC_ROOTFS}
        for name, text in specs.items():
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
        env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
        for b in bins:
            for name in specs:
                out = os.path.join(d, "out")
                subprocess.run(["rm", "-rf", out], check=True)
                # A fresh interpreter per build: RUSAGE_CHILDREN is the peak of them all.
                r = subprocess.run(
                    [sys.executable, "-c", MEASURE, b, "build", os.path.join(d, name), "--out", out],
                    capture_output=True, text=True, env=env, check=True,
                )
                rc, rss, secs = r.stdout.split()
                archive = [os.path.join(out, f) for f in os.listdir(out)] if os.path.isdir(out) else []
                digest = sha256(archive[0])[:16] if archive else "-"
                print(f"{b} {name}: rc {rc}, peak RSS {float(rss):.0f} MiB, {float(secs):.1f} s, archive sha256 {digest}")


if __name__ == "__main__":
    main()
