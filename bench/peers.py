"""Peers measured on the same bed as fastpull: skopeo and containerd (``ctr``), each run cold.

Every measurement starts its processes inside the bed's namespace at once (each under GNU ``time``)
and waits for all of them with ``os.wait4``; a :class:`Sample` is the wall time until the last one
exits, the CPU seconds summed over them (user + system, including children they waited for) and their
peak RSS summed (an upper
bound on the peak of the sum: processes may peak at different moments). For containerd the daemon is
added: a fresh daemon with a fresh ``--root`` per measurement (so every pull is cold), its CPU from
``/proc/<pid>/stat`` after minus before the pull, its peak RSS as ``VmHWM`` (its whole life, start-up
included) from ``/proc/<pid>/status``.

Wall time includes each tool's start-up (for fastpull, the Python interpreter's: ~0.2 s).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from bed import REPO, ThrottledBed
from procs import become_subreaper, children, reap_orphans

sys.path.insert(0, str(REPO / "tests"))
import clients  # noqa: E402  (tests/clients.py: the private containerd the tests use too)

MiB = 1 << 20
_TICK = os.sysconf("SC_CLK_TCK")


class PeerError(RuntimeError):
    """A peer's command failed; the message quotes its output."""


@dataclass(frozen=True)
class Sample:
    """One measurement: ``procs`` processes started at once (``ok`` if all exited 0)."""

    tool: str
    wall: float
    cpu: float
    rss_mb: float
    procs: int = 1


def median(samples: list[Sample]) -> Sample:
    """Median wall and CPU; the largest peak RSS."""
    return Sample(
        tool=samples[0].tool,
        wall=statistics.median(s.wall for s in samples),
        cpu=statistics.median(s.cpu for s in samples),
        rss_mb=max(s.rss_mb for s in samples),
        procs=samples[0].procs,
    )


def run_at_once(bed: ThrottledBed, tool: str, commands: list[list[str]], **popen: Any) -> Sample:
    """Start ``commands`` inside the bed together; wait for all; fail if any exits non-zero.

    Each command runs under GNU ``time``, which forks it from its own small image: the ``ru_maxrss``
    that ``os.wait4`` reports for a direct child also counts the RSS of the image it exec'd from (Linux
    keeps the old mm's high-water mark across exec), so for a child of this Python process it would be
    at least this process's RSS.

    Descendants that outlive their parent (e.g. a multiprocessing forkserver and its workers) would
    escape ``time``; this process is a child subreaper, so they are re-parented here, and their CPU
    and peak RSS are added when they are reaped (waited for up to ``_ORPHAN_WAIT`` s, then ended).
    """
    become_subreaper()
    before = set(children())
    with tempfile.TemporaryDirectory(prefix="measure-") as tmp:
        logs = [open(Path(tmp) / f"{i}.log", "wb+") for i in range(len(commands))]  # noqa: SIM115
        usage_files = [Path(tmp) / f"{i}.usage" for i in range(len(commands))]
        try:
            started = time.perf_counter()
            procs = [
                bed.popen(["/usr/bin/time", "-o", str(usage), "-f", "%U %S %M", *cmd],
                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **popen)
                for cmd, log, usage in zip(commands, logs, usage_files)
            ]
            failed = []
            for proc, log in zip(procs, logs):
                _, status, _ = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                bed.forget(proc)
                if proc.returncode != 0:
                    log.seek(0)
                    failed.append(f"{' '.join(map(str, proc.args))} -> {proc.returncode}:\n"
                                  f"{log.read()[-2000:].decode(errors='replace')}")
            wall = time.perf_counter() - started
        finally:
            for log in logs:
                log.close()
        if failed:
            raise PeerError(f"{tool}: {len(failed)} of {len(commands)} failed\n" + "\n".join(failed))
        cpu, rss = reap_orphans(before)
        for usage in usage_files:
            user, system, max_kib = usage.read_text().split()[-3:]
            cpu += float(user) + float(system)
            rss += int(max_kib) / 1024
    return Sample(tool, wall, cpu, rss, len(commands))


