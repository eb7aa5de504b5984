"""The TOML config: defaults, validation messages that name file and key, trust and lookup."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from calico_mount_reaper import config
from calico_mount_reaper.config import Config, ConfigError, load, load_file, resolve_path
from calico_mount_reaper.targets import BUILTIN_RULES, Rule


def write(path: Path, text: str, mode: int = 0o644) -> str:
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


@pytest.fixture
def no_default_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point the default path somewhere we control, so the machine's /etc cannot leak in."""
    default = tmp_path / "etc-config.toml"
    monkeypatch.setattr(config, "DEFAULT_PATH", str(default))
    return default


def test_defaults() -> None:
    c = Config()
    assert c.rules == BUILTIN_RULES
    assert (c.grace_period, c.rescan_interval, c.reap_on_stop) == (10.0, 60.0, "shutdown")
    assert (c.busy_retries, c.busy_backoff, c.remove_mount_point) == (4, 0.05, True)
    assert (c.kubelet_unit, c.metrics_path) == ("kubelet.service", "")
    assert c.owner_names == {"calico-node", "calico-felix", "cilium-agent"}


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    c = load_file(write(tmp_path / "c.toml", ""))
    assert c == Config()
    assert c.source == str(tmp_path / "c.toml")


def test_every_key_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        """
        grace_period = 2.5
        rescan_interval = 30
        reap_on_stop = "always"
        builtin_targets = false
        busy_retries = 0
        busy_backoff = 0
        remove_mount_point = false
        kubelet_unit = "kubelet-custom.service"
        metrics_path = "/var/lib/node_exporter/reaper.prom"

        [[target]]
        name = "calico-custom"
        prefix = "/var/run/calico-custom/"
        fstypes = ["cgroup2"]
        owners = ["calico-node"]
        detach_on_busy = false
        """,
    )
    c = load_file(path)
    assert (c.grace_period, c.rescan_interval, c.reap_on_stop) == (2.5, 30.0, "always")
    assert (c.busy_retries, c.busy_backoff, c.remove_mount_point) == (0, 0.0, False)
    assert (c.kubelet_unit, c.metrics_path) == (
        "kubelet-custom.service",
        "/var/lib/node_exporter/reaper.prom",
    )
    # The prefix is stored normalized: /var/run folded, trailing slash dropped.
    assert c.rules == (
        Rule(
            "calico-custom",
            "/run/calico-custom",
            frozenset({"cgroup2"}),
            ("calico-node",),
            detach_on_busy=False,
        ),
    )


def test_custom_targets_come_after_the_builtin_ones(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        '[[target]]\nname = "x"\nprefix = "/srv/x"\nfstypes = ["bpf"]\nowners = ["x"]\n',
    )
    c = load_file(path)
    assert c.rules[:2] == BUILTIN_RULES
    assert c.rules[2].prefix == "/srv/x" and c.rules[2].detach_on_busy


