"""calico-mount-reaper: removes the cgroup2/bpf mounts Calico and Cilium leave behind.

The version lives in pyproject.toml only; `calico-mount-reaper --version` reads it from the
installed distribution's metadata (cli.version), so an upgrade can never show a stale copy.
"""
