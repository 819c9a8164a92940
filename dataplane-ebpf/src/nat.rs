//! Address/port rewrites with checksum updates, for XDP and for TC.
//!
//! XDP has no checksum helpers and sees frames from the wire with complete
//! checksums: it writes directly and updates checksums incrementally.
//! TC may see `CHECKSUM_PARTIAL` skbs from local sockets, where the L4
//! checksum field holds only the pseudo-header sum: there the kernel helpers
//! with `BPF_F_PSEUDO_HDR` do the right thing for each case.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use dataplane_common::{csum, Addr};

use crate::parse::{
    Packet, IP6_DADDR_OFF, IP6_SADDR_OFF, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, L4_DPORT_OFF, L4_SPORT_OFF,
    TCP_CSUM_OFF, UDP_CSUM_OFF,
};

/// Which end of the packet is rewritten.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Destination: DNAT of a packet towards a backend.
    Dst,
    /// Source: reverse NAT of a reply, so it comes from the VIP.
    Src,
}

/// What the datapath needs from a program context.
pub trait PacketCtx: aya_ebpf::EbpfContext {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Rewrites the address and port of one side of `p` to `addr`/`port`
    /// (network order, `addr` of the packet's family), keeping the IPv4
    /// header checksum and the L4 checksum (whose pseudo-header holds the
    /// addresses, in both families) valid.
    fn rewrite(&self, p: &Packet, side: Side, addr: &Addr, port: u16) -> Result<(), ()>;
}

/// Where one side's address and port sit (offsets from the IP header and
/// the L4 header) and their current values.
#[inline(always)]
fn side_fields(p: &Packet, side: Side) -> (usize, usize, Addr, u16) {
    match (side, p.is_v6()) {
        (Side::Dst, false) => (IP_DADDR_OFF, L4_DPORT_OFF, p.daddr, p.dport),
        (Side::Src, false) => (IP_SADDR_OFF, L4_SPORT_OFF, p.saddr, p.sport),
        (Side::Dst, true) => (IP6_DADDR_OFF, L4_DPORT_OFF, p.daddr, p.dport),
        (Side::Src, true) => (IP6_SADDR_OFF, L4_SPORT_OFF, p.saddr, p.sport),
    }
}

/// 32-bit words of an address of the packet's family: 1 or 4.
#[inline(always)]
pub fn addr_words(p: &Packet) -> usize {
    if p.is_v6() {
        4
    } else {
        1
    }
}

/// `check` after the address words `from` became `to` (one's complement
/// sums: an IPv4 address's zero words 1-3 would not change it anyway).
#[inline(always)]
pub fn csum_replace_addr(mut check: u16, from: &Addr, to: &Addr, words: usize) -> u16 {
    let mut i = 0;
    while i < 4 {
        if i < words {
            check = csum::replace4(check, from[i], to[i]);
        }
        i += 1;
    }
    check
}

// `data()`/`data_end()` read the context with volatile loads: the
// datapath's larger steps are functions of their own (stack), and LLVM would
// otherwise hoist these 32-bit context loads into the caller and pass them
// as arguments, which the callee then zero-extends with shifts: pointer
// arithmetic the verifier rejects on packet pointers.
impl PacketCtx for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the context pointer is valid for the program run.
        unsafe { core::ptr::read_volatile(&(*self.ctx).data) as usize }
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&(*self.ctx).data_end) as usize }
    }

    #[inline(always)]
    fn rewrite(&self, p: &Packet, side: Side, addr: &Addr, port: u16) -> Result<(), ()> {
        let (addr_off, port_off, old_addr, old_port) = side_fields(p, side);
        let words = addr_words(p);
        let data = XdpContext::data(self);
        let end = XdpContext::data_end(self);
        let l3 = data + p.l3_off;
        let l4 = data + p.l4_off;
        // SAFETY (all writes below): each access lies inside a range checked
        // against data_end just before it, in the same branch.
        unsafe {
            if p.is_tcp() {
                if l4 + 20 > end {
                    return Err(());
                }
                let c = core::ptr::read_unaligned((l4 + TCP_CSUM_OFF) as *const u16);
                let c = csum::replace2(csum_replace_addr(c, &old_addr, addr, words), old_port, port);
                core::ptr::write_unaligned((l4 + TCP_CSUM_OFF) as *mut u16, c);
                core::ptr::write_unaligned((l4 + port_off) as *mut u16, port);
            } else {
                if l4 + 8 > end {
                    return Err(());
                }
                let c = core::ptr::read_unaligned((l4 + UDP_CSUM_OFF) as *const u16);
                // A zero UDP checksum means "none" (IPv4 only) and stays
                // zero; a computed zero is sent as 0xffff.
                if c != 0 {
                    let mut c = csum::replace2(csum_replace_addr(c, &old_addr, addr, words), old_port, port);
                    if c == 0 {
                        c = 0xffff;
                    }
                    core::ptr::write_unaligned((l4 + UDP_CSUM_OFF) as *mut u16, c);
                }
                core::ptr::write_unaligned((l4 + port_off) as *mut u16, port);
            }
            if p.is_v6() {
                if l3 + 40 > end {
                    return Err(());
                }
                // No header checksum in IPv6.
                core::ptr::write_unaligned((l3 + addr_off) as *mut Addr, *addr);
            } else {
                if l3 + 20 > end {
                    return Err(());
                }
                let c = core::ptr::read_unaligned((l3 + IP_CSUM_OFF) as *const u16);
                core::ptr::write_unaligned((l3 + IP_CSUM_OFF) as *mut u16, csum::replace4(c, old_addr[0], addr[0]));
                core::ptr::write_unaligned((l3 + addr_off) as *mut u32, addr[0]);
            }
        }
        Ok(())
    }
}

impl PacketCtx for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the skb pointer is valid for the program run.
        unsafe { core::ptr::read_volatile(&(*self.skb.skb).data) as usize }
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&(*self.skb.skb).data_end) as usize }
    }

    #[inline(always)]
    fn rewrite(&self, p: &Packet, side: Side, addr: &Addr, port: u16) -> Result<(), ()> {
        let (addr_off, port_off, old_addr, old_port) = side_fields(p, side);
        let words = addr_words(p);
        // For UDP, MARK_MANGLED_0 leaves a zero ("no checksum") field alone
        // and turns a computed zero into 0xffff.
        let udp_flags = if p.is_tcp() { 0 } else { BPF_F_MARK_MANGLED_0 as u64 };
        let csum_off = p.l4_csum_off();
        let mut i = 0;
        while i < 4 {
            if i < words {
                self.l4_csum_replace(
                    csum_off,
                    old_addr[i] as u64,
                    addr[i] as u64,
                    BPF_F_PSEUDO_HDR as u64 | udp_flags | 4,
                )
                .map_err(|_| ())?;
            }
            i += 1;
        }
        self.l4_csum_replace(csum_off, old_port as u64, port as u64, udp_flags | 2)
            .map_err(|_| ())?;
        if p.is_v6() {
            self.store(p.l3_off + addr_off, addr, 0).map_err(|_| ())?;
        } else {
            self.l3_csum_replace(p.l3_off + IP_CSUM_OFF, old_addr[0] as u64, addr[0] as u64, 4)
                .map_err(|_| ())?;
            self.store(p.l3_off + addr_off, &addr[0], 0).map_err(|_| ())?;
        }
        self.store(p.l4_off + port_off, &port, 0).map_err(|_| ())?;
        Ok(())
    }
}
