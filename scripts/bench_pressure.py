#!/usr/bin/env python3
"""Pressure benchmark (issue 11, point 3), driven by scripts/bench_pressure.sh.

Against regcache and against the CNCF registry in proxy mode (the "peer"), one after the
other in the same run, both in front of the same docker-registry upstream:
  1. `STALLED` clients ask for the 64 MiB blob and stop reading after its headers
     (receive buffer pinned small, so each holds a response mid-download);
  2. then `SLOW_HEADER` connections send a request line and one more header line every
     `SLOW_HEADER_EVERY` s, never ending the headers (slowloris);
  3. then `IDLE` keep-alive connections make one `GET /v2/` each and stay open.
The connections of earlier phases stay held (unless the server closes them). Throughout,
a fresh client (a new connection per request) asks for `GET /v2/`, the tag manifest and a
blob HEAD in turn; each phase prints the max and p99 latency of each, and how many probes
failed (an error, or no answer within `PROBE_TIMEOUT`). For the slow-header connections it
prints how many the server closed and when (seconds after they connected). The server's
open file descriptors and RSS are sampled every second.

Standard library only. Usage (the shell script does this):
  bench_pressure.py WORK_DIR REGCACHE_BIN HEADER_TIMEOUT_SECS
"""

import asyncio
import json
import multiprocessing
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
HELPER = os.path.join(HERE, "bench_helper.py")

STALLED = int(os.environ.get("BENCH_STALLED", 1500))
SLOW_HEADER = int(os.environ.get("BENCH_SLOW_HEADER", 2000))
IDLE = int(os.environ.get("BENCH_IDLE", 3000))
# How long each phase holds its load once it is all connected (the slow-header phase
# instead runs until the header timeout plus this has passed).
HOLD_SECS = float(os.environ.get("BENCH_HOLD_SECS", 15))
# Connections opened at once while a phase ramps up (a burst, not a queue of thousands).
RAMP_BATCH = 100
SLOW_HEADER_EVERY = 10.0
PROBE_EVERY = 0.1
PROBE_TIMEOUT = 10.0
TARGET_SECS = 1.0
# Small enough that a stalled client holds most of the blob on the server's side.
STALLED_RCVBUF = 4096
STARTUP_DEADLINE = 30.0
MANIFEST_ACCEPT = ("application/vnd.oci.image.manifest.v1+json, "
                   "application/vnd.docker.distribution.manifest.v2+json")


def log(msg):
    print("[pressure %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


# ----- processes ----------------------------------------------------------------------
class Procs:
    """Processes we start, ended by PID (never by name) when the run ends."""

    def __init__(self):
        self.procs = []

    def start(self, argv, logfile, **kw):
        out = open(logfile, "wb")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def free_port():
    return int(subprocess.check_output([sys.executable, HELPER, "free-port"]).decode())


def http_ok(port, path):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path).encode())
            return s.recv(64).startswith(b"HTTP/1.1 2")
    except OSError:
        return False


def wait_ready(proc, port, path, logfile):
    deadline = time.time() + STARTUP_DEADLINE
    while not http_ok(port, path):
        if proc.poll() is not None:
            sys.exit("server exited before answering; see %s:\n%s" % (logfile, open(logfile).read()[-3000:]))
        if time.time() > deadline:
            sys.exit("no answer within %ds; see %s" % (STARTUP_DEADLINE, logfile))
        time.sleep(0.05)  # polling interval


def start_registry(procs, work, name, remote=None):
    d = os.path.join(work, name)
    os.makedirs(os.path.join(d, "storage"), exist_ok=True)
    port = free_port()
    cfg = os.path.join(d, "config.yml")
    with open(cfg, "w") as f:
        f.write("version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                "storage:\n  filesystem:\n    rootdirectory: %s/storage\n"
                "  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\n"
                "http:\n  addr: 127.0.0.1:%d\n  secret: regcache-bench-not-a-secret\n" % (d, port))
        if remote:
            f.write("proxy:\n  remoteurl: %s\n" % remote)
    logfile = os.path.join(d, "log")
    p = procs.start(["docker-registry", "serve", cfg], logfile)
    wait_ready(p, port, "/v2/", logfile)
    return p, port


