"""calico-mount-reaper: removes the cgroup2/bpf mounts Calico and Cilium leave behind."""

__version__ = "0.1.0"
