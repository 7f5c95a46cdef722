"""Load-test runner: starts the mock provider, a second mock answering as
the guard model, and the gateway with every filter on (gateway.yaml); runs
one k6 scenario straight against the mock, then through the gateway (and
through any other gateway given with --target); prints the comparison and
writes it as JSON. Run it through run.sh, which installs k6 and builds the
gateway first.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
K6 = ROOT / ".venv" / "bin" / "k6"
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# scenario: (script, default offered rate, what its trend rows are)
SCENARIOS = {
    "chat": ("chat.js", 1000, [("http_req_duration", "")]),
    "stream": (
        "stream.js",
        100,
        [("stream_ttfb_ms", "first byte"), ("stream_gap_ms", "event gap"), ("stream_duration_ms", "whole reply")],
    ),
    "mixed": ("mixed.js", 500, [("http_req_duration", "")]),
    "smoke": ("smoke.js", 0, [("http_req_duration", "")]),
}
FILTERS = (
    "JWT auth (ES256), freezes, rate limits and token budgets, intake limits, "
    "prompt-injection screen (enforce), guard model (Llama Guard protocol, {timing}, "
    "a second mock), model registry, tool authorization, redaction, hash-chained audit (fsync)"
)


def run_or_exit(args):
    """Run a command; its output, or exit with what it printed."""
    try:
        r = subprocess.run(args, capture_output=True, text=True)
    except OSError as e:
        sys.exit(f"{args[0]}: {e}")
    if r.returncode != 0:
        sys.exit(f"{' '.join(args[:3])} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose CPU time and resident memory can be read."""

    def __init__(self, args, log, env=None):
        self.log = open(log, "wb")
        self.popen = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.pid = self.popen.pid

    def cpu_seconds(self):
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime

    def cpu_by_thread(self):
        """CPU seconds so far per thread name (threads of one name summed)."""
        out = {}
        for stat in Path(f"/proc/{self.pid}/task").glob("*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text.rsplit(")", 1)[1].split()
            out[name] = out.get(name, 0) + (int(fields[11]) + int(fields[12])) / TICKS
        return out

    def switches(self):
        """Context switches of all its threads so far: how often it slept and woke."""
        total = 0
        for status in Path(f"/proc/{self.pid}/task").glob("*/status"):
            try:
                for line in status.read_text().splitlines():
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total

    def rss_mib(self):
        pages = int(Path(f"/proc/{self.pid}/statm").read_text().split()[1])
        return pages * PAGE / 2**20

    def stop(self):
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        self.log.close()


class Sampler(threading.Thread):
    """The peak resident memory of a process, sampled every 100 ms."""

    def __init__(self, proc):
        super().__init__(daemon=True)
        self.proc, self.peak, self.done = proc, proc.rss_mib(), threading.Event()
        self.start()

    def run(self):
        while not self.done.wait(0.1):
            try:
                self.peak = max(self.peak, self.proc.rss_mib())
            except OSError:
                return

    def stop(self):
        self.done.set()
        self.join()
        return self.peak


