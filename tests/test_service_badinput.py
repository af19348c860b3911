"""Hostile operator input to the service and vCenter commands: one line, never a traceback."""

import subprocess
import sys

import pytest


def smsblock(*args, env=None):
    import os
    return subprocess.run([sys.executable, "-m", "smsblock", *map(str, args)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def one_line_error(p):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("args", [
    ["serve", "--port", "99999"],
    ["serve", "--port", "http"],
])
def test_serve_port_out_of_range(tmp_path, args):
    p = smsblock(*args, "--state", tmp_path / "st")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "port" in p.stderr


def test_vcenter_password_file_and_address_and_ca_bundle(tmp_path):
    binary = tmp_path / "pw.bin"
    binary.write_bytes(b"\xc1\xff\xfe\n")
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    good = tmp_path / "pw"
    good.write_text("secret\n")
    cases = [
        (["--vcenter", "vc.example", "--password-file", binary], "not UTF-8"),
        (["--vcenter", "vc.example", "--password-file", "/dev/zero"], "not a password"),
        (["--vcenter", "http://[::1", "--password-file", good], "--vcenter"),
        (["--vcenter", "127.0.0.1:9", "--password-file", good, "--ca-bundle", garbage], "--ca-bundle"),
    ]
    for extra, needle in cases:
        p = smsblock("connector", "register", "--state", tmp_path / "st", "--username", "u", *extra)
        one_line_error(p)
        assert needle in p.stderr, (extra, p.stderr)
        assert "secret" not in p.stderr + p.stdout


def test_huge_number_of_amis_to_keep_is_invalid_parameter(tmp_path):
    from smsblock.errors import ServiceError
    from smsblock.service.jobs import check_amis_to_keep
    assert check_amis_to_keep(2**31 - 1) == 2**31 - 1
    for bad in (2**31, 10**23, -1, True, 1.5):
        with pytest.raises(ServiceError) as e:
            check_amis_to_keep(bad)
        assert e.value.code == "InvalidParameterException"
