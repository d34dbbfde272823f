"""Tests for the TPU VM scripts in launch/: the exact commands each prints under --dry-run, flag
errors, the watch/relaunch loop and the queued wait run for real against a fake gcloud (remote
commands executed by bash in a temporary HOME), and shellcheck on every script."""
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers

pytestmark = pytest.mark.unit
ROOT = Path(helpers.REPO)
LAUNCH = ROOT / "launch"
ENTRY_SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh") if p.name != "common.sh")

SCOPE = ["--name=clu-test", "--zone=us-east5-a", "--project=proj-1"]
SLICE = ["--accelerator-type=v5p-32", "--version=v2-alpha-tpuv5"]
WORKDIR = "gs://my-bucket/runs/run1"
# Spaces, both quote kinds and a $ that must reach train.py literally, through two shells.
TRICKY = """--config.note=it's a "b" $HOME"""
OVERRIDES = [
    "--config.total_steps=1000", "--config.mesh=(('data', 1), ('fsdp', -1), ('tensor', 1))",
    "--config.data.data_dir=~/clusterstm_data", TRICKY,
]
EXPECTED_TRAIN_ARGV = [
    "-m", "clusterstm_jax.train", "--config=configs/pretrain.py:paper", f"--workdir={WORKDIR}",
    "--distributed", *OVERRIDES,
]


def _write_exe(path: Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def env(tmp_path):
  """An environment whose `gcloud` is a fake that records each call (argv, one JSON line)."""
  fake = tmp_path / "fake"
  _write_exe(fake / "bin" / "gcloud", f"""#!{sys.executable}
import json, os, subprocess, sys, time
d = os.environ["FAKE_DIR"]
argv = sys.argv[1:]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
  f.write(json.dumps(argv) + "\\n")
if "describe" in argv:  # pops the next state; the last one sticks
  path = os.path.join(d, "states")
  states = open(path).read().split()
  if len(states) > 1:
    open(path, "w").write("\\n".join(states[1:]))
  if states[0] == "MISSING":
    sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource was not found")
  if states[0] == "FLAKY":
    sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) UNAVAILABLE: try again")
  print(states[0])
elif "ssh" in argv:
  cmd = next(a for a in argv if a.startswith("--command="))[len("--command="):]
  if "pip install" in cmd:  # the install step would call apt and pip: recorded only
    sys.exit(0)
  rc = subprocess.run(["bash", "-c", cmd], cwd=os.environ["HOME"]).returncode
  # Wait for the detached run to end, so the checks that follow see a fixed sequence.
  exit_file = os.path.join(os.environ["HOME"], "clusterstm_train.exit")
  deadline = time.time() + 20
  while "clusterstm_train.pid" in cmd and "echo running" not in cmd and \
      not os.path.exists(exit_file) and time.time() < deadline:
    time.sleep(0.01)
  sys.exit(rc)
""")
  home = tmp_path / "home"
  (home / "clusterstm_jax").mkdir(parents=True)
  # Stands in for the venv's python: records its argv and working directory.
  _write_exe(home / "clusterstm_venv" / "bin" / "python", """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$FAKE_DIR/python_argv"
pwd > "$FAKE_DIR/python_cwd"
echo "fake train log line"
exit "${FAKE_TRAIN_EXIT:-0}"
""")
  return {
      **os.environ, "PATH": f"{fake / 'bin'}{os.pathsep}{os.environ['PATH']}",
      "FAKE_DIR": str(fake), "HOME": str(home), "TMPDIR": str(tmp_path),
  }


def launch(script, *args, env, timeout=60):
  return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                        env=env, timeout=timeout, cwd=ROOT)


def printed(stdout: str) -> list[list[str]]:
  """The '+ cmd' lines of a dry run, each split as a shell would split it."""
  lines = stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), stdout
  return [shlex.split(line[2:]) for line in lines]


