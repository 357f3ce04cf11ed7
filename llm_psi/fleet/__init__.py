"""A fleet on one machine: N service instances, each a "host" (its own cgroup pinned to its own CPUs, with its
own owner, a co-tenant whose schedule differs from the others'), behind a real HAProxy on loopback whose
configuration is generated from the instances (haproxy.py, hosts.py, owners.py, fleet.py)."""
