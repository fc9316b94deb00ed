#!/usr/bin/env python3
"""Helpers for scripts/bench_bundle.sh; standard library only.

Subcommands:
  seed-big DIR MIB        write an OCI image layout at DIR with tag `big`: one image whose
                          only layer is an uncompressed tar of MIB MiB of random bytes
  measure OUT CMD...      run CMD under GNU time, then write `seconds peak_rss_kib
                          exit_status` to OUT (peak RSS from the kernel's accounting of
                          CMD itself: exact, no sampling; python's own getrusage would
                          count the interpreter's memory, which a forked child inherits
                          until it execs)
"""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_helper import OCI_INDEX, REF_NAME, image, tar_layer  # noqa: E402


def seed_big(root, mib):
    blob_dir = os.path.join(root, "blobs", "sha256")
    os.makedirs(blob_dir, exist_ok=True)
    with open(os.path.join(root, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    data_len = mib * 1024 * 1024 - 512 - 1024

    def random_chunks(n, chunk=8 * 1024 * 1024):
        while n > 0:
            take = min(chunk, n)
            yield os.urandom(take)
            n -= take

    desc, _, _, _ = image(blob_dir, "big", tar_layer("big.bin", data_len, random_chunks(data_len)))
    entry = dict(desc)
    entry["annotations"] = {REF_NAME: "big"}
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}, f)


def measure(out, cmd):
    stats = out + ".time"
    start = time.monotonic()
    status = subprocess.call(["/usr/bin/time", "-f", "%M", "-o", stats] + cmd)
    elapsed = time.monotonic() - start
    with open(stats) as f:
        peak = int(f.read().split()[-1])
    with open(out, "w") as f:
        f.write(f"{elapsed:.3f} {peak} {status}\n")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "seed-big":
        seed_big(args[0], int(args[1]))
    elif cmd == "measure":
        measure(args[0], args[1:])
    else:
        sys.exit(f"unknown subcommand {cmd}")


if __name__ == "__main__":
    main()