# ---- fastpull -------------------------------------------------------------------------------------


def fastpull_command(ref: str, layout: Path, options: dict[str, int] | None = None) -> list[str]:
    """``python -m fastpull pull`` with FetchOptions given as a dict (bytes for chunk_size;
    ``adaptive: False`` becomes ``--fixed``; ``join: False``, not a FetchOption, ``--no-join``)."""
    cmd = [sys.executable, "-m", "fastpull", "pull", ref, "--layout", str(layout)]
    flags = {"chunk_size": "--chunk-size", "chunks_per_blob": "--chunks-per-blob",
             "blobs_in_flight": "--blobs-in-flight", "max_transfers": "--max-transfers",
             "streams_per_connection": "--streams-per-connection"}
    for key, value in (options or {}).items():
        if key in ("adaptive", "join"):
            cmd += [] if value else ["--fixed" if key == "adaptive" else "--no-join"]
        elif key in flags:
            cmd += [flags[key], str(value / MiB if key == "chunk_size" else value)]
        else:
            raise ValueError(f"no CLI flag for FetchOptions.{key}")
    return cmd


def fastpull_flags(root: Path = REPO) -> set[str]:
    """The options ``fastpull pull`` accepts in the tree at ``root`` (they change between commits)."""
    out = subprocess.run([sys.executable, "-m", "fastpull", "pull", "--help"], capture_output=True, text=True,
                         cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, check=True).stdout
    return {word.strip("[],") for word in out.split() if word.startswith(("--", "[--"))}


# N pulls as threads of one process sharing one Puller: how a node prefetcher uses the Python API.
_ONE_PROCESS_DRIVER = """
import sys
from concurrent.futures import ThreadPoolExecutor
from fastpull import Puller
ref, layout, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Puller() as puller, ThreadPoolExecutor(n) as pool:
    list(pool.map(lambda _: puller.pull(ref, layout), range(n)))
"""


def measure_fastpull(bed: ThrottledBed, ref: str, work: Path, options: dict[str, int] | None = None,
                     concurrent: int = 1, label: str = "fastpull", root: Path = REPO, unpack: bool = False,
                     one_process: bool = False) -> Sample:
    """``concurrent`` ``fastpull pull`` processes of ``ref`` into one fresh layout.

    ``root`` is the directory holding the ``fastpull`` package to run (this tree by default). With
    ``unpack`` they also unpack into one fresh ``--snapshots`` directory (overlayfs lower dirs). With
    ``one_process``, the pulls are threads of one process sharing one ``Puller`` instead (default
    options only): no interpreter start-up per pull.
    """
    layout = Path(tempfile.mkdtemp(dir=work, prefix="fastpull-"))
    env = {**os.environ, "PYTHONPATH": str(root)}
    if one_process:
        commands = [[sys.executable, "-c", _ONE_PROCESS_DRIVER, ref, str(layout / "oci"), str(concurrent)]]
    else:
        cmd = fastpull_command(ref, layout / "oci", options)
        if unpack:
            cmd += ["--snapshots", str(layout / "snapshots")]
        commands = [cmd] * concurrent
    layout = layout / "oci"
    try:
        sample = run_at_once(bed, label, commands, cwd=root, env=env)
        if not (layout / "index.json").exists():
            raise PeerError(f"fastpull left no index.json in {layout}")
        return sample
    finally:
        shutil.rmtree(layout.parent, ignore_errors=True)


# ---- skopeo ----------------------------------------------------------------------------------------


def measure_skopeo(bed: ThrottledBed, ref: str, work: Path) -> Sample:
    """``skopeo copy docker://REF oci:DIR:TAG`` into a fresh directory (skopeo's defaults: 6 blobs at once)."""
    dest = Path(tempfile.mkdtemp(dir=work, prefix="skopeo-"))
    tag = ref.rsplit(":", 1)[1]
    try:
        cmd = ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
               f"docker://{ref}", f"oci:{dest}:{tag}"]
        sample = run_at_once(bed, "skopeo", [cmd])
        if not (dest / "index.json").exists():
            raise PeerError(f"skopeo left no index.json in {dest}")
        return sample
    finally:
        shutil.rmtree(dest, ignore_errors=True)


