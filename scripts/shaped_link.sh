# Sourced by the shaped-link benchmarks: a rate-limited network on one machine (needs root and iproute2).
#
# $scenario chooses it (default hub); every table should name it:
#   hub     one network namespace whose loopback is shaped to $rate with tc's token bucket, MPICH
#           forced onto TCP inside it: all ranks share the one link (the README's figures until
#           2026-12 were measured so).
#   switch  `mpiqsgd cluster` (docs/cluster.md): one node per rank, each with its own link of $rate
#           in each direction to a bridge, as on a switched cluster.
# `mpi_run RANKS CMD...` runs CMD on RANKS ranks there; `in_ns CMD...` runs a command inside the
# hub's namespace (hub only). All is removed on exit. $burst: tbf's bucket (hub default 256kb;
# switch default 2 ms at the rate, at least 64kb).
scenario=${scenario:-hub}
export OMP_NUM_THREADS=1
case $scenario in
  hub)
    ns=mpiqsgd-shaped-$$
    ip netns add "$ns"
    trap 'ip netns del "$ns"' EXIT
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" tc qdisc add dev lo root tbf rate "$rate" burst "${burst:-256kb}" latency 50ms
    export MPIR_CVAR_NOLOCAL=1 MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp
    in_ns() { ip netns exec "$ns" "$@"; }
    mpi_run() { local n=$1; shift; in_ns mpiexec -n "$n" "$@"; }
    ;;
  switch)
    in_ns() { echo "in_ns: the hub scenario only (scenario=$scenario)" >&2; return 2; }
    mpi_run() {
      local n=$1; shift
      python -m mpiqsgd cluster run --nodes "$n" --rate "$rate" ${burst:+--burst "$burst"} -- "$@"
    }
    ;;
  *) echo "scenario=$scenario: want hub or switch" >&2; exit 2 ;;
esac
