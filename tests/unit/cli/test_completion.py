"""`garrison completion bash|zsh` (issue 18, item 15): the script sources in bash and completes
subcommands, options, option choices and file names, as bash itself runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GARRISON = str(Path(sys.executable).with_name("garrison"))
REPO = Path(__file__).resolve().parents[3]


def script(shell: str) -> str:
    done = subprocess.run([GARRISON, "completion", shell], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module", name="bash_script")
def fixture_bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    path = tmp_path_factory.mktemp("completion") / "garrison.bash"
    path.write_text(script("bash"))
    return path


def complete(bash_script: Path, line: str) -> list[str]:
    """What bash offers after `line` (the cursor at its end), through the sourced script."""
    words = line.split(" ")
    program = f"""
source {bash_script}
spec=$(complete -p garrison)
fn=${{spec##*-F }}; fn=${{fn%% *}}
COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}
COMP_WORDS=({" ".join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}
"$fn" garrison {words[-1]!r} {words[-2]!r}
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    return sorted(w.strip() for w in done.stdout.splitlines() if w.strip())


def test_the_bash_script_sources_and_registers_garrison() -> None:
    done = subprocess.run(["bash", "-c", f"source <({GARRISON} completion bash); "
                           "complete -p garrison"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(" garrison") and "-F " in done.stdout


def test_bash_completes_commands_options_choices_and_files(bash_script: Path) -> None:
    assert complete(bash_script, "garrison ") == sorted([
        "policy", "proxy", "endpoint", "identity", "namespace", "bpf", "status", "observe",
        "accesslog", "agent", "ui", "cni", "completion"])
    assert complete(bash_script, "garrison endpoint ") == [
        "add", "config", "delete", "exec", "get", "labels", "list"]
    assert complete(bash_script, "garrison agent --kvs") == [
        "--kvstore", "--kvstore-ca", "--kvstore-cert", "--kvstore-endpoints", "--kvstore-key",
        "--kvstore-lease-ttl", "--kvstore-password-file", "--kvstore-user"]
    assert complete(bash_script, "garrison observe -o ") == ["compact", "dict", "json", "jsonpb",
                                                               "table"]
    assert complete(bash_script, "garrison bpf ct list --out") == ["--output"]
    assert "examples/starwars/sw_l3_l4_l7_policy.yaml" in complete(
        bash_script, "garrison policy validate examples/starwars/sw_l3")


def test_the_zsh_script_names_every_command() -> None:
    text = script("zsh")
    assert text.startswith("#compdef garrison")
    for word in ("endpoint", "observe", "--kvstore-endpoints", "--drop-reason-desc"):
        assert word in text


@pytest.mark.skipif(shutil.which("zsh") is None, reason="needs zsh (make setup installs it)")
def test_the_zsh_script_registers_both_ways(tmp_path: Path) -> None:
    """`eval "$(garrison completion zsh)"`, and the file `_garrison` in $fpath."""
    (tmp_path / "_garrison").write_text(script("zsh"))
    # compinit writes its dump file even with -D, by renaming a new file over the path: never
    # a path outside the test's own directory (given /dev/null, it replaced the device)
    init = f"autoload -U compinit; compinit -u -d {tmp_path}/zcompdump"
    for setup in (f'eval "$({GARRISON} completion zsh)"', f"fpath=({tmp_path} $fpath); {init}"):
        done = subprocess.run(["zsh", "-fc", f"{init}; {setup}; print -r -- ${{_comps[garrison]}}"],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "GARRISON_PURE": "1"})
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert done.stdout.strip() in ("_shtab_garrison", "_garrison"), done.stdout
    assert Path("/dev/null").is_char_device(), "the test replaced /dev/null"
