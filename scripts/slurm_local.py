"""A real one-host Slurm cluster in a directory, for trying the TorchX components on Slurm without a
cluster (and for the test that submits to it, tests/test_cluster.py).

    python scripts/slurm_local.py start /tmp/slurm     # prints: export SLURM_CONF=/tmp/slurm/slurm.conf
    SLURM_CONF=/tmp/slurm/slurm.conf torchx run -s slurm scripts/components.py:two_tower -- --epochs 1
    python scripts/slurm_local.py stop /tmp/slurm

It runs Debian's daemons (``apt-get install slurm-wlm slurmdbd munge mariadb-server``), each from a
configuration this script writes under the directory and nothing under /etc: munged (authentication,
with its own key, at munge's default socket, which Slurm 22.05 insists on; a munged already running
there, the system's, is used instead and left running), MariaDB (slurmdbd's store: TorchX reads a job's state with ``sacct``, which
needs accounting), slurmdbd, slurmctld and one slurmd whose node is this host, with its CPUs and
memory. Everything runs as the calling user, on ports chosen free at start; ``stop`` ends every
daemon it started (their PID files are in the directory). Standard library only: it runs before any
virtualenv exists.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged")  # stop order
PACKAGES = "slurm-wlm slurmdbd munge mariadb-server"
CLUSTER = "recsys"
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_tools() -> list[str]:
    tools = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct")
    return [t for t in tools if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _wait(what: str, ready, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise RuntimeError(f"{what} did not come up in {timeout:.0f} s; {log}:\n{tail}")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def _munge_answers(socket_path: Path) -> bool:
    """Whether a munged at ``socket_path`` encodes and decodes a credential."""
    if not socket_path.exists() or shutil.which("munge") is None:
        return False
    cred = _run(["munge", "-n", f"--socket={socket_path}"])
    if cred.returncode:
        return False
    out = subprocess.run(["unmunge", f"--socket={socket_path}"], input=cred.stdout, capture_output=True, text=True)
    return out.returncode == 0


def write_config(root: Path, ports: dict[str, int]) -> dict[str, Path]:
    """Every daemon's configuration under ``root``; returns the paths the daemons are started with."""
    user, host = getpass.getuser(), socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
    paths = {name: root / name for name in ("munge", "mysql", "state", "spool", "log", "run", "jobs")}
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    paths["munge"].chmod(0o700)
    key = paths["munge"] / "munge.key"
    if not key.exists():
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
    # Slurm 22.05 reaches munged at its default socket for slurmdbd's connections whatever AuthInfo
    # says: munged listens there (this cluster's, with its own key, or the system's when it runs)
    socket_path = MUNGE_SOCKET
    auth = "AuthType=auth/munge\n"
    run, log = paths["run"], paths["log"]
    dbd = root / "slurmdbd.conf"
    dbd.write_text(
        auth
        + f"DbdHost=localhost\nDbdPort={ports['slurmdbd']}\nSlurmUser={user}\n"
        + f"PidFile={run}/slurmdbd.pid\nLogFile={log}/slurmdbd.log\n"
        + f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\nStoragePort={ports['mariadb']}\n"
        + "StorageUser=slurm\nStoragePass=slurm\nStorageLoc=slurm_acct_db\n"
    )
    dbd.chmod(0o600)  # slurmdbd refuses a configuration others can read (it holds the password)
    conf = root / "slurm.conf"
    conf.write_text(
        f"ClusterName={CLUSTER}\nSlurmctldHost={host}(127.0.0.1)\n"
        + auth
        + f"SlurmUser={user}\nSlurmdUser={user}\n"
        + f"SlurmctldPort={ports['slurmctld']}\nSlurmdPort={ports['slurmd']}\n"
        + f"StateSaveLocation={paths['state']}\nSlurmdSpoolDir={paths['spool']}\n"
        + f"SlurmctldPidFile={run}/slurmctld.pid\nSlurmdPidFile={run}/slurmd.pid\n"
        + f"SlurmctldLogFile={log}/slurmctld.log\nSlurmdLogFile={log}/slurmd.log\n"
        # no cgroups here (a container may not delegate them): process groups track a job's processes
        + "ProctrackType=proctrack/pgid\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n"
        + "SelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\nMpiDefault=none\nReturnToService=2\n"
        + "AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\n"
        + f"AccountingStoragePort={ports['slurmdbd']}\n"
        + "MailProg=/bin/true\nSchedulerType=sched/backfill\nSchedulerParameters=sched_interval=1\nMinJobAge=600\n"
        + f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN\n"
        + f"PartitionName=local Nodes={host} Default=YES MaxTime=INFINITE State=UP\n"
    )
    return {**paths, "conf": conf, "dbd": dbd, "socket": socket_path, "key": key}