def start_regcache(procs, work, binary, upstream_port):
    d = os.path.join(work, "regcache")
    os.makedirs(d, exist_ok=True)
    port = free_port()
    cfg = os.path.join(d, "config.toml")
    with open(cfg, "w") as f:
        f.write('[server]\nlisten = "127.0.0.1:%d"\ndata_dir = "%s/data"\n\n'
                '[[upstream]]\nname = "origin"\nurl = "http://127.0.0.1:%d"\ndefault = true\n\n'
                '[log]\nlevel = "warn"\n' % (port, d, upstream_port))
    logfile = os.path.join(d, "log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGCACHE_")}
    p = procs.start([binary, "serve", "--config", cfg], logfile, env=env)
    wait_ready(p, port, "/v2/", logfile)
    return p, port, logfile


def warm(port, big_digest):
    """Fetches the blob whole and the tag once, so both servers answer from their cache."""
    for path, accept in (("/v2/bench/big/blobs/%s" % big_digest, None),
                         ("/v2/bench/small/manifests/v1", MANIFEST_ACCEPT)):
        cmd = ["curl", "-fsS", "-o", "/dev/null", "--max-time", "120"]
        if accept:
            cmd += ["-H", "Accept: " + accept]
        subprocess.run(cmd + ["http://127.0.0.1:%d%s" % (port, path)], check=True)