def wait_ready(url, proc, what):
    for _ in range(300):
        if proc.popen.poll() is not None:
            sys.exit(f"{what} exited at start; see {proc.log.name}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    sys.exit(f"{what} not ready at {url}; see {proc.log.name}")


WARM = 20


def warm(base, token, model, n=WARM):
    """A few requests first: connections, token cache and guard verdicts
    warm. The error of the first that fails, or None."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello, how are you today? A short prompt."}]})
    for _ in range(n):
        req = urllib.request.Request(
            f"{base}/chat/completions",
            data=body.encode(),
            headers={"content-type": "application/json", "authorization": f"Bearer {token}"},
        )
        try:
            urllib.request.urlopen(req, timeout=5).read()
        except (urllib.error.URLError, OSError) as e:
            return f"warm-up request to {base} failed: {e}"
    return None


def run_k6(script, env, summary_path, log_path):
    args = [str(K6), "run", "--quiet", "--no-usage-report"]
    for k, v in env.items():
        args += ["-e", f"{k}={v}"]
    args += ["-e", f"SUMMARY={summary_path}", str(HERE / script)]
    with open(log_path, "wb") as log:
        code = subprocess.call(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        data = json.loads(Path(summary_path).read_text())
    except (OSError, ValueError):
        sys.exit(f"k6 wrote no summary (exit {code}); its output:\n{Path(log_path).read_text()}")
    return code, data


def phase_result(data, k6_code, trends, watched, wall, sampler):
    m = data["metrics"]
    reqs = m.get("http_reqs", {}).get("values", {"count": 0, "rate": 0})
    checks = m.get("checks", {}).get("values", {"passes": 0, "fails": 0})
    failed_checks = []
    for group in [data.get("root_group", {})]:
        for c in group.get("checks", []):
            if c.get("fails"):
                failed_checks.append(f"{c['name']}: {c['fails']} failed")
    out = {
        "k6_exit": k6_code,
        "thresholds_held": k6_code == 0,
        "failed_thresholds": sorted(
            f"{name}: {t}" for name, v in m.items() for t, r in v.get("thresholds", {}).items() if not r.get("ok", True)
        ),
        "requests": int(reqs["count"]),
        "rps": round(reqs["rate"], 1),
        "failed_requests": int(m.get("http_req_failed", {}).get("values", {}).get("passes", 0)),
        "dropped_iterations": int(m.get("dropped_iterations", {}).get("values", {}).get("count", 0)),
        "checks_passed": int(checks["passes"]),
        "checks_failed": int(checks["fails"]),
        "failed_checks": failed_checks,
        "latency_ms": {},
    }
    for name, _ in trends:
        v = m.get(name, {}).get("values")
        if v and v.get("med") is not None:
            out["latency_ms"][name] = {k: round(v[src], 3) for k, src in (("p50", "med"), ("p90", "p(90)"), ("p99", "p(99)"), ("max", "max"))}
    for label, (proc, cpu, switches) in watched.items():
        used = proc.cpu_seconds() - cpu
        n = max(out["requests"], 1)
        out[f"{label}_cpu_percent"] = round(100 * used / wall, 1)
        out[f"{label}_cpu_us_per_request"] = round(1e6 * used / n, 1)
        out[f"{label}_switches_per_request"] = round((proc.switches() - switches) / n, 2)
    if sampler is not None:
        out["peak_rss_mib"] = round(sampler.stop(), 1)
    return out


def print_table(title, phases, trends):
    print(title)
    header = f"{'':10} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'failed':>7} {'dropped':>8}  checks"
    for metric, label in trends:
        if label:
            print(f"-- {label} ({metric})")
        print(header)
        for name, p in phases.items():
            lat = p["latency_ms"].get(metric)
            cells = " ".join(f"{lat[k]:8.3f}" for k in ("p50", "p90", "p99", "max")) if lat else f"{'-':>8} " * 4
            checks = "ok" if not p["checks_failed"] else f"{p['checks_failed']} of {p['checks_failed'] + p['checks_passed']} failed"
            print(f"{name:10} {p['rps']:8.1f} {cells} {p['failed_requests']:7d} {p['dropped_iterations']:8d}  {checks}")
        d, g = phases.get("direct", {}).get("latency_ms", {}).get(metric), phases.get("gateway", {}).get("latency_ms", {}).get(metric)
        if d and g:
            print(f"{'added':10} {'':8} " + " ".join(f"{g[k] - d[k]:8.3f}" for k in ("p50", "p90", "p99")))


def main():
    # A SIGTERM (a CI timeout, a kill) still stops the children and keeps
    # the logs: it ends the run through `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(prog="load-tests/run.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", choices=SCENARIOS)
    ap.add_argument("--rate", type=int, help="offered requests (streams) per second")
    ap.add_argument("--duration", type=int, default=20, help="seconds per run (default 20)")
    ap.add_argument("--requests", type=int, default=1000, help="chat with --rate 0: this many requests, one at a time")
    ap.add_argument("--mock-latency-ms", type=int, default=0, help="the provider mock's delay before each answer")
    ap.add_argument("--guard-latency-ms", type=int, default=0, help="the guard mock's delay before each verdict")
    ap.add_argument(
        "--guard-timing", choices=("sequential", "parallel"), default="sequential",
        help="guard before the provider call, or beside it",
    )
    ap.add_argument("--open", type=int, default=0, help="stream: hold this many slow streams open at once")
    ap.add_argument("--stream-secs", type=int, default=20, help="with --open: how long each stream lasts")
    ap.add_argument("--target", help="also run the scenario against this OpenAI-compatible base URL (…/v1)")
    ap.add_argument("--target-key", default=os.environ.get("TARGET_API_KEY", ""), help="its API key ($TARGET_API_KEY)")
    ap.add_argument("--target-model", default="mock-small", help="the model to ask it for")
    ap.add_argument("--target-pid", type=int, help="its process id, to report its CPU and memory")
    ap.add_argument("--mock-listen", default="127.0.0.1:0", help="the mock provider's address (point --target's gateway at it)")
    ap.add_argument("--config", default=str(HERE / "gateway.yaml"), help="the gateway's config (its addresses from LOAD_* variables, as in gateway.yaml)")
    ap.add_argument("--bin", default=str(ROOT / "target/release/portcullis"), help="the gateway binary")
    ap.add_argument("--gateway-only", action="store_true", help="skip the run straight against the mock")
    ap.add_argument("--vary", action="store_true", help="chat: every prompt new (the guard's cache never answers)")
    ap.add_argument("--json", help="where the summary goes (default target/load/SCENARIO-….json)")
    a = ap.parse_args()
    caller = Path(os.environ.get("LOAD_CALLER_DIR", os.getcwd()))
    for name in ("bin", "config", "json"):
        if getattr(a, name):
            setattr(a, name, str((caller / getattr(a, name)).resolve()))
    script, default_rate, trends = SCENARIOS[a.scenario]
    rate = a.rate if a.rate is not None else default_rate
    if a.scenario == "smoke":
        a.gateway_only = True
    elif a.scenario != "chat" and rate <= 0 and not a.open:
        ap.error(f"{a.scenario} needs --rate above 0")

    work = Path(tempfile.mkdtemp(prefix="portcullis-load-"))
    procs = []
    passed = False
    try:
        bin_ = a.bin
        run_or_exit([bin_, "keys", "generate", "--dir", str(work / "keys")])

        def token(sub, roles):
            return run_or_exit(
                [bin_, "token", "--key", str(work / "keys/private/dev.key"), "--sub", sub, "--tenant", sub, "--roles", roles, "--ttl", "4h"],
            ).strip()

        tok, limited = token("load", "load"), token("limited", "limited")
        mock_addr = a.mock_listen if not a.mock_listen.endswith(":0") else f"127.0.0.1:{free_port()}"
        guard_addr = f"127.0.0.1:{free_port()}"
        listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        mock_args = [bin_, "mock-provider", "--listen", mock_addr, "--latency-ms", str(a.mock_latency_ms)]
        env = {}
        if a.scenario == "stream" and a.open:
            # Paced: 4 characters per event every 200 ms for --stream-secs.
            mock_args += ["--chunk-bytes", "4", "--event-delay-ms", "200"]
            env.update(OPEN=a.open, CHARS=4 * a.stream_secs * 5)
        mock = Proc(mock_args, work / "mock.log")
        procs.append(mock)
        guard = Proc([bin_, "mock-provider", "--listen", guard_addr, "--latency-ms", str(a.guard_latency_ms)], work / "guard.log")
        procs.append(guard)
        gw_env = dict(os.environ, LOAD_LISTEN=listen, LOAD_ADMIN_LISTEN=admin, LOAD_MOCK=mock_addr, LOAD_GUARD=guard_addr, LOAD_WORK=str(work), LOAD_GUARD_TIMING=a.guard_timing, RUST_LOG="warn")
        gw = Proc([bin_, "serve", "--config", str(Path(a.config).resolve())], work / "gateway.log", env=gw_env)
        procs.append(gw)
        wait_ready(f"http://{mock_addr}/v1/models", mock, "mock provider")
        wait_ready(f"http://{guard_addr}/v1/models", guard, "guard mock")
        wait_ready(f"http://{admin}/readyz", gw, "gateway")

        env.update(RATE=rate, DURATION=f"{a.duration}s", REQUESTS=a.requests, MODEL="mock-small")
        if a.vary:
            env["VARY"] = "1"
        targets = []
        if not a.gateway_only:
            targets.append(("direct", f"http://{mock_addr}/v1", "direct", tok, tok, "mock-small", None))
        targets.append(("gateway", f"http://{listen}/v1", "gateway", tok, limited, "mock-small", gw))
        if a.target:
            other = None
            if a.target_pid:
                if not Path(f"/proc/{a.target_pid}/stat").exists():
                    ap.error(f"--target-pid {a.target_pid}: no such process")
                other = Proc.__new__(Proc)
                other.pid = a.target_pid
            targets.append(("target", a.target.rstrip("/"), "target", a.target_key, a.target_key, a.target_model, other))

        phases = {}
        for name, base, mode, t, lt, model, proc in targets:
            if a.scenario != "smoke":
                problem = warm(base, t, model)
                if problem and name == "target":
                    print(problem, file=sys.stderr)
                    continue
                if problem:
                    sys.exit(problem)
            watched = {"mock": (mock, mock.cpu_seconds(), mock.switches())}
            threads = None
            if proc is not None:
                watched[name] = (proc, proc.cpu_seconds(), proc.switches())
                if name == "gateway":
                    threads = proc.cpu_by_thread()
            sampler = Sampler(proc) if proc is not None else None
            before = proc.rss_mib() if proc is not None else None
            started = time.monotonic()
            code, data = run_k6(
                script,
                dict(env, BASE_URL=base, MODE=mode, TOKEN=t, LIMITED_TOKEN=lt, MODEL=model),
                work / f"{name}.json",
                work / f"{name}.k6.log",
            )
            # The test's own duration (k6 start-up and VU set-up excluded),
            # else the wall time around it.
            wall = data.get("state", {}).get("testRunDurationMs", 0) / 1000 or (time.monotonic() - started)
            phases[name] = phase_result(data, code, trends, watched, wall, sampler)
            if before is not None:
                phases[name]["rss_before_mib"] = round(before, 1)
            if threads is not None:
                # Where the gateway's CPU went, by thread: the proxy's
                # workers, the audit writer, the rest.
                n = max(phases[name]["requests"], 1)
                after = proc.cpu_by_thread()
                phases[name]["cpu_us_per_request_by_thread"] = {
                    t: round(1e6 * (after[t] - threads.get(t, 0)) / n, 1)
                    for t in sorted(after)
                    if after[t] - threads.get(t, 0) > 0
                }

        # Nothing lost: one record per request the gateway was sent, and
        # the chain intact.
        gw.stop()
        sent = phases["gateway"]["requests"] + (0 if a.scenario == "smoke" else WARM)
        audit = verify_audit(bin_, work / "audit.jsonl", sent)
        phases["gateway"]["audit"] = audit

        if a.scenario == "smoke":
            what = "every kind of request, one at a time"
        elif a.scenario == "stream" and a.open:
            what = f"{a.open} streams open at once, each about {a.stream_secs} s"
        else:
            what = f"{rate} requests/s offered for {a.duration} s" if rate else f"{a.requests} requests, one at a time"
        filters = FILTERS.format(timing=a.guard_timing)
        print_table(f"\n{a.scenario}: {what}\ngateway filters: {filters}\n", phases, trends)
        for name, p in phases.items():
            parts = []
            if f"{name}_cpu_percent" in p:
                parts.append(
                    f"CPU {p[f'{name}_cpu_percent']}% of a core, {p[f'{name}_cpu_us_per_request']} µs and "
                    f"{p[f'{name}_switches_per_request']} context switches per request"
                )
            if "peak_rss_mib" in p:
                parts.append(f"RSS {p['rss_before_mib']} MiB before, {p['peak_rss_mib']} MiB at peak")
            parts.append(f"mock provider {p['mock_cpu_us_per_request']} µs CPU and {p['mock_switches_per_request']} switches per request")
            print(f"{name}: " + "; ".join(parts))
            if "cpu_us_per_request_by_thread" in p:
                split = ", ".join(f"{t} {us}" for t, us in p["cpu_us_per_request_by_thread"].items())
                print(f"  CPU µs per request by thread: {split}")
            if "audit" in p:
                print(f"  audit: {p['audit']['records']} records for {p['audit']['sent']} requests, chain {'verified' if p['audit']['chain_ok'] else 'BROKEN'}")
            for line in p["failed_checks"] + p["failed_thresholds"]:
                print(f"  FAILED {line}")
        summary = {
            "scenario": a.scenario,
            "offered_rps": rate,
            "open_streams": a.open or None,
            "duration_s": a.duration,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "kernel": platform.release()},
            "commit": git_commit(),
            "filters": filters,
            "phases": phases,
        }
        if "direct" in phases and "gateway" in phases:
            summary["added_ms"] = {
                metric: {k: round(phases["gateway"]["latency_ms"][metric][k] - phases["direct"]["latency_ms"][metric][k], 3) for k in ("p50", "p90", "p99")}
                for metric, _ in trends
                if metric in phases["gateway"]["latency_ms"] and metric in phases["direct"]["latency_ms"]
            }
        out = Path(a.json) if a.json else ROOT / "target" / "load" / f"{a.scenario}-{a.open or rate}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"summary: {out}")
        ours = [p for n, p in phases.items() if n != "target"]
        # The gateway's thresholds decide; the direct run (the bare mock)
        # must pass its checks, but its latency is not the gateway's.
        direct_ok = "direct" not in phases or phases["direct"]["checks_failed"] == 0
        passed = phases["gateway"]["thresholds_held"] and audit["ok"] and direct_ok
        if not passed:
            sys.exit(1)
    finally:
        for p in reversed(procs):
            p.stop()
        if passed:
            shutil.rmtree(work, ignore_errors=True)
        else:
            # Whatever went wrong, the logs stay: the gateway's, the mocks',
            # k6's and the audit file.
            print(f"FAILED; logs in {work}", file=sys.stderr)
            for log in ("gateway.log", "mock.log", "guard.log"):
                path = work / log
                if path.exists() and path.stat().st_size:
                    tail = path.read_text(errors="replace").splitlines()[-15:]
                    print(f"--- {path} (last lines)\n" + "\n".join(tail), file=sys.stderr)


def verify_audit(bin_, path, sent):
    """`audit verify` on the gateway's file, and its request records counted."""
    verify = subprocess.run([bin_, "audit", "verify", str(path)], capture_output=True, text=True)
    records = 0
    with open(path) as f:
        for line in f:
            try:
                records += json.loads(line).get("kind") == "request"
            except ValueError:
                pass
    ok = verify.returncode == 0 and records == sent
    return {"records": records, "sent": sent, "chain_ok": verify.returncode == 0, "ok": ok}


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def git_commit():
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


if __name__ == "__main__":
    main()
