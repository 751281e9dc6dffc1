"""DDP, DiLoCo and Streaming DiLoCo over a real slow link, on diloco_lm.py's model and data.

    python examples/diloco_slow_link.py [--rate 100mbit] [--steps 600] [--k 24]   # as root
    python examples/diloco_slow_link.py --quick                                   # a smoke run
    python examples/diloco_slow_link.py --depth 12 --only 8-bit    # a bigger model, some rows

Two worker processes (`diloco_train.py`, gloo, one thread each), each in a network namespace of
its own (``lhbench-<pid>-0`` and ``-1``), joined by a veth pair whose two ends tc's token bucket
filter (tbf) limits to ``--rate``: whatever one worker sends the other crosses that link, and
nothing else does. Each configuration trains the same steps, and this prints one table:

- time per step: of each step, the mean of the two workers', its median, the median over the
  sync steps (where a sync lands: every step for DDP, every k/F for DiLoCo) and the maximum; and
  the wall time per step, the slower worker's total over the steps, also against the run with no
  communication at all (``local``: DiLoCo's training, outer step included, without the average).
  The slower worker's, because workers that sync wait for each other: they go at the pace of the
  slower one, which those that never sync do not. This machine's speed drifts between runs (the
  same run's median step by up to 40% here), so the time target compares each run's wall time
  over its own median step ("x median": what its syncs, and the waits for the slower worker they
  bring, add to a step with none; DDP's every step syncs, so for DDP it says nothing) with the
  same for no communication;
- bytes each worker's interface actually sent (its ``tx_bytes``, read before every optimizer
  step: frames, TCP/IP headers and acknowledgements included): per step on average, and the most
  in one sync's window, from the optimizer step after the previous sync to the one after this sync
  (it holds the whole average, started up to k/F - 1 steps early, and its last frames, which drain
  during the next forward and backward passes). DDP's syncs follow one another with no gap, so its
  peak holds some frames of its neighbours';
- the final validation loss (DiLoCo's on its slow weights; ``local``'s is worker 0's replica,
  which saw half the samples), against blocking DiLoCo's.

Time and bytes leave out the first cycle (k steps): it holds the first step's allocations and the
broadcast of the starting weights when DiLoCo takes its slow weights. Needs root, ``ip netns`` and
tc's tbf; without them it says why and exits with status 0, having run nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

TRAIN = Path(__file__).resolve().parent / "diloco_train.py"
ADDRESSES = ("10.231.0.1", "10.231.0.2")  # private, and only inside the two namespaces


class LinkUnavailable(Exception):
    """The machine cannot make the namespaces or the rate-limited link."""


def unavailable() -> str | None:
    """Why this machine cannot run the benchmark, or None if it may (the namespaces can still
    be refused when made: :class:`SlowLink` says so then)."""
    if os.geteuid() != 0:
        return "needs root, to make network namespaces and shape their link"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs iproute2's {' and '.join(missing)}"
    return None


def _command(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LinkUnavailable(f"`{' '.join(args)}` failed: {done.stderr.strip()}")


class SlowLink:
    """Two network namespaces joined by a veth pair, both ends rate-limited by tbf; removed (with
    the veth pair, which goes with its namespaces) on leaving, also after a failure."""

    def __init__(self, rate: str) -> None:
        self.rate = rate
        tag = os.getpid()
        self.namespaces = (f"lhbench-{tag}-0", f"lhbench-{tag}-1")
        self.interfaces = (f"lhb{tag}a", f"lhb{tag}b")  # at most 15 characters

    def __enter__(self) -> SlowLink:
        try:
            for namespace in self.namespaces:
                _command("ip", "netns", "add", namespace)
            _command(
                "ip", "link", "add", self.interfaces[0], "type", "veth",
                "peer", "name", self.interfaces[1],
            )  # fmt: skip
            for namespace, interface, address in zip(self.namespaces, self.interfaces, ADDRESSES):
                _command("ip", "link", "set", interface, "netns", namespace)
                # No IPv6 address: its neighbour discovery would send frames of its own.
                _command("ip", "-n", namespace, "link", "set", interface, "addrgenmode", "none")
                _command("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", interface)
                _command("ip", "-n", namespace, "link", "set", interface, "up")
                _command("ip", "-n", namespace, "link", "set", "lo", "up")
                # A burst of a few frames: a larger bucket would let a fragment's average (some
                # 140 kB) through at the veth's own speed.
                _command(
                    "tc", "-n", namespace, "qdisc", "add", "dev", interface, "root",
                    "tbf", "rate", self.rate, "burst", "8kb", "latency", "100ms",
                )  # fmt: skip
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.remove()

    def remove(self) -> None:
        for namespace in self.namespaces:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
        # A pair that failed to move into the namespaces is still here.
        subprocess.run(["ip", "link", "del", self.interfaces[0]], capture_output=True, check=False)

    def drops(self) -> int:
        """Packets the two tbf queues dropped (TCP would resend them: more bytes sent)."""
        total = 0
        for namespace, interface in zip(self.namespaces, self.interfaces):
            shown = subprocess.run(
                ["tc", "-n", namespace, "-s", "-j", "qdisc", "show", "dev", interface],
                capture_output=True,
                text=True,
                check=True,
            )
            total += sum(qdisc["drops"] for qdisc in json.loads(shown.stdout))
        return total

    def command(self, worker: int, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[worker], *args]


# Measures the link: worker 1's namespace receives a stream from worker 0's and acknowledges its
# end, so the rate is what crossed the link, not what the sender's buffers took.
_RECEIVE = """
import socket, sys
server = socket.create_server((sys.argv[1], 5201))
print("ready", flush=True)
peer, _ = server.accept()
while peer.recv(1 << 16):
    pass