# ----- sampling the server ---------------------------------------------------------------
def server_fds(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return -1


def server_rss_mib(pid, field="VmRSS:"):
    """VmRSS counts mapped file pages too (regcache maps the blob it sends: the same
    page-cache pages once per response); RssAnon is the process's own memory."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return -1


# ----- clients ----------------------------------------------------------------------------
async def connect(port, rcvbuf=None):
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setblocking(False)
    await loop.sock_connect(s, ("127.0.0.1", port))
    return s


async def read_head(s):
    loop = asyncio.get_running_loop()
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await loop.sock_recv(s, 4096)
        if not chunk:
            raise ConnectionError("closed before the headers ended")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head.decode("latin-1"), rest


def content_length(head):
    for line in head.split("\r\n"):
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            return int(v.strip())
    return 0


async def stalled_reader(port, path, held):
    """Asks for the blob, reads the headers, then never reads again."""
    loop = asyncio.get_running_loop()
    s = await connect(port, STALLED_RCVBUF)
    await loop.sock_sendall(s, ("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path).encode())
    head, _ = await read_head(s)
    if " 200 " not in head.split("\r\n")[0]:
        raise RuntimeError("stalled reader got " + head.split("\r\n")[0])
    held.append(s)


async def slow_header(port, started_at, closed_after, held):
    """Sends a request line and one header line every SLOW_HEADER_EVERY s; records when
    the server closes the connection (seconds after connecting)."""
    loop = asyncio.get_running_loop()
    s = await connect(port)
    t0 = time.monotonic()
    held.append(s)
    started_at.append(t0)

    async def dribble():
        n = 0
        try:
            await loop.sock_sendall(s, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
            while True:
                await asyncio.sleep(SLOW_HEADER_EVERY)
                n += 1
                await loop.sock_sendall(s, b"X-Slow-%d: 1\r\n" % n)
        except OSError:
            pass

    sender = asyncio.ensure_future(dribble())
    try:
        while True:
            data = await loop.sock_recv(s, 4096)
            if not data:
                break
    except OSError:
        pass
    closed_after.append(time.monotonic() - t0)
    sender.cancel()


async def idle_client(port, held, closed):
    """One GET /v2/ on a keep-alive connection, then silence; notes if the server closes."""
    loop = asyncio.get_running_loop()
    s = await connect(port)
    await loop.sock_sendall(s, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
    head, rest = await read_head(s)
    want = content_length(head)
    while len(rest) < want:
        rest += await loop.sock_recv(s, 4096)
    held.append(s)
    try:
        while await loop.sock_recv(s, 4096):
            pass
    except OSError:
        pass
    closed.append(time.monotonic())


async def probe_once(port, method, path, accept=None):
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    s = await connect(port)
    try:
        req = "%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" % (method, path)
        if accept:
            req += "Accept: %s\r\n" % accept
        await loop.sock_sendall(s, (req + "\r\n").encode())
        head, rest = await read_head(s)
        status = head.split("\r\n")[0]
        if " 200 " not in status:
            raise RuntimeError(status)
        if method == "GET":
            want = content_length(head)
            while len(rest) < want:
                chunk = await loop.sock_recv(s, 65536)
                if not chunk:
                    raise ConnectionError("body cut short")
                rest += chunk
        return time.monotonic() - t0
    finally:
        s.close()


PHASES = ["baseline", "stalled ramp", "stalled", "slow-header ramp", "slow-header",
          "idle ramp", "idle"]


async def probe_loop(port, big_digest, phase, stop, results):
    """A fresh client asking for the three probes in turn, every PROBE_EVERY s."""
    kinds = [
        ("/v2/", "GET", "/v2/", None),
        ("tag manifest", "GET", "/v2/bench/small/manifests/v1", MANIFEST_ACCEPT),
        ("blob HEAD", "HEAD", "/v2/bench/big/blobs/%s" % big_digest, None),
    ]
    while not stop.is_set():
        for kind, method, path, accept in kinds:
            name = PHASES[phase.value]
            try:
                lat = await asyncio.wait_for(probe_once(port, method, path, accept), PROBE_TIMEOUT)
            except (OSError, asyncio.TimeoutError, RuntimeError, ConnectionError) as e:
                log("probe %s failed in phase %s: %r" % (kind, name, e))
                lat = None
            results.setdefault(name, {}).setdefault(kind, []).append(lat)
        await asyncio.sleep(PROBE_EVERY)


def prober_process(port, big_digest, phase, stop, conn):
    """Runs the probes in a process of their own, so the load generator's busy event loop
    never delays a probe (which would count against the server)."""
    results = {}
    asyncio.run(probe_loop(port, big_digest, phase, stop, results))
    conn.send(results)
    conn.close()


class Prober:
    def __init__(self, port, big_digest):
        # "spawn": a forked child would inherit the parent's running event loop.
        ctx = multiprocessing.get_context("spawn")
        self.phase_index = ctx.Value("i", 0)
        self.stop_event = ctx.Event()
        self.recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(
            target=prober_process, args=(port, big_digest, self.phase_index, self.stop_event, send))
        self.proc.start()

    @property
    def phase(self):
        return PHASES[self.phase_index.value]

    @phase.setter
    def phase(self, name):
        self.phase_index.value = PHASES.index(name)

    def finish(self):
        self.stop_event.set()
        results = self.recv.recv()
        self.proc.join()
        return results


async def sampler(pid, phase_of, samples):
    while True:
        samples.setdefault(phase_of(), []).append(
            (server_fds(pid), server_rss_mib(pid), server_rss_mib(pid, "RssAnon:")))
        await asyncio.sleep(1.0)


async def ramp(n, make):
    errors = 0
    for i in range(0, n, RAMP_BATCH):
        done = await asyncio.gather(*(make() for _ in range(min(RAMP_BATCH, n - i))), return_exceptions=True)
        for r in done:
            if isinstance(r, BaseException):
                errors += 1
                if errors <= 3:
                    log("ramp: %r" % (r,))
    return errors


async def pressure(name, pid, port, big_digest, header_timeout):
    loop = asyncio.get_running_loop()
    prober = Prober(port, big_digest)
    samples = {}
    tasks = [asyncio.ensure_future(sampler(pid, lambda: prober.phase, samples))]
    held = []
    report = {"name": name, "phases": [], "samples": samples}
    await asyncio.sleep(3)  # baseline: probes only

    prober.phase = "stalled ramp"
    log("%s: %d stalled readers of the 64 MiB blob" % (name, STALLED))
    t = time.monotonic()
    errs = await ramp(STALLED, lambda: stalled_reader(port, "/v2/bench/big/blobs/%s" % big_digest, held))
    report["phases"].append(("stalled", STALLED, errs, time.monotonic() - t))
    prober.phase = "stalled"
    await asyncio.sleep(HOLD_SECS)

    prober.phase = "slow-header ramp"
    log("%s: %d slow-header connections" % (name, SLOW_HEADER))
    started_at, closed_after, slow_tasks = [], [], []
    t = time.monotonic()

    async def one_slow():
        fut = asyncio.ensure_future(slow_header(port, started_at, closed_after, held))
        slow_tasks.append(fut)
        # Ramp on the connection, not on the whole life of the connection.
        while len(started_at) < len(slow_tasks) and not fut.done():
            await asyncio.sleep(0.001)
        if fut.done() and fut.exception():
            raise fut.exception()

    errs = await ramp(SLOW_HEADER, one_slow)
    report["phases"].append(("slow-header", SLOW_HEADER, errs, time.monotonic() - t))
    prober.phase = "slow-header"
    watch_until = t + header_timeout + HOLD_SECS
    while time.monotonic() < watch_until and len(closed_after) < SLOW_HEADER - errs:
        await asyncio.sleep(0.5)
    report["slow_closed"] = sorted(closed_after)
    report["slow_watch_secs"] = time.monotonic() - t

    prober.phase = "idle ramp"
    log("%s: %d idle keep-alive connections" % (name, IDLE))
    idle_closed = []
    idle_tasks = []
    idle_held = []
    t = time.monotonic()

    async def one_idle():
        fut = asyncio.ensure_future(idle_client(port, idle_held, idle_closed))
        idle_tasks.append(fut)
        while len(idle_held) < len(idle_tasks) and not fut.done():
            await asyncio.sleep(0.001)
        if fut.done() and fut.exception():
            raise fut.exception()

    errs = await ramp(IDLE, one_idle)
    report["phases"].append(("idle", IDLE, errs, time.monotonic() - t))
    prober.phase = "idle"
    await asyncio.sleep(HOLD_SECS)
    report["idle_closed"] = len(idle_closed)

    report["probes"] = await loop.run_in_executor(None, prober.finish)
    tasks[0].cancel()
    for f in slow_tasks + idle_tasks:
        f.cancel()
    for s in held + idle_held:
        s.close()
    await asyncio.sleep(0)
    return report


# ----- report -------------------------------------------------------------------------------
def p99(values):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(0.99 * (len(v) - 1))))]


def print_report(reports, header_timeout):
    print()
    print("%-9s %-15s %6s %6s %7s %12s  %-15s %-15s %-15s %6s" % (
        "server", "phase", "conns", "failed", "fds", "RSS/anon MiB",
        "/v2/ max/p99", "manifest max/p99", "HEAD max/p99", "result"))
    print("-" * 125)
    verdicts = []
    for r in reports:
        conns = {name: n for name, n, _, _ in r["phases"]}
        fails = {name: e for name, _, e, _ in r["phases"]}
        ramps = {name + " ramp": "%.0fs" % secs for name, _, _, secs in r["phases"]}
        for phase in PHASES:
            kinds = r["probes"].get(phase, {})
            cols, ok = [], True
            for kind in ("/v2/", "tag manifest", "blob HEAD"):
                lats = kinds.get(kind, [])
                good = [x for x in lats if x is not None]
                failed = len(lats) - len(good)
                if not lats:
                    cols.append("-")  # the phase was shorter than one probe
                    continue
                if not good:
                    cols.append("no answer")
                    ok = False
                    continue
                mx = max(good) if not failed else float("inf")
                ok = ok and mx < TARGET_SECS
                cols.append("%s/%.3f%s" % ("%.3f" % mx if failed == 0 else "FAIL", p99(good),
                                           "" if not failed else " x%d" % failed))
            smp = r["samples"].get(phase)
            fds = "%d" % max(s[0] for s in smp) if smp else "-"
            rss = "%.0f/%.0f" % (max(s[1] for s in smp), max(s[2] for s in smp)) if smp else "-"
            verdict = "PASS" if ok else "MISS"
            if r["name"] == "regcache":
                verdicts.append(ok)
            print("%-9s %-15s %6s %6s %7s %12s  %-15s %-15s %-15s %6s" % (
                r["name"], phase, conns.get(phase, ramps.get(phase, "")), fails.get(phase, ""), fds, rss,
                cols[0], cols[1], cols[2], verdict))
    print()
    print("slow-header connections closed by the server (target: all, within header_timeout = %ds):" % header_timeout)
    for r in reports:
        c = r["slow_closed"]
        if c:
            print("  %-9s %4d of %d closed, %.1f s / %.1f s / %.1f s after connecting (first / median / last); watched %.0f s"
                  % (r["name"], len(c), SLOW_HEADER, c[0], statistics.median(c), c[-1], r["slow_watch_secs"]))
        else:
            print("  %-9s    0 of %d closed in the %.0f s watched" % (r["name"], SLOW_HEADER, r["slow_watch_secs"]))
    print("idle keep-alive connections closed by the server during the idle phase (%.0f s):" % HOLD_SECS)
    for r in reports:
        print("  %-9s %d of %d" % (r["name"], r["idle_closed"], IDLE))
    rc = reports[0]
    closed_in_time = rc["slow_closed"] and len(rc["slow_closed"]) == SLOW_HEADER and \
        rc["slow_closed"][-1] <= header_timeout + 1.0
    print()
    print("regcache: every probe under %.0f s in every phase: %s; all slow-header connections closed within the header timeout (+1 s): %s"
          % (TARGET_SECS, "PASS" if all(verdicts) else "MISS", "PASS" if closed_in_time else "MISS"))


def main():
    work, binary, header_timeout = sys.argv[1], sys.argv[2], int(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = STALLED + SLOW_HEADER + IDLE + 200
    if hard < need:
        sys.exit("open-file limit %d is below the %d this benchmark needs" % (hard, need))
    procs = Procs()
    try:
        oci = os.path.join(work, "oci")
        log("generating the OCI layout (64 MiB random layer + tiny image)")
        big_digest, _, _ = subprocess.check_output([sys.executable, HELPER, "seed-layout", oci]).decode().split()
        up, up_port = start_registry(procs, work, "upstream")
        for tag in ("big", "small"):
            subprocess.run(["skopeo", "--insecure-policy", "copy", "--preserve-digests", "--dest-tls-verify=false",
                            "--quiet", "oci:%s:%s" % (oci, tag), "docker://127.0.0.1:%d/bench/%s:v1" % (up_port, tag)],
                           check=True)
        reports = []
        for name in ("regcache", "peer"):
            if name == "regcache":
                p, port, logfile = start_regcache(procs, work, binary, up_port)
            else:
                p, port = start_registry(procs, work, "peer", "http://127.0.0.1:%d" % up_port)
                logfile = None
            warm(port, big_digest)
            log("%s on :%d (pid %d): fds %d, RSS %.0f MiB before" % (name, port, p.pid, server_fds(p.pid), server_rss_mib(p.pid)))
            reports.append(asyncio.run(pressure(name, p.pid, port, big_digest, header_timeout)))
            if p.poll() is not None:
                sys.exit("%s exited during the benchmark" % name)
            p.terminate()
            p.wait(timeout=30)
            if logfile:
                warnings = [l for l in open(logfile) if " WARN " in l or " ERROR " in l]
                for l in warnings[:10]:
                    log("regcache log: " + l.rstrip())
        print_report(reports, header_timeout)
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
