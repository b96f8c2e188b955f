"""Multi-host start-up: a rendezvous that names missing hosts, `jax.distributed`, a collective self-test.

`jax.distributed.initialize` waits for every process and, when one never comes, kills the others
with SIGABRT from C++ once its timeout has passed, naming no host. So before it, the processes
meet at a plain TCP rendezvous on the coordinator's port: process 0 listens there, every other
process connects and says who it is, and process 0 answers all of them once everyone has come, or
after the timeout with an error naming the process ids (and hosts, where the environment lists
them) that did not. Every process then raises :class:`StartupError` with the same message instead
of hanging. Only then does JAX's coordination service take the port over.

After `jax.distributed.initialize`, a small all-gather over every device (the accelerator network,
not the coordinator's) checks that each process answers with its own id and the same number of
devices; process 0 prints a one-line summary. A collective that hangs cannot be cancelled, so a
watchdog ends the process with a message after the timeout.

    python -m internvl_jax.distributed --distributed            # on every TPU worker: the self-test alone
    python -m internvl_jax.distributed --coordinator HOST:PORT --num-processes N --process-id I
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import socket
import sys
import threading
import time

import numpy as np

# jax is imported inside the functions that need it: with an explicit coordinator, a missing host
# is reported without first waiting for jax to load.

DEFAULT_TIMEOUT = 300.0  # seconds; jax.distributed's own default
_RETRY_SECONDS = 0.5
# Exit status of a self-test that hung, from the watchdog thread (no exception can reach main).
_HUNG_EXIT = 3


class StartupError(RuntimeError):
    """The processes of a multi-host run could not all be brought up."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Who takes part: the coordinator (process 0's host:port), the process count and this process.

    ``hosts`` names the host of each process id where the environment lists them, else is empty.
    """

    coordinator: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None
    hosts: tuple[str, ...] = ()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.coordinator.rsplit(":", 1)
        return host.strip("[]"), int(port)

    def describe(self, process_ids) -> str:
        """"1 (worker-1), 3 (worker-3)": process ids with their hosts where known."""
        return ", ".join(f"{i} ({self.hosts[i]})" if self.hosts else str(i) for i in sorted(process_ids))


def _listed_hosts(num_processes: int) -> tuple[str, ...]:
    """Hosts in process order from the variables TPU pods and GKE set, when they list every process.

    A multi-slice run lists only its own slice's workers there, so no names are given then.
    """
    listed = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES")
    hosts = tuple(entry.split(":")[0] for entry in listed.split(",")) if listed else ()
    return hosts if len(hosts) == num_processes else ()


def resolve(coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> Cluster:
    """The cluster from explicit values, filling what is missing as `jax.distributed` would
    (TPU metadata, SLURM, Open MPI, Kubernetes)."""
    local_device_ids = None
    if None in (coordinator, num_processes, process_id):
        from jax._src import clusters  # no public API resolves these without initialising
        coordinator, num_processes, process_id, local_device_ids = \
            clusters.ClusterEnv.auto_detect_unset_distributed_params(
                coordinator, num_processes, process_id, None, None, int(timeout))
    if coordinator is None or num_processes is None or process_id is None:
        raise StartupError("no cluster detected: pass --coordinator HOST:PORT --num-processes N --process-id I")
    if not 0 <= process_id < num_processes:
        raise StartupError(f"process id {process_id} not in [0, {num_processes})")
    return Cluster(coordinator, num_processes, process_id,
                   tuple(local_device_ids) if local_device_ids is not None else None,
                   _listed_hosts(num_processes))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _send(connection: socket.socket, message: dict) -> None:
    connection.sendall((json.dumps(message) + "\n").encode())


def _receive(connection: socket.socket, deadline: float) -> dict:
    """One JSON line, waiting until `deadline` (time.monotonic()); raises OSError or ValueError."""
    data = b""
    while not data.endswith(b"\n"):
        connection.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = connection.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return json.loads(data)


def _lead_rendezvous(cluster: Cluster, timeout: float) -> list[str]:
    """Process 0: waits for every other process, answers all of them; the hosts in process order."""
    host, port = cluster.address
    # Listen where JAX's service will (all interfaces), or on loopback only for a local run.
    if _is_loopback(host):
        bind, family, dualstack = (host, port), socket.AF_INET6 if ":" in host else socket.AF_INET, False
    else:
        dualstack = socket.has_dualstack_ipv6()
        bind, family = ("", port), socket.AF_INET6 if dualstack else socket.AF_INET
    try:
        server = socket.create_server(bind, family=family, dualstack_ipv6=dualstack)
    except OSError as error:
        raise StartupError(f"process 0 cannot listen on {cluster.coordinator}: {error}") from None
    hosts = {0: socket.gethostname()}
    peers: list[socket.socket] = []
    problem = None
    deadline = time.monotonic() + timeout
    with server:
        while len(hosts) < cluster.num_processes and problem is None and time.monotonic() < deadline:
            server.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            try:
                hello = _receive(connection, min(deadline, time.monotonic() + 10.0))
                peer = int(hello["process_id"])
            except (OSError, ValueError, KeyError, TypeError):
                connection.close()  # not one of ours (a port scan, a health check): ignore it
                continue
            if hello.get("num_processes") != cluster.num_processes:
                problem = (f"process {peer} ({hello.get('host')}) was started with {hello.get('num_processes')} "
                           f"processes, process 0 with {cluster.num_processes}")
            elif peer in hosts:
                problem = (f"two processes claim id {peer}: hosts {hosts[peer]} and {hello.get('host')}")
            elif not 0 < peer < cluster.num_processes:
                problem = f"host {hello.get('host')} claims process id {peer}, not in [1, {cluster.num_processes})"
            hosts.setdefault(peer, str(hello.get("host")))
            peers.append(connection)
    if problem is None and len(hosts) < cluster.num_processes:
        missing = set(range(cluster.num_processes)) - set(hosts)
        joined = ", ".join(f"{i} ({hosts[i]})" for i in sorted(hosts))
        problem = (f"process(es) {cluster.describe(missing)} did not reach the rendezvous at {cluster.coordinator} "
                   f"within {timeout:.0f} s (joined: {joined}); is the program running there?")
    ordered = [hosts.get(i, "?") for i in range(cluster.num_processes)]
    for connection in peers:
        with connection:
            try:
                _send(connection, {"error": problem} if problem else {"hosts": ordered})
            except OSError:
                pass  # that process is gone; the others still get their answer
    if problem:
        raise StartupError(problem)
    return ordered


def _join_rendezvous(cluster: Cluster, timeout: float) -> list[str]:
    """Process i > 0: connects to process 0 (retrying until it listens) and waits for its answer."""
    deadline = time.monotonic() + timeout
    coordinator = f"process {cluster.describe([0])} at {cluster.coordinator}"
    while True:
        try:
            connection = socket.create_connection(cluster.address, timeout=max(deadline - time.monotonic(), 0.01))
            break
        except OSError as error:  # refused until process 0 listens; names may not resolve yet
            if time.monotonic() >= deadline:
                raise StartupError(f"{coordinator} did not answer within {timeout:.0f} s ({error}); "
                                   f"is the program running there?") from None
            time.sleep(_RETRY_SECONDS)
    with connection:
        _send(connection, {"process_id": cluster.process_id, "num_processes": cluster.num_processes,
                           "host": socket.gethostname()})
        # Process 0 answers within its own timeout, which started before this connection.
        try:
            answer = _receive(connection, time.monotonic() + timeout + 10.0)
        except (OSError, ValueError) as error:
            raise StartupError(f"{coordinator} took this process's hello but gave no answer ({error})") from None
    if "error" in answer:
        raise StartupError(answer["error"])
    return answer["hosts"]


def rendezvous(cluster: Cluster, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """Every process's host name, in process order, once all of them have come; else StartupError."""
    if cluster.process_id == 0:
        return _lead_rendezvous(cluster, timeout)
    return _join_rendezvous(cluster, timeout)