# ---- containerd ------------------------------------------------------------------------------------

class Containerd(clients.Containerd):
    """A private ``containerd`` (tests/clients.py) inside the bed, in a new directory under ``workdir``
    that is removed on exit, so every daemon starts cold."""

    def __init__(self, bed: ThrottledBed, workdir: Path):
        super().__init__(Path(tempfile.mkdtemp(dir=workdir, prefix="containerd-")), command_prefix=bed.prefix)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        super().__exit__(exc_type, exc, tb)
        # Snapshot mounts live in the daemon's private mount namespace (ip netns exec): gone with it.
        shutil.rmtree(self.workdir, ignore_errors=True)

    def https_hosts(self, ref: str) -> list[str]:
        """ctr flags for HTTPS to ``ref``'s host without verification: ctr 1.6 speaks plain HTTP
        to loopback hosts unless a ``hosts.toml`` names an https server."""
        host = ref.split("/", 1)[0]
        hosts_dir = self.workdir / "certs.d"
        (hosts_dir / host).mkdir(parents=True, exist_ok=True)
        (hosts_dir / host / "hosts.toml").write_text(
            f'server = "https://{host}"\n\n[host."https://{host}"]\n'
            '  capabilities = ["pull", "resolve"]\n  skip_verify = true\n')
        return ["--hosts-dir", str(hosts_dir), "--skip-verify"]

    def cpu_seconds(self) -> float:
        """The daemon's user + system CPU so far, with that of children it reaped."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / _TICK  # utime stime cutime cstime

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.pid)


def peak_rss_mb(pid: int | None) -> float:
    """A process's peak RSS over its whole life (``VmHWM``), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure_containerd(bed: ThrottledBed, ref: str, work: Path, concurrent: int = 1, unpack: bool = True,
                       tls: bool = False, hosts_dir: Path | None = None, label: str | None = None) -> Sample:
    """``concurrent`` ``ctr image pull --plain-http`` (or ``ctr content fetch`` if not ``unpack``;
    ``--skip-verify`` instead of ``--plain-http`` with ``tls``; ``--hosts-dir`` instead with ``hosts_dir``,
    e.g. a mirror's) of ``ref`` against a fresh daemon; the daemon's CPU and peak RSS are added to the
    clients'."""
    with Containerd(bed, work) as daemon:
        verb = ["images", "pull"] if unpack else ["content", "fetch"]
        if hosts_dir is not None:
            flags = ["--hosts-dir", str(hosts_dir)]
        else:
            flags = daemon.https_hosts(ref) if tls else ["--plain-http"]
        cmd = daemon.ctr_command(*verb, *flags, ref)
        before = daemon.cpu_seconds()
        label = label or ("containerd pull" if unpack else "containerd fetch")
        sample = run_at_once(bed, label, [cmd] * concurrent)
        cpu = daemon.cpu_seconds() - before
        rss = daemon.peak_rss_mb()
        if unpack and ref not in daemon.ctr("images", "ls", "-q").stdout.split():
            raise PeerError(f"containerd did not list {ref} after the pull")
        return Sample(sample.tool, sample.wall, sample.cpu + cpu, sample.rss_mb + rss, concurrent)


# ---- versions --------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Version strings of the peers and tools the bench runs."""
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            return "not installed"
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"

    import pycurl

    return {
        "skopeo": first_line(["skopeo", "--version"]),
        "containerd": first_line(["containerd", "--version"]),
        "ctr": first_line(["ctr", "--version"]),
        "docker-registry": first_line(["docker-registry", "--version"]),
        "python": sys.version.split()[0],
        "pycurl": pycurl.version,
        "kernel": os.uname().release,
    }