peer.sendall(b"k")
"""
_SEND = """
import socket, sys, time
stream = socket.create_connection((sys.argv[1], 5201))
payload = bytes(int(sys.argv[2]))
started = time.perf_counter()
stream.sendall(payload)
stream.shutdown(socket.SHUT_WR)
stream.recv(1)
print(len(payload) * 8 / (time.perf_counter() - started) / 1e6)
"""


def measure_link(link: SlowLink, payload: int) -> float:
    """Mbit/s of one TCP stream of ``payload`` bytes from worker 0's namespace to worker 1's."""
    with subprocess.Popen(
        link.command(1, [sys.executable, "-c", _RECEIVE, ADDRESSES[1]]),
        stdout=subprocess.PIPE,
        text=True,
    ) as receiver:
        try:
            assert receiver.stdout is not None
            receiver.stdout.readline()  # listening
            sent = subprocess.run(
                link.command(0, [sys.executable, "-c", _SEND, ADDRESSES[1], str(payload)]),
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            )
            return float(sent.stdout)
        finally:
            receiver.kill()


@dataclass(frozen=True)
class Config:
    name: str
    args: tuple[str, ...]
    period: int | None  # steps from one sync to the next (None: never syncs)


def configs(k: int, fragments: int, delay: int, balanced: bool) -> dict[str, Config]:
    """The rows: no communication, DDP, blocking DiLoCo, streaming with no delay, with ``delay``
    (in fp32, bf16 and 8 bits) and with the longest delay there is, k / F - 1 steps; with
    ``balanced``, streaming's fragments are lists of about equal bytes."""
    stream = ("--mode", "diloco", "--fragments", str(fragments))
    stream += ("--balanced",) if balanced else ()
    delayed = (*stream, "--sync-delay", str(delay))
    every = k // fragments
    chosen = {
        "none": Config("no communication", ("--mode", "local"), None),
        "ddp": Config("DDP", ("--mode", "ddp"), 1),
        "diloco": Config("DiLoCo", ("--mode", "diloco"), k),
        "stream": Config(f"streaming F={fragments} τ=0", stream, every),
        "delayed": Config(f"streaming F={fragments} τ={delay}", delayed, every),
    }
    if every - 1 > delay:
        longest = (*stream, "--sync-delay", str(every - 1))
        chosen["longest"] = Config(f"streaming F={fragments} τ={every - 1}", longest, every)
    for name, dtype in (("bf16", "bfloat16"), ("8-bit", "int8")):
        chosen[name] = Config(
            f"streaming F={fragments} τ={delay} {name}",
            (*delayed, "--pseudo-gradient-dtype", dtype),
            every,
        )
    return chosen


def train(
    link: SlowLink, config: Config, steps: int, k: int, depth: int, port: int, timeout: float
) -> dict[str, Any]:
    """One run of diloco_train.py, a worker in each namespace; what worker 0 wrote."""
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as files:
        out = Path(folder) / "result.json"
        logs = [files.enter_context(open(Path(folder) / f"{rank}.log", "w+")) for rank in (0, 1)]
        workers: list[subprocess.Popen[bytes]] = []
        try:
            for rank, interface in enumerate(link.interfaces):
                args = [sys.executable, str(TRAIN), *config.args, "--cpu", "--steps", str(steps)]
                args += ["--k", str(k), "--depth", str(depth), "--eval-every", str(steps)]
                args += ["--interface", interface]
                env = {
                    **os.environ,
                    "RANK": str(rank),
                    "WORLD_SIZE": "2",
                    "MASTER_ADDR": ADDRESSES[0],
                    "MASTER_PORT": str(port),
                    "GLOO_SOCKET_IFNAME": interface,
                    "OMP_NUM_THREADS": "1",
                }
                command = link.command(rank, [*args, "--out", str(out)])
                log = logs[rank]
                workers.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
            deadline = time.monotonic() + timeout
            for worker in workers:
                worker.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass  # killed below, and reported as failed
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
        failed = [rank for rank, worker in enumerate(workers) if worker.returncode != 0]
        if failed or not out.exists():
            for log in logs:
                log.seek(0)
            tails = "\n".join(
                f"--- worker {r}:\n{log.read()[-3000:]}" for r, log in enumerate(logs)
            )
            raise RuntimeError(f"{config.name}: workers {failed} failed or timed out\n{tails}")
        return json.loads(out.read_text())


