"""The command line: dispatch, and identical ``fastpull pull`` commands joining one pull (the
pull itself through the CLI is tested in test_pull.py)."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import blocked_on, flocks, wait_until

from fastpull.testbed.images import LayerSpec, build_image, push_image

MiB = 1 << 20


def _fastpull(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastpull", *args], capture_output=True, text=True, timeout=60)


def test_bench_hands_every_argument_to_the_bench_script():
    done = _fastpull("bench", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: bench_bed.py") and "--per-flow" in done.stdout


def test_help_lists_the_commands():
    done = _fastpull("--help")
    assert done.returncode == 0
    commands = done.stdout[done.stdout.index("{") + 1:done.stdout.index("}")].split(",")
    assert {"pull", "serve", "login", "logout", "images", "rm", "gc", "export", "demo", "bench"} <= set(commands)


def test_a_pull_builds_the_parser_of_pull_alone():
    """The other commands' parsers (and their modules) cost a pull's start-up; its own help is whole."""
    probe = ("import sys; from fastpull.cli.main import main\n"
             "try:\n    main(['-v', 'pull', '--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('fastpull.cli.serve', 'fastpull.cli.login') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.startswith("usage: fastpull pull") and "--blobs-in-flight" in done.stdout
    assert done.stdout.rstrip().endswith("[]")


def test_unknown_command_is_refused():
    done = _fastpull("push")
    assert done.returncode == 2 and "invalid choice: 'push'" in done.stderr


def test_a_bad_platform_is_refused_before_anything_is_fetched(tmp_path):
    done = _fastpull("pull", "127.0.0.1:1/x:y", "--layout", str(tmp_path / "l"), "--platform", "linux")
    assert done.returncode == 2 and "invalid platform 'linux'" in done.stderr
    assert not (tmp_path / "l").exists()


BAD_INPUT = [  # (arguments after the reference and --layout, exit status, what stderr must name)
    (["--frobnicate"], 2, "unrecognized arguments: --frobnicate"),
    (["--chunk-size", "0.01"], 2, "chunk_size must be at least 64 KiB"),
    (["--chunk-size", "nan"], 2, "argument --chunk-size"),
    (["--max-transfers", "-1"], 2, "argument --max-transfers"),
    (["--unpack-workers", "-1"], 2, "argument --unpack-workers"),
    (["--chunks-per-blob", "many"], 2, "argument --chunks-per-blob"),
    (["--streams-per-connection", "0"], 2, "argument --streams-per-connection"),
    (["--rootfs", "{tmp}/r", "--snapshots", "{tmp}/s"], 2, "not allowed with argument"),
    (["--rootfs", "{tmp}/a-file"], 1, "{tmp}/a-file"),
    (["--rootfs", "{tmp}/a-file/rootfs"], 1, "{tmp}/a-file/rootfs"),
    (["--rootfs", "/proc/fastpull-rootfs"], 1, "/proc/fastpull-rootfs"),
    (["--snapshots", "/proc/fastpull-snapshots"], 1, "unpack error at /proc/fastpull-snapshots"),
    (["--snapshots", "{tmp}/a-file"], 1, "unpack error at {tmp}/a-file"),
    (["--layout", "{tmp}/a-file"], 1, "{tmp}/a-file"),
]


@pytest.mark.parametrize(("extra", "status", "named"), BAD_INPUT, ids=[" ".join(extra) for extra, _, _ in BAD_INPUT])
def test_bad_input_gets_one_line_and_an_exit_status(registry, image_cache, tmp_path, extra, status, named):
    image = build_image([LayerSpec(MiB)], image_cache / "cli-bad-input")
    push_image(registry.url, "cli/bad", "v1", image)
    (tmp_path / "a-file").write_text("not a directory\n")
    extra = [a.format(tmp=tmp_path) for a in extra]
    done = _fastpull("pull", f"{registry.host}/cli/bad:v1", "--layout", str(tmp_path / "layout"), *extra)
    assert done.returncode == status and "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1 and named.format(tmp=tmp_path) in done.stderr, done.stderr


@pytest.mark.parametrize("reference", ["x:y:z", "host/Upper", "a@sha256:short"])
def test_a_bad_reference_is_a_usage_error(reference, tmp_path):
    done = _fastpull("pull", reference, "--layout", str(tmp_path / "l"))
    assert done.returncode == 2 and "invalid image reference" in done.stderr and len(done.stderr.splitlines()) == 1


def test_demo_refuses_sizes_below_one(tmp_path):
    for extra in (["--layers", "0"], ["--size-mb", "-1"]):
        done = _fastpull("demo", "--workdir", str(tmp_path), *extra)
        assert done.returncode == 2 and f"argument {extra[0]}" in done.stderr and "Traceback" not in done.stderr


def test_an_image_for_another_platform_is_refused_when_one_was_asked_for(registry, image_cache, tmp_path):
    image = build_image([LayerSpec(MiB)], image_cache / "cli-amd64", platform=("linux", "amd64", None))
    push_image(registry.url, "cli/amd64", "v1", image)
    done = _fastpull("pull", f"{registry.host}/cli/amd64:v1", "--layout", str(tmp_path / "l"), "--platform", "plan9/68k")
    assert done.returncode == 1 and "plan9/68k" in done.stderr and "linux/amd64" in done.stderr
    assert not (tmp_path / "l" / "index.json").exists()  # nothing tagged


def test_an_image_for_another_platform_is_pulled_with_a_warning_when_none_was_asked_for(
        registry, image_cache, tmp_path):
    image = build_image([LayerSpec(MiB)], image_cache / "cli-plan9", platform=("plan9", "68k", None))
    push_image(registry.url, "cli/plan9", "v1", image)
    done = _fastpull("pull", f"{registry.host}/cli/plan9:v1", "--layout", str(tmp_path / "l"))
    assert done.returncode == 0 and image.manifest_digest in done.stdout
    assert "WARNING" in done.stderr and "is an image for plan9/68k, not for this host" in done.stderr


def _join(leader_command: list[str], waiter_commands: list[list[str]], lock_dir: Path) -> list[tuple[int, str]]:
    """Run ``leader_command`` and, while it is held in flight, the waiters; the pid and stdout of
    each, leader first, once all succeeded."""
    leader = subprocess.Popen(leader_command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waiters: list[subprocess.Popen[str]] = []
    try:
        wait_until(lambda: lock_dir.is_dir() and (leader.pid, False) in flocks(lock_dir), "the first pull leads")
        os.kill(leader.pid, signal.SIGSTOP)  # keep it in flight until the others wait
        waiters = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for c in waiter_commands]
        wait_until(lambda: blocked_on(lock_dir) == len(waiters), "the identical pulls wait")
        os.kill(leader.pid, signal.SIGCONT)
        done = []
        for proc in [leader, *waiters]:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            done.append((proc.pid, out))
        return done
    finally:
        for proc in [leader, *waiters]:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.communicate()


def test_identical_pulls_in_flight_are_joined_not_repeated(registry, image_cache, tmp_path):
    """Three ``fastpull pull`` processes that start while an identical one is in flight wait for
    it and print its result: the registry sees one manifest request, not four."""
    image = build_image([LayerSpec(2 * MiB), LayerSpec(MiB)], image_cache / "cli-joined")
    push_image(registry.url, "cli/joined", "v1", image)
    ref = f"{registry.host}/cli/joined:v1"
    layout = tmp_path / "layout"
    command = [sys.executable, "-m", "fastpull", "pull", ref, "--layout", str(layout)]
    registry.clear_served()
    (leader, out), *waiters = _join(command, [command] * 3, layout / ".fastpull" / "pulls")
    assert image.manifest_digest in out and "shared with" not in out
    for _, w_out in waiters:
        assert w_out == out + f"  shared with process {leader}, which pulled it at the same time\n"
    manifest_gets = [r for r in registry.served() if r.method == "GET" and "/cli/joined/manifests/" in r.path]
    assert len(manifest_gets) == 1, manifest_gets

    # Once that flight has landed, the same command pulls again (the blobs are already there).
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "shared with" not in again.stdout and "0.0 MB fetched" in again.stdout


def test_pulls_that_differ_only_in_what_they_write_join_and_write_it_their_way(registry, image_cache, tmp_path):
    """A ``--json`` pull joined by a ``--json``, a text and a ``--quiet`` one: the joiners print
    the leader's ``resolved`` and ``pulled`` lines (``shared_with`` its pid), its report, its digest."""
    image = build_image([LayerSpec(2 * MiB)], image_cache / "cli-joined-json")
    push_image(registry.url, "cli/joinedjson", "v1", image)
    layout = tmp_path / "layout"
    command = [sys.executable, "-m", "fastpull", "pull", f"{registry.host}/cli/joinedjson:v1", "--layout", str(layout)]
    registry.clear_served()
    (leader, out), (_, json_out), (_, text_out), (_, quiet_out) = _join(
        [*command, "--json"], [[*command, "--json"], command, [*command, "-q"]], layout / ".fastpull" / "pulls")
    led = [json.loads(line) for line in out.splitlines()]
    assert led[0]["event"] == "resolved" and led[-1]["event"] == "pulled"
    assert [json.loads(line) for line in json_out.splitlines()] == [led[0], led[-1] | {"shared_with": leader}]
    assert text_out.startswith(f"pulled {led[-1]['reference']} -> {image.manifest_digest}\n")
    assert text_out.endswith(f"  shared with process {leader}, which pulled it at the same time\n")
    assert quiet_out == image.manifest_digest + "\n"
    assert len([r for r in registry.served() if r.method == "GET" and "/manifests/" in r.path]) == 1


