#!/usr/bin/env python3
"""TLS benchmark (issue 13, "Speed"), driven by scripts/bench_tls.sh: a warm 64 MiB blob
GET over HTTPS from regcache against nginx serving the same file over HTTPS, in one run.

A CA and a server certificate for 127.0.0.1 are made with openssl; docker-registry is the
upstream (seeded with skopeo); regcache serves with `[server.tls]`; nginx (1 worker,
`ssl_protocols TLSv1.2 TLSv1.3`, the same certificate) serves the blob file. Both are
measured the same way, in interleaved rounds: one curl process, HTTP/1.1, one TLS
connection, sequential GETs; the figure is the median MB/s per GET.

Usage: bench_tls.py WORK_DIR REGCACHE_BIN
"""

import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_pressure as bp  # noqa: E402  (process handling and docker-registry start-up)

ROUNDS = int(os.environ.get("BENCH_TLS_ROUNDS", 6))
PER_ROUND = int(os.environ.get("BENCH_TLS_PER_ROUND", 5))
TARGET = 0.7


def make_certs(d):
    os.makedirs(d, exist_ok=True)
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", d + "/ca.key", "-out", d + "/ca.crt", "-days", "2", "-subj", "/CN=bench ca")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", d + "/server.key", "-out", d + "/server.csr", "-subj", "/CN=127.0.0.1")
    with open(d + "/ext.cnf", "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", d + "/server.csr", "-CA", d + "/ca.crt", "-CAkey", d + "/ca.key",
        "-CAcreateserial", "-out", d + "/server.crt", "-days", "2", "-extfile", d + "/ext.cnf")


def wait_https(proc, url, ca, logfile):
    deadline = time.time() + bp.STARTUP_DEADLINE
    while subprocess.run(["curl", "-fsS", "-o", "/dev/null", "--max-time", "2", "--cacert", ca, url],
                         capture_output=True).returncode != 0:
        if proc.poll() is not None:
            sys.exit("server exited; see %s:\n%s" % (logfile, open(logfile).read()[-3000:]))
        if time.time() > deadline:
            sys.exit("no HTTPS answer from %s; see %s" % (url, logfile))
        time.sleep(0.05)  # polling interval


def start_regcache(procs, work, binary, upstream_port, certs):
    d = os.path.join(work, "regcache")
    os.makedirs(d, exist_ok=True)
    port = bp.free_port()
    with open(d + "/config.toml", "w") as f:
        f.write('[server]\nlisten = "127.0.0.1:%d"\ndata_dir = "%s/data"\n\n'
                '[server.tls]\ncert_file = "%s/server.crt"\nkey_file = "%s/server.key"\n\n'
                '[[upstream]]\nname = "origin"\nurl = "http://127.0.0.1:%d"\ndefault = true\n\n'
                '[log]\nlevel = "warn"\n' % (port, d, certs, certs, upstream_port))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGCACHE_")}
    p = procs.start([binary, "serve", "--config", d + "/config.toml"], d + "/log", env=env)
    wait_https(p, "https://127.0.0.1:%d/v2/" % port, certs + "/ca.crt", d + "/log")
    return p, port


def start_nginx(procs, work, root, certs):
    d = os.path.join(work, "nginx")
    os.makedirs(d + "/tmp", exist_ok=True)
    port = bp.free_port()
    user = "user root;" if os.getuid() == 0 else ""
    with open(d + "/nginx.conf", "w") as f:
        f.write("""daemon off; master_process off; worker_processes 1; %s
pid %s/nginx.pid; error_log %s/error.log warn;
events { worker_connections 256; }
http {
  access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;
  client_body_temp_path %s/tmp/body; proxy_temp_path %s/tmp/proxy; fastcgi_temp_path %s/tmp/fastcgi;
  uwsgi_temp_path %s/tmp/uwsgi; scgi_temp_path %s/tmp/scgi;
  default_type application/octet-stream;
  server {
    listen 127.0.0.1:%d ssl;
    ssl_certificate %s/server.crt; ssl_certificate_key %s/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    root %s;
  }
}
""" % (user, d, d, d, d, d, d, d, port, certs, certs, root))
    p = procs.start(["nginx", "-p", d, "-e", d + "/error.log", "-c", d + "/nginx.conf"], d + "/stdout")
    wait_https(p, "https://127.0.0.1:%d/oci-layout" % port, certs + "/ca.crt", d + "/error.log")
    return p, port


def cpu_secs(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def round_of_gets(url, ca, size):
    args = ["curl", "-fsS", "--http1.1", "--max-time", "300", "--cacert", ca,
            "-w", "%{size_download} %{time_total}\n"]
    for _ in range(1 + PER_ROUND):
        args += ["-o", "/dev/null", url]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout.split("\n")
    rates = []
    for line in [l for l in out if l.strip()][1:]:  # the first GET warms up
        got, secs = line.split()
        if int(float(got)) != size:
            sys.exit("%s: a GET returned %s bytes, not %d" % (url, got, size))
        rates.append(size / float(secs) / 1e6)
    return rates


def main():
    work, binary = sys.argv[1], sys.argv[2]
    procs = bp.Procs()
    try:
        certs = os.path.join(work, "certs")
        make_certs(certs)
        oci = os.path.join(work, "oci")
        big_digest, big_path, _ = subprocess.check_output(
            [sys.executable, bp.HELPER, "seed-layout", oci]).decode().split()
        size = os.path.getsize(big_path)
        _, up_port = bp.start_registry(procs, work, "upstream")
        for tag in ("big", "small"):
            subprocess.run(["skopeo", "--insecure-policy", "copy", "--preserve-digests", "--dest-tls-verify=false",
                            "--quiet", "oci:%s:%s" % (oci, tag), "docker://127.0.0.1:%d/bench/%s:v1" % (up_port, tag)],
                           check=True)
        rc, rc_port = start_regcache(procs, work, binary, up_port, certs)
        ng, ng_port = start_nginx(procs, work, oci, certs)
        ca = certs + "/ca.crt"
        urls = {
            "regcache": ("https://127.0.0.1:%d/v2/bench/big/blobs/%s" % (rc_port, big_digest), rc),
            "nginx": ("https://127.0.0.1:%d%s" % (ng_port, big_path[len(oci):]), ng),
        }
        subprocess.run(["curl", "-fsS", "-o", "/dev/null", "--cacert", ca, urls["regcache"][0]], check=True)
        rates = {name: [] for name in urls}
        cpu = {name: 0.0 for name in urls}
        for _ in range(ROUNDS):
            for name, (url, proc) in urls.items():
                c0 = cpu_secs(proc.pid)
                rates[name] += round_of_gets(url, ca, size)
                cpu[name] += cpu_secs(proc.pid) - c0
        med = {name: statistics.median(r) for name, r in rates.items()}
        ratio = med["regcache"] / med["nginx"]
        print()
        print("%-46s %10s %10s %8s %8s %6s" % ("metric", "regcache", "nginx", "ratio", "target", "result"))
        print("%-46s %10.0f %10.0f %7.2fx %7s %6s" % (
            "warm 64 MiB blob GET over TLS, MB/s (median of %d)" % (ROUNDS * PER_ROUND),
            med["regcache"], med["nginx"], ratio, ">=%.1fx" % TARGET, "PASS" if ratio >= TARGET else "MISS"))
        print("%-46s %10.2f %10.2f" % ("server CPU s for all %d GETs" % (ROUNDS * (PER_ROUND + 1)),
                                       cpu["regcache"], cpu["nginx"]))
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