def start(root: Path) -> dict[str, str]:
    """Start the cluster under ``root`` (a fresh directory); returns the environment its clients need."""
    if missing := missing_tools():
        raise SystemExit(f"missing {', '.join(missing)}: apt-get install {PACKAGES}")
    root = root.resolve()
    if (root / "run").exists() and any((root / "run").glob("*.pid")):
        raise SystemExit(f"{root} holds a running cluster (PID files in {root / 'run'}): stop it first")
    ports = {name: free_port() for name in ("mariadb", "slurmdbd", "slurmctld", "slurmd")}
    p = write_config(root, ports)
    run, log, user = p["run"], p["log"], getpass.getuser()
    env = {**os.environ, "SLURM_CONF": str(p["conf"])}

    if _munge_answers(p["socket"]):
        # a munged already serves this host (the system's, started when the package was installed): every
        # daemon here is on this host, so its key is as good as ours; it is left running at stop
        print(f"using the munged already listening at {p['socket']}", file=sys.stderr)
    else:
        p["socket"].unlink(missing_ok=True)  # a stale socket of a munged that is gone
        try:
            p["socket"].parent.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise SystemExit(
                f"cannot create {p['socket'].parent}: make it yours (sudo mkdir -p {p['socket'].parent} && "
                f"sudo chown $(id -u) {p['socket'].parent}), as .ci/run does"
            ) from None
        subprocess.run(
            [_tool("munged"), "--force", f"--socket={p['socket']}", f"--key-file={p['key']}",
             f"--pid-file={run}/munged.pid", f"--log-file={log}/munged.log", f"--seed-file={p['munge']}/seed"],
            check=True,
        )  # fmt: skip
        _wait("munged", lambda: _munge_answers(p["socket"]), log / "munged.log")

    mysql = p["mysql"]
    if not (mysql / "mysql").exists():
        out = _run(
            [_tool("mariadb-install-db"), "--no-defaults", f"--datadir={mysql}", f"--user={user}",
             "--auth-root-authentication-method=normal", "--skip-test-db"]
        )  # fmt: skip
        if out.returncode:
            raise RuntimeError(f"mariadb-install-db failed:\n{out.stderr[-2000:]}")
    sock = run / "mysql.sock"
    with open(log / "mariadbd.out", "w") as out:
        subprocess.Popen(
            [_tool("mariadbd"), "--no-defaults", f"--datadir={mysql}", f"--socket={sock}", f"--port={ports['mariadb']}",
             "--bind-address=127.0.0.1", f"--pid-file={run}/mariadbd.pid", f"--log-error={log}/mariadbd.log",
             f"--user={user}", "--skip-name-resolve", "--innodb-buffer-pool-size=64M"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    _wait("MariaDB", lambda: _listening(ports["mariadb"]), log / "mariadbd.log")
    grant = (
        "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; "
        "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
    )
    out = _run([shutil.which("mariadb") or "mysql", "--no-defaults", f"--socket={sock}", "-uroot", "-e", grant])
    if out.returncode:
        raise RuntimeError(f"could not create slurmdbd's database user:\n{out.stderr}")

    subprocess.run([_tool("slurmdbd")], check=True, env=env)  # slurmdbd.conf: beside SLURM_CONF
    _wait("slurmdbd", lambda: _listening(ports["slurmdbd"]), log / "slurmdbd.log")
    subprocess.run([_tool("slurmctld"), "-f", str(p["conf"])], check=True, env=env)
    _wait("slurmctld", lambda: _run(["scontrol", "ping"], env).stdout.count("UP") > 0, log / "slurmctld.log")
    subprocess.run([_tool("slurmd"), "-f", str(p["conf"])], check=True, env=env)
    _wait(
        "slurmd (the node idle)",
        lambda: _run(["sinfo", "-h", "-o", "%t"], env).stdout.strip() == "idle",
        log / "slurmd.log",
    )
    return {"SLURM_CONF": str(p["conf"])}


def stop(root: Path) -> list[str]:
    """End every daemon started under ``root``; returns the ones that were running."""
    stopped = []
    for name in DAEMONS:
        pid_file = root / "run" / f"{name}.pid"
        if not pid_file.exists():
            continue
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            stopped.append(name)
            for _ in range(100):  # each daemon flushes its state before exiting
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, ValueError, IndexError):
            pass
        pid_file.unlink(missing_ok=True)
    return stopped


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("dir", type=Path, help="the cluster's directory (configuration, state, logs, PID files)")
    a = p.parse_args(argv)
    if a.action == "start":
        env = start(a.dir)
        print("\n".join(f"export {k}={v}" for k, v in env.items()))
    else:
        print("stopped: " + (", ".join(stop(a.dir)) or "nothing was running"), file=sys.stderr)


if __name__ == "__main__":
    main()