@dataclass(frozen=True)
class Row:
    """One configuration's figures over the steps after the first cycle."""

    name: str
    median_ms: float
    sync_ms: float | None
    max_ms: float
    wall_ms: float  # the slower worker's time over the steps, per step
    overhead: float  # wall_ms over median_ms: what syncs and stragglers add to a plain step
    bytes_per_step: float
    bytes_per_sync: float | None  # the most one worker sent in one sync's window
    loss: float


def summarize(config: Config, result: dict[str, Any], warmup: int) -> Row:
    workers = result["per_worker"]
    seconds = [statistics.fmean(times) for times in zip(*(w["step_seconds"] for w in workers))]
    # Bytes sent since the start: [0], then before each step's optimizer step (1-based, as the
    # step counts are), then after the last step.
    readings = [w["interface_tx_bytes"] for w in workers]
    steps = range(warmup + 1, len(seconds) + 1)
    timed = [seconds[s - 1] for s in steps]
    sync_ms = None
    bytes_per_sync = None
    if config.period is not None:
        synced = [seconds[s - 1] for s in steps if s % config.period == 0]
        sync_ms = 1e3 * statistics.median(synced)
        # The sync at step s started in the optimizer step of step s - delay >= s + 1 - period,
        # after the previous sync's frames had drained, and its own drain before step s + 1's.
        syncs = range(warmup + config.period, len(seconds) + 1, config.period)
        bytes_per_sync = max(r[s + 1] - r[s + 1 - config.period] for r in readings for s in syncs)
    wall_ms = 1e3 * max(sum(w["step_seconds"][warmup:]) for w in workers) / len(timed)
    return Row(
        name=config.name,
        median_ms=1e3 * statistics.median(timed),
        sync_ms=sync_ms,
        max_ms=1e3 * max(timed),
        wall_ms=wall_ms,
        overhead=wall_ms / (1e3 * statistics.median(timed)),
        bytes_per_step=statistics.fmean((r[-1] - r[warmup + 1]) / len(timed) for r in readings),
        bytes_per_sync=bytes_per_sync,
        loss=result["curve"]["validation"][-1],
    )


def median_row(runs: Sequence[Row]) -> Row:
    """Each figure's median over the rounds of one configuration."""

    def median(values: list[Any]) -> Any:
        return None if values[0] is None else statistics.median(values)

    figures = [name for name in Row.__dataclass_fields__ if name != "name"]
    return Row(runs[0].name, **{name: median([getattr(r, name) for r in runs]) for name in figures})


def print_table(rows: dict[str, Row]) -> None:
    alone, blocking = rows["none"], rows["diloco"]
    print(
        f"{'config':<26}{'median ms':>10}{'sync ms':>9}{'max ms':>8}{'wall ms':>9}{'x none':>8}"
        f"{'x median':>10}{'bytes/step':>12}{'bytes/sync':>12}{'x DiLoCo':>10}{'loss':>8}"
        f"{'vs DiLoCo':>11}"
    )
    for row in rows.values():
        sync_ms = "-" if row.sync_ms is None else f"{row.sync_ms:.1f}"
        per_sync = "-" if row.bytes_per_sync is None else f"{row.bytes_per_sync:,.0f}"
        share = (
            "-"
            if row.bytes_per_sync is None or not blocking.bytes_per_sync
            else f"{row.bytes_per_sync / blocking.bytes_per_sync:.3f}"
        )
        print(
            f"{row.name:<26}{row.median_ms:>10.1f}{sync_ms:>9}{row.max_ms:>8.1f}"
            f"{row.wall_ms:>9.1f}{row.wall_ms / alone.wall_ms:>7.2f}x{row.overhead:>9.3f}x"
            f"{row.bytes_per_step:>12,.0f}"
            f"{per_sync:>12}{share:>10}{row.loss:>8.4f}{row.loss / blocking.loss - 1:>+10.1%}"
        )


