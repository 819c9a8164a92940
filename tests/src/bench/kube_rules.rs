//! kube-proxy's rules for a set of ClusterIP Services (optionally with a
//! NodePort each), written the way its iptables and nftables proxiers lay
//! them out (written here from their rule layout, not from their code), for
//! the comparison benchmarks.
//!
//! Cluster CIDR: 198.18.0.0/16, so the benchmark client counts as a pod and
//! nothing sent to a ClusterIP is masqueraded (as with our dataplane, which
//! does not SNAT). Traffic to a NodePort (externalTrafficPolicy Cluster,
//! the default) is always marked for masquerade, as kube-proxy does.

use std::{fmt::Write, net::Ipv4Addr};

/// One Service port as kube-proxy sees it.
pub struct SvcPort {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Proto,
    /// The Service port's NodePort (externalTrafficPolicy Cluster), if any.
    pub node_port: Option<u16>,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// A Service port's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// As iptables and nft spell it.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

pub const CLUSTER_CIDR: &str = "198.18.0.0/16";

/// A short stable hash for chain names (kube-proxy uses a base32 SHA-256
/// prefix; any stable 64-bit hash serves the same purpose here).
fn chain_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016X}")
}

impl SvcPort {
    fn id(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }
}

/// `iptables-restore` input: the nat table (KUBE-SERVICES dispatch, one
/// KUBE-SVC chain per Service port choosing an endpoint with
/// `-m statistic --mode random --probability 1/(n-i)`, one KUBE-SEP chain
/// per endpoint doing the DNAT, KUBE-MARK-MASQ and KUBE-POSTROUTING) and the
/// filter table's KUBE-FORWARD. Services are written in the order given: the
/// last one is the last rule of KUBE-SERVICES.
pub fn iptables(svcs: &[SvcPort]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    for c in ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-NODEPORTS"] {
        writeln!(chains, ":{c} - [0:0]").unwrap();
    }
    rules.push_str("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    rules.push_str("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    rules.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    rules.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    rules.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    let mut svc_rules = String::new();
    let mut node_port_rules = String::new();
    for s in svcs {
        let id = s.id();
        let p = s.protocol.name();
        let svc_chain = format!("KUBE-SVC-{}", chain_hash(&format!("{id}/{p}")));
        writeln!(chains, ":{svc_chain} - [0:0]").unwrap();
        writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{id} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} -j {svc_chain}",
            s.vip, s.port
        )
        .unwrap();
        writeln!(
            svc_rules,
            "-A {svc_chain} -m comment --comment \"{id} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            s.vip, s.port
        )
        .unwrap();
        if let Some(np) = s.node_port {
            // externalTrafficPolicy Cluster: every packet to the NodePort is
            // masqueraded, then load-balanced like the ClusterIP.
            let ext_chain = format!("KUBE-EXT-{}", chain_hash(&format!("{id}/{p}")));
            writeln!(chains, ":{ext_chain} - [0:0]").unwrap();
            writeln!(
                node_port_rules,
                "-A KUBE-NODEPORTS -m comment --comment {id} -m {p} -p {p} --dport {np} -j {ext_chain}"
            )
            .unwrap();
            writeln!(
                svc_rules,
                "-A {ext_chain} -m comment --comment \"masquerade traffic for {id} external destinations\" -j KUBE-MARK-MASQ"
            )
            .unwrap();
            writeln!(svc_rules, "-A {ext_chain} -j {svc_chain}").unwrap();
        }
        let n = s.endpoints.len();
        for (i, (addr, port)) in s.endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-{}", chain_hash(&format!("{id}/{p}/{addr}:{port}")));
            writeln!(chains, ":{sep} - [0:0]").unwrap();
            let stat = if i + 1 < n {
                format!(" -m statistic --mode random --probability {:.11}", 1.0 / (n - i) as f64)
            } else {
                String::new()
            };
            writeln!(
                svc_rules,
                "-A {svc_chain} -m comment --comment \"{id} -> {addr}:{port}\"{stat} -j {sep}"
            )
            .unwrap();
            writeln!(
                svc_rules,
                "-A {sep} -m comment --comment {id} -s {addr}/32 -j KUBE-MARK-MASQ"
            )
            .unwrap();
            writeln!(
                svc_rules,
                "-A {sep} -m comment --comment {id} -m {p} -p {p} -j DNAT --to-destination {addr}:{port}"
            )
            .unwrap();
        }
    }
    rules.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    let mut out = String::new();
    out.push_str("*filter\n:KUBE-FORWARD - [0:0]\n");
    out.push_str("-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n");
    out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    out.push_str(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n",
    );
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    out.push_str("COMMIT\n*nat\n");
    out.push_str(&chains);
    out.push_str(&rules);
    out.push_str(&svc_rules);
    out.push_str(&node_port_rules);
    out.push_str("COMMIT\n");
    out
}

