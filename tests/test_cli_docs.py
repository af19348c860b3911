"""docs/cli.md: every command and option is documented, and its runnable examples run.

The blocks of docs/cli.md whose first line is ``# example: runs as written`` are run as
written, top to bottom in one ``bash -e`` shell, in a folder holding ``disk.raw`` and
``datastore/`` (what the docs promise), with ``smsblock`` on PATH."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from smsblock.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"
MARK = "# example: runs as written"
MIB = 1 << 20


def runnable_blocks(text: str) -> list[str]:
    blocks = re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M)
    return [b for b in blocks if b.startswith(MARK + "\n")]


def test_the_runnable_examples_run_as_written(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_service_sources import make_datastore

    blocks = runnable_blocks(DOC.read_text())
    assert len(blocks) >= 9
    work = tmp_path / "work"
    work.mkdir()
    with open(work / "disk.raw", "wb") as f:         # 4 MiB, a few data blocks
        f.truncate(4 * MIB)
        for i, offset in enumerate((0, 70000, 3 * MIB + 5)):
            f.seek(offset)
            f.write(bytes([i + 1]) * 100000)
    make_datastore(work / "datastore", 1)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "smsblock").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m smsblock "$@"\n')
    (bin_dir / "smsblock").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSBLOCK_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHONPATH=str(ROOT), HOME=str(tmp_path / "home"))
    script = "set -e\n" + "\n".join(blocks)
    p = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr
    # what the examples say happens, happened
    out = p.stdout
    for refusal in ("refused: smsblock writes raw or vmdk", "refused: no store at stroe",
                    "refused: web-01's runs use 64K blocks", "refused: --keep 0 needs --delete-all",
                    "refused: no runs of wbe-01", "this disk cannot boot in the cloud"):
        assert refusal in out, refusal
    assert not (work / "stroe").exists() and not (work / "wrong.qcow2").exists()
    assert "no runs of server nobody" in out and "would delete run r-" in out
    assert "no images in the catalog images" in out
    assert "run sms-run-" in p.stderr and "started" in p.stderr      # connector run says so


def _documented_options(parser: argparse.ArgumentParser, path: str = ""):
    """(command path, option strings) for every command and option of the CLI."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{path} {name}".strip(), None
                yield from _documented_options(sub, f"{path} {name}".strip())
        elif action.option_strings and path and "-h" not in action.option_strings:
            yield path, action.option_strings


def test_every_command_and_option_is_in_the_docs():
    text = DOC.read_text()
    missing = []
    for command, options in _documented_options(build_parser()):
        head = command.split()[0]
        if options is None:
            if f"smsblock {command}" not in text and not (
                    head == "sms" and command.split()[-1] in text):
                missing.append(command)
            continue
        if head == "sms":
            continue        # the AWS verbs' options: listed with the verbs, as `aws sms` names them
        if not any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text) for o in options):
            missing.append(f"{command} {options[0]}")
    assert not missing, f"not in docs/cli.md: {missing}"


def test_sms_verbs_and_their_options_are_listed():
    text = DOC.read_text()
    parser = build_parser()
    sms = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["sms"]
    verbs = next(a for a in sms._actions if isinstance(a, argparse._SubParsersAction)).choices
    section = text[text.index("### `smsblock sms`"):text.index("### `smsblock serve`")]
    for verb, sub in verbs.items():
        assert f"`{verb}" in section, verb
        for action in sub._actions:
            opts = [o for o in action.option_strings if o.startswith("--") and o not in ("--help", "--state")]
            if opts and not any(o in section for o in opts):
                # the job settings are named once for create-replication-job
                raise AssertionError(f"sms {verb} {opts[0]} is not in docs/cli.md")