TARGET = '[[target]]\nname = "x"\nprefix = "/srv/x"\nfstypes = ["cgroup2"]\nowners = ["x"]\n'


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('grace_period = "10"', "grace_period"),
        ("grace_period = -1", "grace_period"),
        ("grace_period = true", "grace_period"),
        ("grace_period = nan", "grace_period"),
        ("grace_period = inf", "grace_period"),
        ("rescan_interval = 0.5", "rescan_interval"),
        ("rescan_interval = -inf", "rescan_interval"),
        ("busy_retries = 1.5", "busy_retries"),
        ("busy_retries = -1", "busy_retries"),
        ("busy_retries = true", "busy_retries"),
        ('busy_retries = "4"', "busy_retries"),
        ("busy_backoff = -0.1", "busy_backoff"),
        ("busy_backoff = false", "busy_backoff"),
        ('remove_mount_point = "yes"', "remove_mount_point"),
        ("remove_mount_point = 1", "remove_mount_point"),
        ("kubelet_unit = 5", "kubelet_unit"),
        ('reap_on_stop = "sometimes"', "reap_on_stop"),
        ("reap_on_stop = true", "reap_on_stop"),
        ('metrics_path = "relative/x.prom"', "metrics_path"),
        ("metrics_path = 3", "metrics_path"),
        ('builtin_targets = "no"', "builtin_targets"),
        ("builtin_targets = false", "builtin_targets"),
        ("grace_periode = 10", "grace_periode"),
        ("[unknown]\na = 1", "unknown"),
        ('[target]\nname = "x"', "target"),
        ("target = [1]", "target[0]"),
        (TARGET + "colour = 'blue'", "target[0].colour"),
        (TARGET.replace('name = "x"\n', ""), "target[0].name"),
        (TARGET.replace('prefix = "/srv/x"\n', ""), "target[0].prefix"),
        (TARGET.replace('fstypes = ["cgroup2"]\n', ""), "target[0].fstypes"),
        (TARGET.replace('owners = ["x"]\n', ""), "target[0].owners"),
        (TARGET.replace('name = "x"', "name = 1"), "target[0].name"),
        (TARGET.replace("/srv/x", "srv/x"), "target[0].prefix"),
        (TARGET.replace("/srv/x", "/srv/../proc"), "target[0].prefix"),
        (TARGET.replace("/srv/x", "/srv/x/.."), "target[0].prefix"),
        (TARGET.replace('"/srv/x"', "5"), "target[0].prefix"),
        (TARGET.replace("/srv/x", "/"), "target[0].prefix"),
        (TARGET.replace("/srv/x", "/run"), "target[0].prefix"),
        (TARGET.replace("/srv/x", "/var/run/"), "target[0].prefix"),
        (TARGET.replace("/srv/x", "/proc/fs"), "target[0].prefix"),
        (TARGET.replace("/srv/x", "/sys/fs/cgroup/kubepods"), "target[0].prefix"),
        (TARGET.replace("/srv/x", "/dev/shm"), "target[0].prefix"),
        (TARGET.replace("/srv/x", "//sys"), "target[0].prefix"),
        (TARGET.replace('["cgroup2"]', "[]"), "target[0].fstypes"),
        (TARGET.replace('["cgroup2"]', '"cgroup2"'), "target[0].fstypes"),
        (TARGET.replace('["cgroup2"]', '[""]'), "target[0].fstypes"),
        (TARGET.replace('["x"]', "[1]"), "target[0].owners"),
        (TARGET + "detach_on_busy = 'yes'", "target[0].detach_on_busy"),
        (TARGET + TARGET.replace("/srv/x", "/proc"), "target[1].prefix"),
        (TARGET.replace('["cgroup2"]', '["ext4"]'), "target[0].fstypes"),
        (TARGET.replace('["cgroup2"]', '["cgroup2", "tmpfs"]'), "target[0].fstypes"),
        (TARGET + TARGET.replace("/srv/x", "/srv/y"), "target[1].name"),
        (TARGET.replace('name = "x"', 'name = "calico"'), "target[0].name"),
    ],
)
def test_bad_value_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        load_file(path)
    message = str(info.value)
    assert path in message
    assert f"'{key}'" in message
    assert info.value.key == key and info.value.source == path


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.toml", "grace_period = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_file(path)
    assert str(info.value).startswith(path)


def test_invalid_utf8_names_the_file(tmp_path: Path) -> None:
    target = tmp_path / "latin1.toml"
    target.write_bytes(b'kubelet_unit = "k\xe9belet"\n')
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_file(str(target))
    assert str(info.value).startswith(str(target))


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_file(path)
    assert path in str(info.value)


def test_world_writable_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "grace_period = 1\n", mode=0o646)
    with pytest.raises(ConfigError, match="world-writable") as info:
        load_file(path)
    assert path in str(info.value)


