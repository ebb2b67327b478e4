"""Data-parallel replicas of our server behind ``sglang-router`` (SGLang's Rust router).

    python -m dspark_sglang.launch_router --dp-size 2 [--router-policy cache_aware] \\
        [--replica-cpus auto] [server flags: --model-path ... --speculative-algorithm DSPARK ...]

starts ``dp_size`` servers (``python -m dspark_sglang.launch_server``) on ports ``--port + 1 ..``
(a port already taken is replaced by a free one unless ``--worker-base-port`` is given),
waits until each answers ``/health_generate``, then starts ``python -m
sglang_router.launch_router`` on ``--host:--port`` with their URLs. Clients talk to the router
exactly as to one server (native ``/generate``, OpenAI ``/v1/*``, the sglang frontend).

Per replica: ``--replica-cpus auto`` splits this process's CPU affinity evenly (each replica is
pinned with ``sched_setaffinity`` and gets as many torch threads as cores, unless
``--num-threads`` is given); ``"0,1;2,3"`` pins explicitly; ``none`` leaves scheduling to the OS.
On CUDA, replica *i* sees GPUs ``i*tp_size .. (i+1)*tp_size-1`` through
``CUDA_VISIBLE_DEVICES`` (``--replica-gpus "0,1;2,3"`` overrides).

Children run in their own process groups; SIGINT / SIGTERM (or leaving the ``with`` block of
:class:`RouterDeployment`) stops the router first, then every replica (SIGTERM, SIGKILL after a
grace period). A replica that dies is restarted on the same port when
``--max-replica-restarts`` allows; the router's health checker takes it back once it answers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

import requests

from dspark_sglang.entrypoints.runtime import free_port, server_cli_args
from dspark_sglang.server_args import ServerArgs
from dspark_sglang.utils.proc import stop_process_group

logger = logging.getLogger(__name__)

ROUTER_POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")


@dataclass(frozen=True)
class RouterArgs:
    """Launcher options (the server's own flags configure every replica)."""

    dp_size: int = 2
    router_policy: str = "cache_aware"
    worker_base_port: int | None = None  # replica i listens on base + i (default: port + 1)
    replica_cpus: str = "auto"  # auto | none | "0,1;2,3"
    replica_gpus: str | None = None  # "0,1;2,3" (default: consecutive tp_size blocks)
    router_prometheus_port: int | None = None  # default: a free port
    router_health_check_interval_secs: int = 2
    router_args: str = ""  # extra flags for the router, shell-quoted
    router_module: str = "sglang_router.launch_router"  # or smg.launch_router (its successor)
    max_replica_restarts: int = 0
    replica_start_timeout: float = 600.0
    log_dir: str | None = None  # per-child logs (default: inherit this process's stdout)

    def __post_init__(self) -> None:
        if self.dp_size < 1:
            raise ValueError("dp_size must be >= 1")
        if self.router_policy not in ROUTER_POLICIES:
            raise ValueError(f"router_policy must be one of {list(ROUTER_POLICIES)}")


def split_cpus(spec: str, n: int, available: list[int] | None = None) -> list[list[int] | None]:
    """CPU sets for ``n`` replicas: ``auto`` splits ``available`` (this process's affinity) into
    ``n`` contiguous, disjoint blocks (replicas share cores round-robin when there are fewer cores
    than replicas); ``none`` pins nothing; ``"0,1;2,3"`` lists one set per replica."""
    if spec == "none":
        return [None] * n
    if spec == "auto":
        cpus = sorted(available if available is not None else os.sched_getaffinity(0))
        if len(cpus) < n:
            return [[cpus[i % len(cpus)]] for i in range(n)]
        per = len(cpus) // n
        return [cpus[i * per:(i + 1) * per] for i in range(n)]
    sets = [[int(c) for c in part.split(",") if c.strip()] for part in spec.split(";")]
    if len(sets) != n or any(not s for s in sets):
        raise ValueError(f"replica_cpus {spec!r} must list {n} non-empty CPU sets separated by ';'")
    return sets  # type: ignore[return-value]


def split_gpus(spec: str | None, n: int, tp_size: int) -> list[str]:
    if spec:
        parts = [p.strip() for p in spec.split(";")]
        if len(parts) != n:
            raise ValueError(f"replica_gpus {spec!r} must list {n} GPU sets separated by ';'")
        return parts
    return [",".join(str(i * tp_size + k) for k in range(tp_size)) for i in range(n)]


@dataclass
class Replica:
    """One server process; ``url`` stays the same across restarts."""

    index: int
    args: ServerArgs
    cpus: list[int] | None
    gpus: str | None
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{_client_host(self.args.host)}:{self.args.port}"


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((_client_host(host), port))
        except OSError:
            return False
    return True


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class RouterDeployment:
    """``dp_size`` replicas + the router. ``url`` is the router; ``replicas[i].url`` a replica.

    The constructor returns once every replica answers ``/health_generate`` and the router
    lists all of them as healthy; it raises (after stopping what it started) otherwise.
    """

    def __init__(self, server_args: ServerArgs, router_args: RouterArgs) -> None:
        self.server_args = server_args
        self.router_args = ra = router_args
        n = ra.dp_size
        base = ra.worker_base_port or server_args.port + 1
        cpu_sets = split_cpus(ra.replica_cpus, n)
        on_cuda = server_args.device == "cuda" or (
            server_args.device == "auto" and _cuda_available())
        tp = int(getattr(server_args, "tp_size", 1) or 1)
        gpu_sets: list[str | None] = list(split_gpus(ra.replica_gpus, n, tp)) if on_cuda \
            else [None] * n
        self.replicas: list[Replica] = []
        for i in range(n):
            port = base + i
            if ra.worker_base_port is None and not _port_free(server_args.host, port):
                port = free_port(_client_host(server_args.host))
            kw: dict[str, Any] = {"port": port, "host": server_args.host}
            if cpu_sets[i] is not None and server_args.num_threads is None:
                kw["num_threads"] = len(cpu_sets[i])  # type: ignore[arg-type]
            self.replicas.append(Replica(i, server_args.replace(**kw), cpu_sets[i], gpu_sets[i]))
        self.url = f"http://{_client_host(server_args.host)}:{server_args.port}"
        self.router: subprocess.Popen[bytes] | None = None
        self._router_log: IO[bytes] | None = None
        try:
            for r in self.replicas:
                self._start_replica(r)
            for r in self.replicas:
                self._wait_replica(r, ra.replica_start_timeout)
            self._start_router()
            self._wait_router(120.0)
        except BaseException:
            self.shutdown()
            raise

    # ---- replicas ---------------------------------------------------------------------------
    def _open_log(self, name: str) -> IO[bytes] | None:
        if not self.router_args.log_dir:
            return None
        Path(self.router_args.log_dir).mkdir(parents=True, exist_ok=True)
        return open(Path(self.router_args.log_dir) / f"{name}.log", "ab")  # noqa: SIM115

    def _start_replica(self, r: Replica) -> None:
        env = _child_env()
        if r.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = r.gpus
        cpus = r.cpus
        cmd = [sys.executable, "-m", "dspark_sglang.launch_server", *server_cli_args(r.args)]
        if r.log is None:
            r.log = self._open_log(f"replica{r.index}")

        def pin() -> None:
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        r.proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=pin,
                                  stdout=r.log, stderr=subprocess.STDOUT if r.log else None)
        logger.info("replica %d: pid %d on %s (cpus %s, gpus %s)", r.index, r.proc.pid, r.url,
                    cpus, r.gpus)

    def _wait_replica(self, r: Replica, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert r.proc is not None
            if r.proc.poll() is not None:
                raise RuntimeError(f"replica {r.index} ({r.url}) exited with code "
                                   f"{r.proc.returncode} during start-up")
            with contextlib.suppress(requests.RequestException):
                if requests.get(r.url + "/health_generate", headers=self._headers(),
                                timeout=30).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"replica {r.index} ({r.url}) not ready within {timeout} s")

    def restart_replica(self, index: int, wait: bool = True) -> Replica:
        """Stop replica ``index`` if it still runs, start it again on the same port."""
        r = self.replicas[index]
        stop_process_group(r.proc)
        r.restarts += 1
        self._start_replica(r)
        if wait:
            self._wait_replica(r, self.router_args.replica_start_timeout)
        return r

    def supervise_once(self) -> list[int]:
        """Restart dead replicas while restarts are left; the indexes of replicas restarted."""
        restarted = []
        for r in self.replicas:
            if r.proc is not None and r.proc.poll() is not None:
                if r.restarts >= self.router_args.max_replica_restarts:
                    continue
                logger.warning("replica %d exited (code %s): restarting", r.index,
                               r.proc.returncode)
                self.restart_replica(r.index, wait=False)
                restarted.append(r.index)
        return restarted

    # ---- router -----------------------------------------------------------------------------
    def router_command(self) -> list[str]:
        ra, sa = self.router_args, self.server_args
        prom = ra.router_prometheus_port or free_port()
        cmd = [sys.executable, "-m", ra.router_module,
               "--host", sa.host, "--port", str(sa.port),
               "--worker-urls", *[r.url for r in self.replicas],
               "--policy", ra.router_policy,
               "--prometheus-host", _client_host(sa.host), "--prometheus-port", str(prom),
               "--health-check-interval-secs", str(ra.router_health_check_interval_secs),
               "--log-level", "warn" if sa.log_level in ("warning", "error") else sa.log_level]
        if sa.api_key:
            cmd += ["--api-key", sa.api_key]
        return cmd + shlex.split(ra.router_args)

    def _start_router(self) -> None:
        self._router_log = self._open_log("router")
        self.router = subprocess.Popen(
            self.router_command(), env=_child_env(), start_new_session=True,
            stdout=self._router_log, stderr=subprocess.STDOUT if self._router_log else None)
        logger.info("router: pid %d on %s", self.router.pid, self.url)

    def healthy_workers(self) -> list[str]:
        """URLs the router currently lists as healthy (empty when it does not answer)."""
        try:
            body = requests.get(self.url + "/workers", headers=self._headers(), timeout=5).json()
        except (requests.RequestException, ValueError):
            return []
        return [w["url"] for w in body.get("workers", []) if w.get("is_healthy")]

    def _wait_router(self, timeout: float) -> None:
        want = {r.url for r in self.replicas}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.router is not None
            if self.router.poll() is not None:
                raise RuntimeError(f"router exited with code {self.router.returncode}")
            if want <= set(self.healthy_workers()):
                return
            time.sleep(0.2)
        raise TimeoutError(f"router did not list {sorted(want)} as healthy within {timeout} s")

    def _headers(self) -> dict[str, str]:
        key = self.server_args.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    # ---- lifetime ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Router first (no new traffic), then every replica; idempotent."""
        router, self.router = self.router, None
        stop_process_group(router, grace=5.0)
        for r in self.replicas:
            proc, r.proc = r.proc, None
            stop_process_group(proc)
        for f in [self._router_log, *(r.log for r in self.replicas)]:
            if f is not None:
                f.close()
        self._router_log = None
        for r in self.replicas:
            r.log = None

    def serve_forever(self, poll_s: float = 1.0) -> None:
        """Block until SIGINT / SIGTERM or the router exits; restart replicas as allowed."""
        stop = {"flag": False}

        def _on_signal(signum: int, _frame: Any) -> None:
            stop["flag"] = True

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        while not stop["flag"]:
            if self.router is None or self.router.poll() is not None:
                logger.error("router exited; shutting down")
                break
            self.supervise_once()
            time.sleep(poll_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def add_router_cli_args(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(RouterArgs):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind.startswith("int"):
            parser.add_argument(flag, type=int, default=f.default)
        elif kind.startswith("float"):
            parser.add_argument(flag, type=float, default=f.default)
        else:
            choices = ROUTER_POLICIES if f.name == "router_policy" else None
            parser.add_argument(flag, type=str, default=f.default, choices=choices)


def parse_args(argv: list[str]) -> tuple[ServerArgs, RouterArgs]:
    parser = argparse.ArgumentParser(prog="python -m dspark_sglang.launch_router")
    ServerArgs.add_cli_args(parser)
    add_router_cli_args(parser)
    ns = parser.parse_args(argv)
    names = {f.name for f in dataclasses.fields(RouterArgs)}
    ra = RouterArgs(**{k: v for k, v in vars(ns).items() if k in names})
    return ServerArgs.from_cli_args(ns), ra


def main(argv: list[str] | None = None) -> None:
    server_args, router_args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=server_args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dep = RouterDeployment(server_args, router_args)
    try:
        logger.info("router ready on %s with %d replicas: %s", dep.url, len(dep.replicas),
                    ", ".join(r.url for r in dep.replicas))
        print(f"READY {dep.url}", flush=True)
        dep.serve_forever()
    finally:
        dep.shutdown()


if __name__ == "__main__":
    main()