/// `nft -f` input: table `ip kube-proxy` with the `service-ips` verdict map
/// (VIP . protocol . port -> goto the Service's chain), one chain per
/// Service port choosing an endpoint with `numgen random mod N vmap`, one
/// chain per endpoint doing the DNAT, masquerade marking, and the forward
/// filter's invalid-conntrack drop; NodePorts through the
/// `service-nodeports` verdict map (protocol . port -> goto the Service's
/// `external-` chain, which marks for masquerade and goes to the Service's
/// chain), for packets to a local address.
pub fn nftables(svcs: &[SvcPort]) -> String {
    let mut o = String::new();
    o.push_str("table ip kube-proxy {\n");
    o.push_str("  map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }\n");
    o.push_str("  chain mark-for-masquerade { meta mark set meta mark | 0x4000; }\n");
    o.push_str("  chain masquerading { meta mark & 0x4000 == 0 return; meta mark set meta mark ^ 0x4000; masquerade fully-random; }\n");
    o.push_str("  map service-nodeports { type inet_proto . inet_service : verdict; }\n");
    o.push_str("  chain nodeports { meta l4proto . th dport vmap @service-nodeports; }\n");
    o.push_str("  chain services { ip daddr . meta l4proto . th dport vmap @service-ips; fib daddr type local ip daddr != 127.0.0.0/8 jump nodeports; }\n");
    o.push_str("  chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; jump services; }\n");
    o.push_str("  chain nat-output { type nat hook output priority -100; policy accept; jump services; }\n");
    o.push_str(
        "  chain nat-postrouting { type nat hook postrouting priority srcnat; policy accept; jump masquerading; }\n",
    );
    o.push_str(
        "  chain filter-forward { type filter hook forward priority -110; policy accept; ct state invalid drop; }\n",
    );
    let mut elements = Vec::new();
    let mut node_ports = Vec::new();
    for s in svcs {
        let id = s.id();
        let p = s.protocol.name();
        let tag = chain_hash(&format!("{id}/{p}"));
        let svc_chain = format!("service-{}-{}-{}-{p}-{}", &tag[..8], s.namespace, s.name, s.port_name);
        let mut vmap = Vec::new();
        let mut ep_chains = String::new();
        for (i, (addr, port)) in s.endpoints.iter().enumerate() {
            let ep = format!(
                "endpoint-{}-{}-{}-{p}-{}-{}-{}",
                &chain_hash(&format!("{id}/{p}/{addr}:{port}"))[..8],
                s.namespace,
                s.name,
                s.port_name,
                addr.to_string().replace('.', "-"),
                port
            );
            writeln!(
                ep_chains,
                "  chain {ep} {{ ip saddr {addr} jump mark-for-masquerade; meta l4proto {p} dnat to {addr}:{port}; }}"
            )
            .unwrap();
            vmap.push(format!("{i} : goto {ep}"));
        }
        o.push_str(&ep_chains);
        writeln!(
            o,
            "  chain {svc_chain} {{ ip daddr {} {p} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade; numgen random mod {} vmap {{ {} }}; }}",
            s.vip,
            s.port,
            s.endpoints.len(),
            vmap.join(", ")
        )
        .unwrap();
        elements.push(format!("{} . {p} . {} : goto {svc_chain}", s.vip, s.port));
        if let Some(np) = s.node_port {
            let ext_chain = format!("external-{}-{}-{}-{p}-{}", &tag[..8], s.namespace, s.name, s.port_name);
            writeln!(
                o,
                "  chain {ext_chain} {{ jump mark-for-masquerade; goto {svc_chain}; }}"
            )
            .unwrap();
            node_ports.push(format!("{p} . {np} : goto {ext_chain}"));
        }
    }
    o.push_str("}\n");
    for chunk in elements.chunks(1000) {
        writeln!(o, "add element ip kube-proxy service-ips {{ {} }}", chunk.join(", ")).unwrap();
    }
    for chunk in node_ports.chunks(1000) {
        writeln!(
            o,
            "add element ip kube-proxy service-nodeports {{ {} }}",
            chunk.join(", ")
        )
        .unwrap();
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> Vec<SvcPort> {
        (0..2)
            .map(|i| SvcPort {
                namespace: "bench".into(),
                name: format!("svc-{i}"),
                port_name: "http".into(),
                vip: Ipv4Addr::new(198, 19, 0, i + 1),
                port: 80,
                protocol: Proto::Tcp,
                node_port: None,
                endpoints: vec![
                    (Ipv4Addr::new(198, 18, 1, 2), 8080),
                    (Ipv4Addr::new(198, 18, 2, 2), 8080),
                ],
            })
            .collect()
    }

    #[test]
    fn iptables_layout() {
        let r = iptables(&two());
        let dispatch: Vec<&str> = r.lines().filter(|l| l.starts_with("-A KUBE-SERVICES")).collect();
        // One rule per Service in order, then the nodeports rule last.
        assert_eq!(dispatch.len(), 3);
        assert!(dispatch[1].contains("-d 198.19.0.2/32"));
        assert!(dispatch[2].contains("KUBE-NODEPORTS"));
        assert!(r.contains("-m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-"));
        assert!(r.contains("-j DNAT --to-destination 198.18.2.2:8080"));
        assert_eq!(r.matches("COMMIT").count(), 2);
    }

    #[test]
    fn nftables_layout() {
        let r = nftables(&two());
        assert!(r.contains("numgen random mod 2 vmap { 0 : goto endpoint-"));
        assert!(r.contains("198.19.0.2 . tcp . 80 : goto service-"));
        assert!(r.contains("dnat to 198.18.1.2:8080"));
        assert!(!r.contains("add element ip kube-proxy service-nodeports"));
    }

    /// The second Service as UDP with a NodePort.
    fn with_node_port() -> Vec<SvcPort> {
        let mut s = two();
        s[1].protocol = Proto::Udp;
        s[1].node_port = Some(30001);
        s
    }

    #[test]
    fn iptables_node_port() {
        let r = iptables(&with_node_port());
        let np: Vec<&str> = r.lines().filter(|l| l.starts_with("-A KUBE-NODEPORTS")).collect();
        assert_eq!(np.len(), 1, "{r}");
        assert!(np[0].contains("-m udp -p udp --dport 30001 -j KUBE-EXT-"), "{}", np[0]);
        let ext = np[0].rsplit(' ').next().unwrap();
        let ext_rules: Vec<&str> = r.lines().filter(|l| l.starts_with(&format!("-A {ext} "))).collect();
        assert_eq!(ext_rules.len(), 2);
        assert!(ext_rules[0].ends_with("-j KUBE-MARK-MASQ"));
        assert!(ext_rules[1].contains("-j KUBE-SVC-"));
        assert!(r.contains(&format!(":{ext} - [0:0]")));
        assert!(r.contains("-m udp -p udp -d 198.19.0.2/32 --dport 80 -j KUBE-SVC-"));
        assert!(r.contains("-m udp -p udp -j DNAT --to-destination 198.18.2.2:8080"));
        // The TCP Service is unchanged.
        assert!(r.contains("-m tcp -p tcp -d 198.19.0.1/32 --dport 80 -j KUBE-SVC-"));
    }

    #[test]
    fn nftables_node_port() {
        let r = nftables(&with_node_port());
        assert!(r.contains("add element ip kube-proxy service-nodeports { udp . 30001 : goto external-"));
        assert!(r.contains("198.19.0.2 . udp . 80 : goto service-"));
        assert!(r.contains("meta l4proto udp dnat to 198.18.2.2:8080"));
        assert!(r.contains("jump mark-for-masquerade; goto service-"));
        assert!(r.contains("fib daddr type local"));
    }
}