def test_not_owned_by_root_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "grace_period = 1\n")
    os.chown(path, 12345, -1)
    with pytest.raises(ConfigError, match="owned by uid 12345") as info:
        load_file(path)
    assert path in str(info.value)


def test_symlink_is_refused_even_to_a_good_file(tmp_path: Path) -> None:
    real = write(tmp_path / "real.toml", "grace_period = 1\n")
    link = tmp_path / "link.toml"
    link.symlink_to(real)
    assert load_file(real).grace_period == 1
    with pytest.raises(ConfigError, match="symlink") as info:
        load_file(str(link))
    assert str(link) in str(info.value)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        load_file(str(tmp_path))


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    # Opening a FIFO for reading blocks until a writer shows up: a planted FIFO must not be able
    # to hang the daemon's start or a reload.
    fifo = str(tmp_path / "c.toml")
    os.mkfifo(fifo, 0o644)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            load_file(fifo)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # release the stuck open() before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load_file blocked on a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], ConfigError)
    assert "not a regular file" in str(outcome[0])


def test_no_file_anywhere_gives_defaults(no_default_file: Path) -> None:
    assert resolve_path(None, {}) is None
    assert load(None, {}) == Config()


def test_default_file_is_used_when_present(no_default_file: Path) -> None:
    write(no_default_file, "grace_period = 3\n")
    assert resolve_path(None, {}) == str(no_default_file)
    assert load(None, {}).grace_period == 3


def test_env_var_beats_default_file(no_default_file: Path, tmp_path: Path) -> None:
    write(no_default_file, "grace_period = 3\n")
    env = write(tmp_path / "env.toml", "grace_period = 4\n")
    assert load(None, {config.ENV_VAR: env}).grace_period == 4


def test_an_empty_config_name_is_refused_not_read_as_unset(no_default_file: Path) -> None:
    # Someone meant to name a file; quietly running on the default file would surprise them.
    write(no_default_file, "grace_period = 3\n")
    with pytest.raises(ConfigError) as info:
        load(None, {config.ENV_VAR: ""})
    assert str(info.value).startswith(f"${config.ENV_VAR}: is set but empty")
    assert "unset it" in str(info.value)
    with pytest.raises(ConfigError, match="--config: is empty"):
        load("", {})


def test_explicit_beats_env_var(no_default_file: Path, tmp_path: Path) -> None:
    env = write(tmp_path / "env.toml", "grace_period = 4\n")
    explicit = write(tmp_path / "explicit.toml", "grace_period = 5\n")
    c = load(explicit, {config.ENV_VAR: env})
    assert c.grace_period == 5 and c.source == explicit


def test_configured_file_must_exist(no_default_file: Path, tmp_path: Path) -> None:
    # A named config that is missing is an error, never a silent fall back to defaults.
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        load(missing, {})
    with pytest.raises(ConfigError, match="does not exist"):
        load(None, {config.ENV_VAR: missing})


def test_fstypes_allow_list_and_duplicate_names_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(write(tmp_path / "a.toml", TARGET.replace('["cgroup2"]', '["ext4"]')))
    assert "'ext4' is not reaped: expected only cgroup2, cgroup, bpf" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_file(write(tmp_path / "b.toml", TARGET + TARGET.replace("/srv/x", "/srv/y")))
    assert "'x' is already the name of target[0]" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_file(write(tmp_path / "c.toml", TARGET.replace('name = "x"', 'name = "cilium"')))
    assert "a built-in target" in str(info.value) and "builtin_targets = false" in str(info.value)
    # Every allowed type, and a built-in name once the built-ins are off, are fine.
    ok = TARGET.replace('["cgroup2"]', '["cgroup2", "cgroup", "bpf"]').replace(
        'name = "x"', 'name = "calico"'
    )
    rules = load_file(write(tmp_path / "d.toml", "builtin_targets = false\n" + ok)).rules
    assert [(r.name, sorted(r.fstypes)) for r in rules] == [
        ("calico", ["bpf", "cgroup", "cgroup2"])
    ]