def test_no_join_pulls_without_meeting_other_commands(registry, image_cache, tmp_path):
    image = build_image([LayerSpec(MiB)], image_cache / "cli-no-join")
    push_image(registry.url, "cli/nojoin", "v1", image)
    layout = tmp_path / "layout"
    done = _fastpull("pull", f"{registry.host}/cli/nojoin:v1", "--layout", str(layout), "--no-join")
    assert done.returncode == 0, done.stderr
    assert image.manifest_digest in done.stdout
    assert not (layout / ".fastpull" / "pulls").exists()


def test_a_layout_where_nothing_can_be_written_is_named_in_the_error(registry, image_cache):
    image = build_image([LayerSpec(MiB)], image_cache / "cli-no-join")
    push_image(registry.url, "cli/unwritable", "v1", image)
    done = _fastpull("pull", f"{registry.host}/cli/unwritable:v1", "--layout", "/proc/fastpull-layout")
    assert done.returncode == 1 and "/proc/fastpull-layout" in done.stderr and "Traceback" not in done.stderr


def test_a_terminal_sees_a_progress_bar_that_gives_way_to_the_report(registry, image_cache, tmp_path):
    image = build_image([LayerSpec(2 * MiB)], image_cache / "cli-progress")
    push_image(registry.url, "cli/progress", "v1", image)
    ref = f"{registry.host}/cli/progress:v1"
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "fastpull", "pull", ref, "--layout", str(tmp_path / "l"),
                                 "--rootfs", str(tmp_path / "rootfs")],
                                stdout=subprocess.PIPE, stderr=secondary, text=True,
                                env={**os.environ, "COLUMNS": "160"})
        os.close(secondary)
        secondary = -1
        terminal = b""
        while chunk := _read_pty(primary):
            terminal += chunk
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(primary)
        if secondary != -1:
            os.close(secondary)
    assert proc.returncode == 0 and image.manifest_digest in out
    screen = terminal.decode(errors="replace")
    mb = f"{image.total_size / 1e6:.1f}"
    last_frame = screen.rindex(f"{mb}/{mb} MB")  # every byte landed
    assert f"pulling {ref}" in screen and "\x1b[2K" in screen[last_frame:]  # then the bar is erased
    layer_mb = f"{image.layers[0].size / 1e6:.1f}"
    assert "unpacking" in screen and f"{layer_mb}/{layer_mb} MB" in screen  # and the unpack's, below it


