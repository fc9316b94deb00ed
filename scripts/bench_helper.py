#!/usr/bin/env python3
"""Small helpers for scripts/bench.sh; standard library only.

Subcommands (each prints plain text for the shell to read):
  free-port                       a TCP port on 127.0.0.1 that was free a moment ago
  seed-layout DIR                 write an OCI image layout with tags `big` (one 64 MiB
                                  layer of random bytes) and `small` (a tiny layer); print
                                  `big_layer_digest big_layer_path small_manifest_digest`
  verify SHA256HEX FILE...        check every file's SHA-256; exit 1 naming the bad ones
  count-log LOG OFFSET PATTERN    count access-log lines after byte OFFSET whose request
                                  line matches `"METHOD PATH` (PATTERN is a regex on PATH);
                                  print `gets get_bytes heads other`
  sample-rss PID OUT              every 10 ms, write the largest VmRSS seen (KiB) to OUT;
                                  runs until PID exits or this process is killed
  transfer-stats                  read curl `-w '%{size_download} %{time_total}'` lines on
                                  stdin; print `median_MBps aggregate_MBps count`
"""

import hashlib
import json
import os
import re
import socket
import statistics
import sys
import tarfile
import time

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"
BIG_LAYER_BYTES = 64 * 1024 * 1024


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


def tar_layer(name, payload_len, payload):
    """An uncompressed tar holding one file: 512-byte header, the data padded to 512,
    and the two zero blocks that end an archive. `payload` is an iterable of chunks."""
    info = tarfile.TarInfo(name)
    info.size = payload_len
    info.mtime = 0
    info.mode = 0o644
    yield info.tobuf(format=tarfile.USTAR_FORMAT)
    for chunk in payload:
        yield chunk
    pad = (-payload_len) % 512
    yield b"\0" * (pad + 1024)


def write_blob(blob_dir, chunks):
    """Writes chunks to blobs/sha256/<hex>; returns (digest, size, path)."""
    h = hashlib.sha256()
    size = 0
    tmp = os.path.join(blob_dir, ".tmp")
    with open(tmp, "wb") as f:
        for chunk in chunks:
            h.update(chunk)
            f.write(chunk)
            size += len(chunk)
    path = os.path.join(blob_dir, h.hexdigest())
    os.replace(tmp, path)
    return "sha256:" + h.hexdigest(), size, path


def write_json_blob(blob_dir, value):
    return write_blob(blob_dir, [json.dumps(value, sort_keys=True).encode()])


def image(blob_dir, seed, layer_chunks):
    layer_digest, layer_size, layer_path = write_blob(blob_dir, layer_chunks)
    uncompressed = layer_digest  # uncompressed tar: diff_id == blob digest
    config = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"org.regcache.bench.seed": seed}},
        "rootfs": {"type": "layers", "diff_ids": [uncompressed]},
    }
    config_digest, config_size, _ = write_json_blob(blob_dir, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": OCI_LAYER_TAR, "digest": layer_digest, "size": layer_size}],
    }
    m_digest, m_size, _ = write_json_blob(blob_dir, manifest)
    descriptor = {"mediaType": OCI_MANIFEST, "digest": m_digest, "size": m_size}
    return descriptor, layer_digest, layer_size, layer_path


def seed_layout(root):
    blob_dir = os.path.join(root, "blobs", "sha256")
    os.makedirs(blob_dir, exist_ok=True)
    with open(os.path.join(root, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')

    # Big: header + data + 1024 trailing zero bytes = exactly 64 MiB of layer blob.
    data_len = BIG_LAYER_BYTES - 512 - 1024

    def random_chunks(n, chunk=4 * 1024 * 1024):
        while n > 0:
            take = min(chunk, n)
            yield os.urandom(take)
            n -= take

    big, big_digest, big_size, big_path = image(
        blob_dir, "big", tar_layer("big.bin", data_len, random_chunks(data_len)))
    assert big_size == BIG_LAYER_BYTES, big_size
    small_payload = b"regcache bench small image\n"
    small, _, _, _ = image(
        blob_dir, "small", tar_layer("small.txt", len(small_payload), [small_payload]))

    manifests = []
    for tag, desc in (("big", big), ("small", small)):
        entry = dict(desc)
        entry["annotations"] = {REF_NAME: tag}
        manifests.append(entry)
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}, f)
    print(big_digest, big_path, small["digest"])


def verify(expected_hex, files):
    bad = []
    for path in files:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
        if h.hexdigest() != expected_hex:
            bad.append("%s: sha256 %s, %d bytes" % (path, h.hexdigest(), os.path.getsize(path)))
    if bad:
        print("digest mismatch (expected %s):\n  %s" % (expected_hex, "\n  ".join(bad)))
        sys.exit(1)


# distribution's access log (gorilla handlers, combined format):
#   127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 200 67108864 "" "agent"
ACCESS = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3}) (\d+|-)')


def count_log(path, offset, pattern):
    pat = re.compile(pattern)
    gets = get_bytes = heads = other = 0
    with open(path, "rb") as f:
        f.seek(int(offset))
        for raw in f:
            m = ACCESS.search(raw.decode("utf-8", "replace"))
            if not m or not pat.search(m.group(2).split("?", 1)[0]):
                continue
            method, size = m.group(1), m.group(4)
            if method == "GET":
                gets += 1
                get_bytes += int(size) if size != "-" else 0
            elif method == "HEAD":
                heads += 1
            else:
                other += 1
    print(gets, get_bytes, heads, other)


def sample_rss(pid, out):
    peak = 0
    status = "/proc/%s/status" % pid
    while True:
        try:
            with open(status) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        kib = int(line.split()[1])
                        if kib > peak:
                            peak = kib
                            with open(out + ".tmp", "w") as o:
                                o.write("%d\n" % peak)
                            os.replace(out + ".tmp", out)
                        break
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.01)


def transfer_stats():
    rates, total_bytes, total_secs = [], 0, 0.0
    for line in sys.stdin:
        parts = line.split()
        if len(parts) != 2:
            continue
        size, secs = int(float(parts[0])), float(parts[1])
        if secs <= 0:
            continue
        rates.append(size / secs / 1e6)
        total_bytes += size
        total_secs += secs
    if not rates:
        print("0 0 0")
        return
    print("%.0f %.0f %d" % (statistics.median(rates), total_bytes / total_secs / 1e6, len(rates)))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "free-port":
        free_port()
    elif cmd == "seed-layout":
        seed_layout(args[0])
    elif cmd == "verify":
        verify(args[0], args[1:])
    elif cmd == "count-log":
        count_log(args[0], args[1], args[2])
    elif cmd == "sample-rss":
        sample_rss(args[0], args[1])
    elif cmd == "transfer-stats":
        transfer_stats()
    else:
        sys.exit("unknown subcommand %r" % cmd)


if __name__ == "__main__":
    main()