def calls(env) -> list[list[str]]:
  path = Path(env["FAKE_DIR"]) / "calls.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def flag(argv: list[str], name: str) -> str:
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def remote_words(argv: list[str]) -> list[str]:
  """The --command of a `tpu-vm ssh`, split as the worker's shell splits it."""
  lexer = shlex.shlex(flag(argv, "command"), posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def train_argv(argv: list[str]) -> list[str]:
  words = remote_words(argv)
  start = words.index("-m")
  return words[start:words.index(";", start)]


def is_gcloud(argv, *sub):
  return argv[:3 + len(sub)] == ["gcloud", "compute", "tpus", *sub]


def check_scope(argv):
  assert flag(argv, "zone") == "us-east5-a" and flag(argv, "project") == "proj-1"


# ---------------------------------------------------------------------------------- dry runs


def test_create_dry_run(env):
  out = launch("create.sh", *SCOPE, *SLICE, "--dry-run", env=env)
  assert out.returncode == 0, out.stderr
  (cmd,) = printed(out.stdout)
  assert is_gcloud(cmd, "tpu-vm", "create") and cmd[5] == "clu-test"
  check_scope(cmd)
  assert flag(cmd, "accelerator-type") == "v5p-32" and flag(cmd, "version") == "v2-alpha-tpuv5"
  assert "--spot" not in cmd
  assert calls(env) == []  # nothing ran


def test_create_queued_dry_run_waits_for_active(env):
  out = launch("create.sh", *SCOPE, "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
               "--queued", "--spot", "--dry-run", env=env)
  assert out.returncode == 0, out.stderr
  create, describe = printed(out.stdout)
  assert is_gcloud(create, "queued-resources", "create") and create[5] == "clu-test"
  check_scope(create)
  assert flag(create, "node-id") == "clu-test" and flag(create, "accelerator-type") == "v4-32"
  assert flag(create, "runtime-version") == "tpu-ubuntu2204-base" and "--spot" in create
  assert is_gcloud(describe, "queued-resources", "describe")
  assert flag(describe, "format") == "value(state.state)"
  assert calls(env) == []


def test_install_dry_run_copies_repo_and_pins(env):
  jax_pin = next(line.split("==")[1].strip() for line in
                 (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("jax=="))
  env = {**env, "LIBTPU_FIND_LINKS": "https://example.com/libtpu.html"}
  out = launch("install.sh", *SCOPE, "--dry-run", env=env)
  assert out.returncode == 0, out.stderr
  archive, scp, ssh = printed(out.stdout)
  tarball = str(Path(env["TMPDIR"]) / "clusterstm_jax-clu-test.tgz")
  assert archive == ["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={tarball}",
                     "HEAD"]
  assert is_gcloud(scp, "tpu-vm", "scp") and scp[5:7] == [tarball, "clu-test:clusterstm_jax.tgz"]
  assert is_gcloud(ssh, "tpu-vm", "ssh") and ssh[5] == "clu-test"
  for cmd in (scp, ssh):
    check_scope(cmd)
    assert flag(cmd, "worker") == "all"
  words = remote_words(ssh)
  assert "$HOME/clusterstm_jax.tgz" in words and "venv" in words
  pip = words.index("-r")
  assert words[pip + 1:pip + 7] == ["$HOME/clusterstm_jax/requirements.txt",
                                    f"jax[tpu]=={jax_pin}", "-f",
                                    "https://example.com/libtpu.html", "-r",
                                    "$HOME/clusterstm_jax/requirements-gcs.txt"]
  assert not Path(tarball).exists() and calls(env) == []


def test_install_dry_run_clones_a_ref(env):
  out = launch("install.sh", *SCOPE, "--repo=https://github.com/me/clusterstm_jax.git",
               "--ref=abc123", "--dry-run", env=env)
  assert out.returncode == 0, out.stderr
  (ssh,) = printed(out.stdout)  # no copy step
  assert flag(ssh, "worker") == "all"
  words = remote_words(ssh)
  clone = words.index("clone")
  assert words[clone + 2:clone + 4] == ["https://github.com/me/clusterstm_jax.git",
                                        "$HOME/clusterstm_jax"]
  assert words[words.index("checkout") + 2] == "abc123"


def test_train_dry_run_quotes_overrides(env):
  out = launch("train.sh", *SCOPE, f"--workdir={WORKDIR}", *OVERRIDES, "--dry-run", env=env)
  assert out.returncode == 0, out.stderr
  (ssh,) = printed(out.stdout)
  assert is_gcloud(ssh, "tpu-vm", "ssh") and ssh[5] == "clu-test"
  check_scope(ssh)
  assert flag(ssh, "worker") == "all"
  assert train_argv(ssh) == EXPECTED_TRAIN_ARGV
  words = remote_words(ssh)
  # Detached: the run ignores SIGHUP and its output goes to the log, not to the ssh session.
  assert words[words.index("(") + 1:words.index("(") + 4] == ["trap", "", "HUP"]
  assert words[words.index(">>") + 1] == "$HOME/clusterstm_train.log"


def test_train_config_flag(env):
  out = launch("train.sh", *SCOPE, f"--workdir={WORKDIR}", "--config", "configs/pretrain.py:smoke",
               "--dry-run", env=env)
  (ssh,) = printed(out.stdout)
  assert train_argv(ssh)[2] == "--config=configs/pretrain.py:smoke"


def test_logs_and_delete_dry_run(env):
  (ssh,) = printed(launch("logs.sh", *SCOPE, "--worker=3", "--dry-run", env=env).stdout)
  assert flag(ssh, "worker") == "3"
  assert remote_words(ssh)[0] == "tail" and "-F" in remote_words(ssh)
  (delete,) = printed(launch("delete.sh", *SCOPE, "--dry-run", env=env).stdout)
  assert is_gcloud(delete, "tpu-vm", "delete") and delete[5] == "clu-test" and "--quiet" in delete
  check_scope(delete)
  (delete,) = printed(launch("delete.sh", *SCOPE, "--queued", "--dry-run", env=env).stdout)
  assert is_gcloud(delete, "queued-resources", "delete") and "--force" in delete
  assert calls(env) == []


def test_watch_dry_run_shows_relaunch(env):
  out = launch("watch.sh", *SCOPE, *SLICE, f"--workdir={WORKDIR}", *OVERRIDES, "--dry-run",
               env=env)
  assert out.returncode == 0, out.stderr
  cmds = printed(out.stdout)
  kinds = [c[3:5] if c[0] == "gcloud" else c[:1] for c in cmds]
  assert kinds == [["tpu-vm", "describe"], ["tpu-vm", "delete"], ["tpu-vm", "create"], ["git"],
                   ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
  assert flag(cmds[0], "format") == "value(state)"
  assert flag(cmds[2], "accelerator-type") == "v5p-32"
  assert "pip" in remote_words(cmds[5]) and train_argv(cmds[6]) == EXPECTED_TRAIN_ARGV
  assert calls(env) == []


# --------------------------------------------------------------------------------- bad flags


@pytest.mark.parametrize("script,args,missing", [
    ("create.sh", ["--zone=z", *SLICE], "--name"),
    ("create.sh", ["--name=n", *SLICE], "--zone"),
    ("create.sh", ["--name=n", "--zone=z", "--version=v"], "--accelerator-type"),
    ("create.sh", ["--name=n", "--zone=z", "--accelerator-type=v4-8"], "--version"),
    ("train.sh", ["--name=n", "--zone=z"], "--workdir"),
    ("watch.sh", ["--name=n", "--zone=z", *SLICE], "--workdir"),
    ("delete.sh", ["--name=n"], "--zone"),
    ("logs.sh", ["--zone=z"], "--name"),
    ("install.sh", ["--zone=z"], "--name"),
])
def test_missing_required_flag(env, script, args, missing):
  out = launch(script, *args, "--dry-run", env=env)
  assert out.returncode != 0 and out.stdout == ""
  assert f"missing required flag {missing}" in out.stderr


@pytest.mark.parametrize("script,args,message", [
    ("train.sh", ["--workdir=/tmp/run"], "must be a gs:// path"),
    ("create.sh", [*SLICE[1:], "--accelerator-type=v5p"], "is not a TPU type"),
    ("create.sh", [*SLICE, "--workdir=gs://b/r"], "unknown flag --workdir"),
    ("delete.sh", ["--config.x=1"], "takes no --config.* overrides"),
    ("install.sh", ["--ref=abc"], "--ref needs --repo"),
    ("logs.sh", ["--worker=first"], "--worker='first'"),
    ("delete.sh", ["stray"], "unexpected argument 'stray'"),
])
def test_bad_flag_value(env, script, args, message):
  out = launch(script, *SCOPE, *args, "--dry-run", env=env)
  assert out.returncode != 0 and message in out.stderr, out.stderr


def test_flag_without_value(env):
  out = launch("delete.sh", "--name", "--zone=z", "--dry-run", env=env)
  assert out.returncode != 0 and "flag --name needs a value" in out.stderr


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_help(env, script):
  out = launch(script, "--help", env=env)
  assert out.returncode == 0 and f"launch/{script} --name=NAME --zone=ZONE" in out.stdout


# ------------------------------------------------------------- real runs against a fake gcloud


def _states(env, *states):
  (Path(env["FAKE_DIR"]) / "states").write_text("\n".join(states))


def test_watch_relaunches_after_preemption_then_finishes(env):
  _states(env, "PREEMPTED", "READY")
  out = launch("watch.sh", *SCOPE, *SLICE, f"--workdir={WORKDIR}", *OVERRIDES, "--interval=0",
               env=env)
  assert out.returncode == 0, out.stderr
  assert "finished" in out.stderr
  made = calls(env)
  assert [c[2:4] + [flag(c, "worker")] if c[3] in ("ssh", "scp") else c[2:4] for c in made] == [
      ["tpu-vm", "describe"], ["tpu-vm", "delete"], ["tpu-vm", "create"],
      ["tpu-vm", "scp", "all"], ["tpu-vm", "ssh", "all"], ["tpu-vm", "ssh", "all"],  # install, run
      ["tpu-vm", "describe"], ["tpu-vm", "ssh", "0"]]  # READY, and the run has exited 0
  fake = Path(env["FAKE_DIR"])
  # The overrides reached the program unchanged through gcloud's --command and bash.
  assert (fake / "python_argv").read_text().split("\0")[:-1] == EXPECTED_TRAIN_ARGV
  home = Path(env["HOME"])
  assert (fake / "python_cwd").read_text().strip() == str(home / "clusterstm_jax")
  assert (home / "clusterstm_train.exit").read_text().strip() == "0"
  assert "fake train log line" in (home / "clusterstm_train.log").read_text()
  assert (Path(env["TMPDIR"]) / "clusterstm_jax-clu-test.tgz").stat().st_size > 0


def test_watch_starts_run_on_idle_slice_and_stops_on_crash(env):
  _states(env, "READY")
  env = {**env, "FAKE_TRAIN_EXIT": "3"}
  out = launch("watch.sh", *SCOPE, *SLICE, f"--workdir={WORKDIR}", "--interval=0",
               "--repo=https://example.com/r.git", env=env)
  assert out.returncode == 1, out.stderr
  assert "exited with status 3 on a healthy slice" in out.stderr
  assert "fake train log line" in out.stdout  # the log tail
  # Nothing runs -> install and start (no scp: --repo is cloned); the run exits 3; one more
  # check in case the slice was preempted; still READY -> show the log tail and stop.
  assert [c[2:4] + [flag(c, "worker")] if c[3] == "ssh" else c[2:4] for c in calls(env)] == [
      ["tpu-vm", "describe"], ["tpu-vm", "ssh", "0"], ["tpu-vm", "ssh", "all"],
      ["tpu-vm", "ssh", "all"], ["tpu-vm", "describe"], ["tpu-vm", "ssh", "0"],
      ["tpu-vm", "describe"], ["tpu-vm", "ssh", "0"], ["tpu-vm", "ssh", "0"]]


def test_watch_gives_up_after_max_relaunches(env):
  _states(env, "MISSING", "PREEMPTED")
  out = launch("watch.sh", *SCOPE, *SLICE, f"--workdir={WORKDIR}", "--interval=0",
               "--max-relaunches=2", "--repo=https://example.com/r.git", env=env)
  assert out.returncode == 2 and "gave up after 2 relaunches" in out.stderr
  kinds = [c[2:4] for c in calls(env)]
  creates = [i for i, k in enumerate(kinds) if k == ["tpu-vm", "create"]]
  deletes = [i for i, k in enumerate(kinds) if k == ["tpu-vm", "delete"]]
  assert len(creates) == 2 and len(deletes) == 1  # a missing slice is created, not deleted
  assert creates[0] < deletes[0] < creates[1]


def test_create_queued_waits_until_active(env):
  # A describe error other than NOT_FOUND is waited out, not taken for a lost slice.
  _states(env, "ACCEPTED", "FLAKY", "WAITING_FOR_RESOURCES", "ACTIVE")
  out = launch("create.sh", *SCOPE, *SLICE, "--queued", "--interval=0", env=env)
  assert out.returncode == 0, out.stderr
  assert "UNAVAILABLE" in out.stderr
  assert [c[2:4] for c in calls(env)] == [["queued-resources", "create"]] + \
      [["queued-resources", "describe"]] * 4
  _states(env, "FAILED")
  out = launch("create.sh", *SCOPE, *SLICE, "--queued", "--interval=0", env=env)
  assert out.returncode != 0 and "is FAILED" in out.stderr


# -------------------------------------------------------------------------------- shellcheck


def test_shellcheck():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed (apt-get install shellcheck); CI installs it")
  scripts = sorted(str(p.relative_to(ROOT)) for p in LAUNCH.glob("*.sh"))
  assert "launch/common.sh" in scripts and len(scripts) == len(ENTRY_SCRIPTS) + 1
  out = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("code", ["75", "143", "130"])
def test_watch_resumes_a_run_that_stopped_on_a_signal(env, code):
  # 75: errors.EXIT_PREEMPTED (saved, resume me); 143/130: a signal during the imports
  _states(env, "READY")
  env = {**env, "FAKE_TRAIN_EXIT": code}
  out = launch("watch.sh", *SCOPE, *SLICE, f"--workdir={WORKDIR}", "--interval=0",
               "--max-relaunches=2", "--repo=https://example.com/r.git", env=env)
  assert out.returncode == 2 and "gave up after 2 relaunches" in out.stderr, out.stderr
  assert f"stopped on a signal (exit {code}); resuming it" in out.stderr
  assert "on a healthy slice" not in out.stderr  # never taken for a crash
