# Sourced by the shaped-link benchmarks: a rate-limited link on one machine (needs root and iproute2).
#
# Creates a network namespace whose loopback is shaped to $rate with tc's token bucket and
# forces MPICH onto TCP inside it, so ranks really talk over that loopback; all ranks share
# the one link. `in_ns CMD...` runs a command inside it; the namespace is removed on exit.
# $burst (default 256kb) is the bucket tbf lets through at full speed before the rate holds.
ns=mpiqsgd-shaped-$$
ip netns add "$ns"
trap 'ip netns del "$ns"' EXIT
ip netns exec "$ns" ip link set lo up
ip netns exec "$ns" tc qdisc add dev lo root tbf rate "$rate" burst "${burst:-256kb}" latency 50ms
export MPIR_CVAR_NOLOCAL=1 MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp OMP_NUM_THREADS=1
in_ns() { ip netns exec "$ns" "$@"; }