def _hung(message: str) -> None:
    print(f"distributed self-test failed: {message}", file=sys.stderr, flush=True)
    os._exit(_HUNG_EXIT)


def self_test(hosts: list[str], timeout: float = DEFAULT_TIMEOUT) -> str:
    """All-gathers (process id, local device count) over every device; returns the summary line.

    Raises StartupError when a process answers out of place or device counts differ.
    """
    import jax
    from jax.experimental import multihost_utils
    count = jax.process_count()
    watchdog = threading.Timer(timeout, _hung, [f"the all-gather over the {jax.device_count()} devices of "
                                                f"{count} processes (hosts {', '.join(hosts)}) did not finish "
                                                f"within {timeout:.0f} s"])
    watchdog.daemon = True
    watchdog.start()
    began = time.perf_counter()
    try:
        gathered = multihost_utils.process_allgather(np.array([jax.process_index(), jax.local_device_count()]))
    finally:
        watchdog.cancel()
    seconds = time.perf_counter() - began
    if list(gathered[:, 0]) != list(range(count)):
        raise StartupError(f"the all-gather returned process ids {list(gathered[:, 0])}, expected 0..{count - 1}")
    devices = {int(n) for n in gathered[:, 1]}
    if len(devices) > 1 or int(gathered[:, 1].sum()) != jax.device_count():
        counts = ", ".join(f"{i} ({host}): {int(n)}" for i, (host, n) in enumerate(zip(hosts, gathered[:, 1])))
        raise StartupError(f"processes see different device counts ({counts}; {jax.device_count()} in all)")
    return (f"distributed self-test passed: {count} processes × {devices.pop()} {jax.devices()[0].device_kind} "
            f"devices, all-gather {seconds * 1e3:.0f} ms; hosts {', '.join(hosts)}")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               timeout: float = DEFAULT_TIMEOUT) -> None:
    """Rendezvous, `jax.distributed.initialize`, self-test; raises StartupError naming what failed.

    Values left None are detected as `jax.distributed` does (TPU pods need none of them).
    """
    cluster = resolve(coordinator, num_processes, process_id, timeout)
    hosts = rendezvous(cluster, timeout)
    import jax
    jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id,
                               local_device_ids=cluster.local_device_ids, initialization_timeout=int(timeout),
                               coordinator_bind_address=cluster.coordinator if _is_loopback(cluster.address[0])
                               else None)
    summary = self_test(hosts, timeout)
    if cluster.process_id == 0:
        print(summary, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The multi-host flags shared by the command-line tools."""
    group = parser.add_argument_group("multi-host")
    group.add_argument("--distributed", action="store_true",
                       help="multi-host run with peers detected from the environment (TPU pods, SLURM, ...)")
    group.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host run elsewhere)")
    group.add_argument("--num-processes", type=int, default=None)
    group.add_argument("--process-id", type=int, default=None)
    group.add_argument("--init-timeout", type=float, default=DEFAULT_TIMEOUT,
                       help=f"seconds to wait for every process (default {DEFAULT_TIMEOUT:.0f})")


def initialize_from_args(args: argparse.Namespace) -> None:
    """Multi-host start-up when the flags ask for it; exits with the failure's message otherwise."""
    if not (args.distributed or args.coordinator):
        return
    try:
        initialize(args.coordinator, args.num_processes, args.process_id, args.init_timeout)
    except StartupError as error:
        raise SystemExit(f"multi-host start-up failed: {error}") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m internvl_jax.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not (args.distributed or args.coordinator):
        parser.error("pass --distributed or --coordinator HOST:PORT --num-processes N --process-id I")
    initialize_from_args(args)


if __name__ == "__main__":
    main()
