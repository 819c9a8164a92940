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
use dataplane_common::csum;

use crate::parse::{
    Packet, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, L4_DPORT_OFF, L4_SPORT_OFF, TCP_CSUM_OFF, UDP_CSUM_OFF,
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
    /// (network order), keeping the IPv4 and L4 checksums valid.
    fn rewrite(&self, p: &Packet, side: Side, addr: u32, port: u16) -> Result<(), ()>;
}

#[inline(always)]
fn side_fields(p: &Packet, side: Side) -> (usize, usize, u32, u16) {
    match side {
        Side::Dst => (IP_DADDR_OFF, L4_DPORT_OFF, p.daddr, p.dport),
        Side::Src => (IP_SADDR_OFF, L4_SPORT_OFF, p.saddr, p.sport),
    }
}

impl PacketCtx for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn rewrite(&self, p: &Packet, side: Side, addr: u32, port: u16) -> Result<(), ()> {
        let (addr_off, port_off, old_addr, old_port) = side_fields(p, side);
        let data = XdpContext::data(self);
        let end = XdpContext::data_end(self);
        let l3 = data + p.l3_off;
        if l3 + 20 > end {
            return Err(());
        }
        let l4 = data + p.l4_off;
        // SAFETY (all writes below): each access lies inside a range checked
        // against data_end just before it, in the same branch.
        unsafe {
            if p.is_tcp() {
                if l4 + 20 > end {
                    return Err(());
                }
                let c = core::ptr::read_unaligned((l4 + TCP_CSUM_OFF) as *const u16);
                let c = csum::replace2(csum::replace4(c, old_addr, addr), old_port, port);
                core::ptr::write_unaligned((l4 + TCP_CSUM_OFF) as *mut u16, c);
                core::ptr::write_unaligned((l4 + port_off) as *mut u16, port);
            } else {
                if l4 + 8 > end {
                    return Err(());
                }
                let c = core::ptr::read_unaligned((l4 + UDP_CSUM_OFF) as *const u16);
                // A zero UDP checksum means "none" and stays zero; a computed
                // zero is sent as 0xffff.
                if c != 0 {
                    let mut c = csum::replace2(csum::replace4(c, old_addr, addr), old_port, port);
                    if c == 0 {
                        c = 0xffff;
                    }
                    core::ptr::write_unaligned((l4 + UDP_CSUM_OFF) as *mut u16, c);
                }
                core::ptr::write_unaligned((l4 + port_off) as *mut u16, port);
            }
            let c = core::ptr::read_unaligned((l3 + IP_CSUM_OFF) as *const u16);
            core::ptr::write_unaligned((l3 + IP_CSUM_OFF) as *mut u16, csum::replace4(c, old_addr, addr));
            core::ptr::write_unaligned((l3 + addr_off) as *mut u32, addr);
        }
        Ok(())
    }
}

impl PacketCtx for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn rewrite(&self, p: &Packet, side: Side, addr: u32, port: u16) -> Result<(), ()> {
        let (addr_off, port_off, old_addr, old_port) = side_fields(p, side);
        // For UDP, MARK_MANGLED_0 leaves a zero ("no checksum") field alone
        // and turns a computed zero into 0xffff.
        let udp_flags = if p.is_tcp() { 0 } else { BPF_F_MARK_MANGLED_0 as u64 };
        let csum_off = p.l4_csum_off();
        self.l4_csum_replace(
            csum_off,
            old_addr as u64,
            addr as u64,
            BPF_F_PSEUDO_HDR as u64 | udp_flags | 4,
        )
        .map_err(|_| ())?;
        self.l4_csum_replace(csum_off, old_port as u64, port as u64, udp_flags | 2)
            .map_err(|_| ())?;
        self.l3_csum_replace(p.l3_off + IP_CSUM_OFF, old_addr as u64, addr as u64, 4)
            .map_err(|_| ())?;
        self.store(p.l3_off + addr_off, &addr, 0).map_err(|_| ())?;
        self.store(p.l4_off + port_off, &port, 0).map_err(|_| ())?;
        Ok(())
    }
}