def print_targets(rows: dict[str, Row], fragments: int) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    alone, blocking = rows["none"], rows["diloco"]
    print("targets:")
    for row in (rows[key] for key in ("delayed", "longest") if key in rows):
        slowdown = row.overhead / alone.overhead
        print(
            f"  {row.name}: wall time {row.overhead:.3f}x its median step, against "
            f"{alone.overhead:.3f}x with no communication: {slowdown:.2f}x (<= 1.15x): "
            f"{verdict(slowdown <= 1.15)} (wall times: {row.wall_ms / alone.wall_ms:.2f}x)"
        )
    for row in (rows[key] for key in ("stream", "delayed", "longest") if key in rows):
        assert row.bytes_per_sync is not None and blocking.bytes_per_sync is not None
        share = row.bytes_per_sync / blocking.bytes_per_sync
        print(
            f"  {row.name}: peak bytes per sync {share:.3f}x blocking DiLoCo's (<= 1/{fragments}"
            f" = {1 / fragments:.3f}): {verdict(share <= 1 / fragments)}"
        )
    if "8-bit" in rows:
        share = rows["8-bit"].bytes_per_step / rows["delayed"].bytes_per_step
        print(
            f"  {rows['8-bit'].name}: {share:.3f}x the bytes per step of fp32's "
            f"(<= 0.25): {verdict(share <= 0.25)}"
        )
    for key in ("stream", "delayed", "longest", "bf16", "8-bit"):
        if key in rows:
            gap = rows[key].loss / blocking.loss - 1
            print(
                f"  {rows[key].name}: final loss {gap:+.1%} against blocking DiLoCo's (within 2%):"
                f" {verdict(abs(gap) <= 0.02)}"
            )


@contextlib.contextmanager
def terminated_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that the namespaces are removed then too."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> dict[str, Row] | None:
    """Run and print everything; the rows, or None when the machine cannot (skipped)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="100mbit", help="tc's rate of each direction")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--k", type=int, default=24, help="inner steps per (full) sync")
    parser.add_argument("--fragments", type=int, default=4)
    parser.add_argument("--delay", type=int, default=1, help="the delayed streaming's sync_delay")
    parser.add_argument(
        "--balanced",
        action="store_true",
        help="streaming's fragments as lists of about equal bytes, not contiguous runs",
    )
    parser.add_argument(
        "--depth", type=int, default=2, help="the model's transformer blocks (diloco_lm.py's: 2)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["ddp", "stream", "longest", "bf16", "8-bit"],
        default=None,
        help="these rows, beside those the others are relative to (none, diloco, delayed)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of every configuration, interleaved; each figure is its median over them",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny run of 3 configurations, to check the runner"
    )
    parser.add_argument("--save", type=Path, default=None, help="every run's JSON, to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.k = 16, 8
    reason = unavailable()
    if reason is not None:
        print(f"skipped: {reason}")
        return None
    chosen = configs(args.k, args.fragments, args.delay, args.balanced)
    if args.quick or args.only is not None:  # the rows the table is relative to, and those asked
        kept = {"none", "diloco", "delayed", *(args.only or ())}
        chosen = {key: config for key, config in chosen.items() if key in kept}
    try:
        with terminated_as_exit(), SlowLink(args.rate) as link:
            rate = measure_link(link, payload=250_000 if args.quick else 2_500_000)
            print(
                f"link: veth pair between 2 network namespaces, tbf rate {args.rate} each way, "
                f"{rate:.1f} Mbit/s measured by one TCP stream; {args.steps} steps, k = {args.k}, "
                f"depth {args.depth}{', balanced fragments' if args.balanced else ''}, "
                f"first {args.k} steps left out of time and bytes"
            )
            # Rounds of every configuration in turn, so that a machine whose load drifts weighs
            # on all of them alike.
            rounds: dict[str, list[Row]] = {key: [] for key in chosen}
            results: dict[str, list[dict[str, Any]]] = {}
            port = 29500
            for round_ in range(args.repeats):
                for key, config in chosen.items():
                    result = train(link, config, args.steps, args.k, args.depth, port, args.timeout)
                    port += 1  # a fresh port: the last run's may still be closing
                    results.setdefault(key, []).append(result)
                    rounds[key].append(summarize(config, result, warmup=args.k))
                    wall_ms = rounds[key][-1].wall_ms
                    print(f"  round {round_ + 1}, {config.name}: {wall_ms:.1f} ms/step", flush=True)
            drops = link.drops()
    except LinkUnavailable as error:
        print(f"skipped: {error}")
        return None
    if args.save is not None:
        saved = {"args": {**vars(args), "save": str(args.save)}, "mbit_s": rate, "runs": results}
        args.save.write_text(json.dumps(saved))
    rows = {key: median_row(runs) for key, runs in rounds.items()}
    print_table(rows)
    print(f"the tbf queues dropped {drops} packets")
    print_targets(rows, args.fragments)
    return rows


if __name__ == "__main__":
    main()