def test_json_writes_each_event_of_a_real_pull_on_a_line_and_pulled_last(registry, image_cache, tmp_path):
    image = build_image([LayerSpec(3 * MiB), LayerSpec(MiB, files=4)], image_cache / "cli-json")
    push_image(registry.url, "cli/json", "v1", image)
    ref = f"{registry.host}/cli/json:v1"
    done = _fastpull("pull", ref, "--layout", str(tmp_path / "l"), "--rootfs", str(tmp_path / "r"), "--json",
                     "--chunk-size", "0.25")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "resolved" and kinds[-1] == "pulled" and set(kinds[1:-1]) <= {"progress", "layer"}
    assert events[0]["digest"] == image.manifest_digest
    assert [layer["digest"] for layer in events[0]["layers"]] == [d.digest for d in image.layers]
    for d in image.layers:
        assert [e["state"] for e in events if e["event"] == "layer" and e["digest"] == d.digest] == ["fetched", "unpacked"]
    last_progress = [e for e in events if e["event"] == "progress"][-1]
    assert last_progress["done"] == last_progress["total"] == image.total_size
    assert last_progress["unpacked"] == last_progress["unpack_total"] == sum(d.size for d in image.layers)
    pulled = events[-1]
    assert pulled["digest"] == image.manifest_digest and pulled["reference"] == ref and pulled["layers"] == 2
    assert pulled["rootfs"] == str(tmp_path / "r") and pulled["fetched"] == pulled["bytes"]
    assert 0 < pulled["download_seconds"] <= pulled["seconds"] and 0 < pulled["unpack_seconds"] <= pulled["seconds"]


