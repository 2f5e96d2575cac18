"""Kernel offload: rules relayed by eBPF programs at tc ingress.

For the rules that can be offloaded, mcrd attaches a dispatcher program to
the tc ingress hook of each input interface (through a `clsact` qdisc) and
loads one program per rule (see `mcrd.ebpf`, which assembles them: nothing
is compiled). Before the IP stack or any packet socket sees a datagram,
the dispatcher finds its rule by (group, port, source) in a hash map and
hands it to the rule's program, which takes it if it is no longer than the
smallest output MTU and, for each output, rewrites the Ethernet and IP/UDP
headers with both checksums kept valid, counts, and transmits a clone to
every output but the last, which takes the datagram itself. So the
datagram is consumed: it reaches neither user space nor the host's IP
stack, and an application on the relay host that joined the same group
gets nothing. A rule whose input is also wanted locally keeps
`offload = "off"`.

What mcrd installs is one tc filter per input interface, of kind `bpf`,
named `mcrd:<interface>`, at priority 1 of the ingress hook (and the
`clsact` qdisc, if the interface had none). Reconciling works rule by rule,
as for workers: a new rule's program is added, a changed rule's replaced in
one atomic update (its datagrams meet the old program or the new one, never
neither, and its counters carry over), a removed rule's deleted; the other
rules are not touched. At exit mcrd deletes its filters, and the qdiscs it
created if nothing else uses them; at start it deletes filters named
`mcrd:` that a crash left behind. No other filter or qdisc is touched.

The package, by layer:

- `plan` (pure): which rules the kernel can relay, and what each input
  interface's programs hold;
- `asm`, `programs` (pure): the eBPF instructions of the dispatcher and of
  each rule's program;
- `netlink` (adapter): how each output would be sent (interfaces,
  addresses, routes, neighbours);
- `bpf` (adapter): bpf(2) — maps and program loading;
- `tc` (adapter): `Tc` attaches the dispatcher and keeps each interface's
  rules in the kernel, rule by rule.
"""