def test_json_ends_with_the_error_and_its_fields(registry, tmp_path):
    done = _fastpull("pull", f"{registry.host}/cli/absent:v1", "--layout", str(tmp_path / "l"), "--json")
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1 and "cli/absent" in done.stderr
    (error,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert error["event"] == "error" and error["kind"] == "RegistryError" and error["status"] == 404
    assert error["url"].endswith("/v2/cli/absent/manifests/v1") and error["message"] in done.stderr


def test_a_json_reader_that_leaves_does_not_stop_the_pull(registry, image_cache, tmp_path):
    image = build_image([LayerSpec(MiB)], image_cache / "cli-json-gone")
    push_image(registry.url, "cli/jsongone", "v1", image)
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stdout fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "fastpull", "pull", f"{registry.host}/cli/jsongone:v1",
                               "--layout", str(tmp_path / "l"), "--json"], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == 0 and done.stderr == ""
    assert image.manifest_digest in (tmp_path / "l" / "index.json").read_text()


def test_quiet_writes_the_digest_only_and_verbose_says_what_the_engine_did(registry, image_cache, tmp_path):
    image = build_image([LayerSpec(MiB)], image_cache / "cli-quiet")
    push_image(registry.url, "cli/quiet", "v1", image)
    ref = f"{registry.host}/cli/quiet:v1"
    quiet = _fastpull("pull", ref, "--layout", str(tmp_path / "q"), "-q")
    assert quiet.returncode == 0 and (quiet.stdout, quiet.stderr) == (image.manifest_digest + "\n", "")
    verbose = _fastpull("-v", "pull", ref, "--layout", str(tmp_path / "v"), "--rootfs", str(tmp_path / "r"))
    assert verbose.returncode == 0 and "unpacked in" in verbose.stdout and "s in all" in verbose.stdout
    assert f"{ref} is {image.manifest_digest} (single-platform, 1 layers" in verbose.stderr
    assert f"to fetch from http://{registry.host}" in verbose.stderr and "new connections" in verbose.stderr


@pytest.mark.parametrize("keep", [False, True])
def test_demo_removes_what_it_built_unless_kept(tmp_path, keep):
    done = subprocess.run([sys.executable, "-m", "fastpull", "demo", "--size-mb", "2", "--layers", "1",
                           *(["--keep"] if keep else [])], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0 and "pulled " in done.stdout, done.stderr
    (work,) = [p for p in tmp_path.iterdir() if p.name.startswith("fastpull-demo-")] if keep else [None]
    if keep:
        assert {p.name for p in work.iterdir()} == {"image", "registry", "layout"}
        assert f"the layout in {work / 'layout'}" in done.stdout
    else:
        assert not list(tmp_path.iterdir())

    given = tmp_path / "given"
    given.mkdir()
    (given / "mine").write_text("not the demo's\n")
    done = _fastpull("demo", "--size-mb", "2", "--layers", "1", "--workdir", str(given), *(["--keep"] if keep else []))
    assert done.returncode == 0, done.stderr
    assert {p.name for p in given.iterdir()} == ({"mine", "image", "registry", "layout"} if keep else {"mine"})


def _read_pty(fd: int) -> bytes:
    """The next bytes from a pty, or b"" once the other side has closed (Linux raises EIO)."""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


@pytest.mark.parametrize(("given", "streams"), [([], 1), (["--streams-per-connection", "4"], 4),
                                                (["--streams-per-connection", "auto"], None)])
def test_streams_per_connection_is_one_unless_asked(given, streams):
    from fastpull.cli.main import build_parser, fetch_options

    args = build_parser().parse_args(["pull", "127.0.0.1:1/x:y", "--layout", "unused", *given])
    assert fetch_options(args).streams_per_connection == streams
