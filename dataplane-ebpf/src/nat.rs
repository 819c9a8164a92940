//! Address/port rewrites with checksum updates, for XDP and for TC.
//!
//! Both ends of a packet are rewritten at once (DNAT, and SNAT or its
//! reverse when the flow needs it), their changes summed into one
//! difference for the addresses and one for the ports.
//! XDP has no checksum helpers and sees frames from the wire with complete
//! checksums: it writes directly and updates checksums incrementally.
//! TC may see `CHECKSUM_PARTIAL` skbs from local sockets, where the L4
//! checksum field holds only the pseudo-header sum: there the L4 checksum
//! goes through the kernel helper, with `BPF_F_PSEUDO_HDR` for the
//! addresses, which does the right thing for each case.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_update,
    programs::{TcContext, XdpContext},
};
use dataplane_common::{
    csum, kernel_features,
    skb_summed::{CHECKSUM_NONE, CHECKSUM_PARTIAL, CHECKSUM_UNNECESSARY},
    Addr,
};

use crate::maps::{kernel_has, skb_summed_at};

use crate::parse::{
    Packet, IP6_DADDR_OFF, IP6_SADDR_OFF, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, L4_DPORT_OFF, L4_SPORT_OFF,
    TCP_CSUM_OFF, UDP_CSUM_OFF,
};

/// The new address and port of one end of a packet (network order, the
/// address of the packet's family).
pub type Endpoint<'a> = (&'a Addr, u16);

/// What the datapath needs from a program context.
pub trait PacketCtx: aya_ebpf::EbpfContext {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Rewrites the destination of `p` to `dst` and its source to `src`
    /// (each when given), keeping the IPv4 header checksum and the L4
    /// checksum (whose pseudo-header holds the addresses, in both families)
    /// valid.
    fn rewrite(&self, p: &Packet, dst: Option<Endpoint>, src: Option<Endpoint>) -> Result<(), ()>;
}

/// What a rewrite changes, as one's complement sums of `!old + new` over
/// 16-bit words (RFC 1624): of the addresses, which the IPv4 header
/// checksum and the L4 pseudo-header cover, and of the ports, which only
/// the L4 checksum covers. Unfolded; at most 32 words, so no overflow.
#[derive(Clone, Copy)]
struct Delta {
    addr: u32,
    port: u32,
}

#[inline(always)]
fn add_word32(sum: u32, old: u32, new: u32) -> u32 {
    sum + ((!old) >> 16) + ((!old) & 0xffff) + (new >> 16) + (new & 0xffff)
}

#[inline(always)]
fn delta(p: &Packet, dst: Option<Endpoint>, src: Option<Endpoint>) -> Delta {
    let words = addr_words(p);
    let mut d = Delta { addr: 0, port: 0 };
    let mut i = 0;
    while i < 4 {
        if i < words {
            if let Some((a, _)) = dst {
                d.addr = add_word32(d.addr, p.daddr[i], a[i]);
            }
            if let Some((a, _)) = src {
                d.addr = add_word32(d.addr, p.saddr[i], a[i]);
            }
        }
        i += 1;
    }
    if let Some((_, port)) = dst {
        d.port += (!p.dport) as u32 + port as u32;
    }
    if let Some((_, port)) = src {
        d.port += (!p.sport) as u32 + port as u32;
    }
    d
}

/// `check` (a full checksum) after the fields summed in `diff` changed.
#[inline(always)]
fn apply(check: u16, diff: u32) -> u16 {
    !csum::fold((!check) as u32 + diff)
}

/// Whether a folded difference changes nothing: `!x + x` words sum to
/// 0xffff, the one's complement zero (0 only for an empty sum).
#[inline(always)]
fn is_zero(folded: u16) -> bool {
    folded == 0xffff || folded == 0
}

/// Whether two 16-bit one's complement sums are equal (0 and 0xffff are
/// both zero).
#[inline(always)]
fn same_sum(a: u16, b: u16) -> bool {
    a == b || (is_zero(a) && is_zero(b))
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

/// Writes a 16-byte address to `ptr` (packet memory) as four 32-bit
/// stores. A 16-byte `write_unaligned` of the value becomes a call to
/// `memmove` (LLVM cannot rule out that the source overlaps the packet),
/// which on BPF is a byte-by-byte loop of some 130 instructions. The words
/// are read with volatile loads: `a` may sit on the stack at a 4-byte
/// boundary, and LLVM would otherwise merge pairs of them into 8-byte
/// loads (misaligned accesses are enabled for packet data), which the
/// verifier rejects on the stack.
///
/// # Safety
/// `ptr..ptr + 16` must be writable packet memory checked against its end.
#[inline(always)]
pub unsafe fn put_addr16(ptr: usize, a: &Addr) {
    let w0 = core::ptr::read_volatile(&a[0]);
    let w1 = core::ptr::read_volatile(&a[1]);
    let w2 = core::ptr::read_volatile(&a[2]);
    let w3 = core::ptr::read_volatile(&a[3]);
    core::ptr::write_unaligned(ptr as *mut u32, w0);
    core::ptr::write_unaligned((ptr + 4) as *mut u32, w1);
    core::ptr::write_unaligned((ptr + 8) as *mut u32, w2);
    core::ptr::write_unaligned((ptr + 12) as *mut u32, w3);
}

/// Writes the new addresses and ports of a rewrite into the packet and
/// updates the IPv4 header checksum; the L4 checksum is left to the caller.
/// `data`/`end` are the packet bounds of the running program.
///
/// # Safety
/// `data`/`end` must be the context's current packet bounds, and the
/// program must be allowed to write the packet (XDP; TC with direct packet
/// access).
#[inline(always)]
unsafe fn write_fields(
    p: &Packet,
    data: usize,
    end: usize,
    dst: Option<Endpoint>,
    src: Option<Endpoint>,
    d: Delta,
) -> Result<(), ()> {
    let l3 = data + p.l3_off;
    let l4 = data + p.l4_off;
    // Each access below lies inside a range checked against `end` just
    // before it, in the same branch.
    if l4 + L4_PORTS_LEN > end {
        return Err(());
    }
    if let Some((_, port)) = dst {
        core::ptr::write_unaligned((l4 + L4_DPORT_OFF) as *mut u16, port);
    }
    if let Some((_, port)) = src {
        core::ptr::write_unaligned((l4 + L4_SPORT_OFF) as *mut u16, port);
    }
    if p.is_v6() {
        if l3 + 40 > end {
            return Err(());
        }
        // No header checksum in IPv6.
        if let Some((a, _)) = dst {
            put_addr16(l3 + IP6_DADDR_OFF, a);
        }
        if let Some((a, _)) = src {
            put_addr16(l3 + IP6_SADDR_OFF, a);
        }
    } else {
        if l3 + 20 > end {
            return Err(());
        }
        let c = core::ptr::read_unaligned((l3 + IP_CSUM_OFF) as *const u16);
        core::ptr::write_unaligned((l3 + IP_CSUM_OFF) as *mut u16, apply(c, d.addr));
        if let Some((a, _)) = dst {
            core::ptr::write_unaligned((l3 + IP_DADDR_OFF) as *mut u32, a[0]);
        }
        if let Some((a, _)) = src {
            core::ptr::write_unaligned((l3 + IP_SADDR_OFF) as *mut u32, a[0]);
        }
    }
    Ok(())
}

/// Source and destination port: the part of the L4 header every rewrite
/// writes.
const L4_PORTS_LEN: usize = 4;

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
    fn rewrite(&self, p: &Packet, dst: Option<Endpoint>, src: Option<Endpoint>) -> Result<(), ()> {
        let d = delta(p, dst, src);
        let data = XdpContext::data(self);
        let end = XdpContext::data_end(self);
        let l4 = data + p.l4_off;
        // SAFETY (all accesses below): each lies inside a range checked
        // against data_end just before it, in the same branch.
        unsafe {
            if p.is_tcp() {
                if l4 + 20 > end {
                    return Err(());
                }
                let c = core::ptr::read_unaligned((l4 + TCP_CSUM_OFF) as *const u16);
                core::ptr::write_unaligned((l4 + TCP_CSUM_OFF) as *mut u16, apply(c, d.addr + d.port));
            } else {
                if l4 + 8 > end {
                    return Err(());
                }
                let c = core::ptr::read_unaligned((l4 + UDP_CSUM_OFF) as *const u16);
                // A zero UDP checksum means "none" (IPv4 only) and stays
                // zero; a computed zero is sent as 0xffff.
                if c != 0 {
                    let mut c = apply(c, d.addr + d.port);
                    if c == 0 {
                        c = 0xffff;
                    }
                    core::ptr::write_unaligned((l4 + UDP_CSUM_OFF) as *mut u16, c);
                }
            }
            write_fields(p, data, end, dst, src, d)
        }
    }
}

/// `BPF_F_IPV6` of `bpf_l4_csum_replace` (not in aya's bindings).
const BPF_F_IPV6: u64 = 1 << 7;

/// The address difference `addr` into the L4 checksum of a TC packet,
/// pseudo-header included, with `skb->csum` kept right under
/// `CHECKSUM_COMPLETE` (a NIC's sum over the whole packet, which the stack
/// checks the L4 checksum against). For IPv4 the helper's update of
/// `skb->csum` is right: the address change is cancelled by the IPv4
/// header checksum, the L4 checksum change is not. For IPv6 there is no
/// header checksum: the address change and the L4 checksum change cancel
/// each other and `skb->csum` must not move, but the helper moves it
/// (NICs' `CHECKSUM_COMPLETE` packets then fail with "hw csum failure" and
/// are checked again in software). `BPF_F_IPV6` (6.16) tells the helper;
/// on older kernels the difference the helper took away is added back.
/// (Inlined: as a function of its own, Debian's 6.1 verifier walked 20,000
/// more instructions of `dp_tc`, though 6.18 walks 3,000 fewer.)
#[inline(always)]
fn l4_csum_replace_addr(ctx: &TcContext, p: &Packet, csum_off: usize, addr: u16, udp_flags: u64) -> Result<(), ()> {
    let has_flag = kernel_has(kernel_features::CSUM_IPV6);
    // Without a branch on the family where the kernel has the flag.
    let v6 = p.is_v6() as u64;
    let ipv6_flag = if has_flag { v6 * BPF_F_IPV6 } else { 0 };
    ctx.l4_csum_replace(
        csum_off,
        0,
        addr as u64,
        BPF_F_PSEUDO_HDR as u64 | udp_flags | ipv6_flag,
    )
    .map_err(|_| ())?;
    if !has_flag && v6 != 0 {
        // SAFETY: the program's own skb. Fails (harmlessly) unless the
        // skb is CHECKSUM_COMPLETE, the only case where the helper
        // touched skb->csum.
        unsafe { bpf_csum_update(ctx.skb.skb, addr as u32) };
    }
    Ok(())
}

/// The kernel's `struct sk_buff` of a TC program's context: the kfunc
/// `bpf_cast_to_kern_ctx` (6.2+), which the verifier turns into a plain
/// register move. Our toolchain cannot emit a kfunc call, so the call is
/// written as its instruction with a placeholder immediate
/// (`dataplane_common::skb_summed::PLACEHOLDER_INSN`) that the loader
/// resolves, or replaces with `r0 = 0` on kernels without the kfunc (where
/// [`skb_summed_at`] is `None` and this is never reached).
///
/// # Safety
/// `skb` must be the program's context pointer; the result may only be
/// read at offsets of fields of `struct sk_buff` (the verifier checks each
/// access against the kernel's BTF).
#[inline(always)]
unsafe fn kern_skb(skb: *mut aya_ebpf::bindings::__sk_buff) -> *const u8 {
    let k: *const u8;
    core::arch::asm!(
        ".quad {insn}",
        insn = const dataplane_common::skb_summed::PLACEHOLDER_INSN,
        inlateout("r1") skb => _,
        lateout("r0") k,
        lateout("r2") _,
        lateout("r3") _,
        lateout("r4") _,
        lateout("r5") _,
        options(nostack, readonly, preserves_flags),
    );
    k
}

/// `skb->ip_summed` of the program's skb, where the agent told where it
/// lies (`dataplane_common::SKB_SUMMED_GLOBAL`).
#[inline(always)]
fn ip_summed(ctx: &TcContext) -> Option<u8> {
    let (off, shift) = skb_summed_at()?;
    // SAFETY: the context pointer; the offset is the byte holding
    // `ip_summed` in this kernel's `struct sk_buff` (from its BTF).
    unsafe {
        let k = kern_skb(ctx.skb.skb);
        if k.is_null() {
            return None;
        }
        let b = core::ptr::read_volatile(k.add(off as usize));
        Some((b >> shift) & 3)
    }
}

/// Direct access to the L4 checksum field of a TC packet (at `off` from
/// the start of the frame), bounds-checked against the current packet.
trait TcCsum {
    fn l4_csum(&self, off: usize) -> Result<u16, ()>;
    fn put_l4_csum(&self, off: usize, c: u16) -> Result<(), ()>;
}

impl TcCsum for TcContext {
    #[inline(always)]
    fn l4_csum(&self, off: usize) -> Result<u16, ()> {
        let at = TcContext::data(self) + off;
        if at + 2 > TcContext::data_end(self) {
            return Err(());
        }
        // SAFETY: inside the packet, checked just above.
        Ok(unsafe { core::ptr::read_unaligned(at as *const u16) })
    }

    #[inline(always)]
    fn put_l4_csum(&self, off: usize, c: u16) -> Result<(), ()> {
        let at = TcContext::data(self) + off;
        if at + 2 > TcContext::data_end(self) {
            return Err(());
        }
        // SAFETY: inside the packet, checked just above; TC may write it.
        unsafe { core::ptr::write_unaligned(at as *mut u16, c) };
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

    /// Addresses, ports and the IPv4 header checksum are written directly
    /// (this program writes the packet directly anyway: the ICMP error
    /// translation; the verifier's prologue unclones a cloned skb first).
    /// The L4 checksum goes through `bpf_l4_csum_replace`, which alone
    /// knows whether the field holds a full checksum or, for
    /// `CHECKSUM_PARTIAL` skbs from local sockets, only the pseudo-header
    /// sum: one call with the address difference (size 0: by difference,
    /// so one call for both ends; `BPF_F_PSEUDO_HDR`: applied in both
    /// cases; `skb->csum` under `CHECKSUM_COMPLETE`: see
    /// [`l4_csum_replace_addr`]). The port
    /// difference must reach a full checksum only. How the helper changed
    /// the field tells which kind it holds, so the ports are folded in
    /// here, directly, instead of by a second call (which would do nothing
    /// to a partial checksum); without an address change the second call
    /// remains. Under `CHECKSUM_COMPLETE` the port write and the field
    /// change cancel out in `skb->csum`, as with the helper.
    #[inline(always)]
    fn rewrite(&self, p: &Packet, dst: Option<Endpoint>, src: Option<Endpoint>) -> Result<(), ()> {
        let d = delta(p, dst, src);
        // SAFETY: the bounds are this program's; TC may write the packet
        // directly.
        unsafe { write_fields(p, TcContext::data(self), TcContext::data_end(self), dst, src, d)? };
        let csum_off = p.l4_csum_off();
        match ip_summed(self) {
            // A full checksum that nothing else sums: as XDP does.
            Some(CHECKSUM_NONE | CHECKSUM_UNNECESSARY) => {
                update_l4_csum(self, p, csum_off, |c| apply(c, d.addr + d.port))
            }
            // The pseudo-header sum (not inverted) the stack or the device
            // completes over the L4 header and payload: the addresses
            // only, what `bpf_l4_csum_replace` does to it.
            Some(CHECKSUM_PARTIAL) => {
                let addr = csum::fold(d.addr);
                if is_zero(addr) {
                    return Ok(());
                }
                update_l4_csum(self, p, csum_off, |c| csum::fold(c as u32 + addr as u32))
            }
            _ => l4_csum_by_helper(self, p, csum_off, d),
        }
    }
}

/// The L4 checksum field of a TC packet replaced by `new(field)`, with
/// UDP's rule for zero (what `BPF_F_MARK_MANGLED_0` does for the helper):
/// a zero field ("no checksum") stays zero, a computed zero is written as
/// 0xffff.
#[inline(always)]
fn update_l4_csum(ctx: &TcContext, p: &Packet, csum_off: usize, new: impl Fn(u16) -> u16) -> Result<(), ()> {
    let c = ctx.l4_csum(csum_off)?;
    let udp = !p.is_tcp();
    if udp && c == 0 {
        return Ok(());
    }
    let mut c = new(c);
    if udp && c == 0 {
        c = 0xffff;
    }
    ctx.put_l4_csum(csum_off, c)
}

/// The L4 checksum update of `TcContext`'s [`PacketCtx::rewrite`] through
/// `bpf_l4_csum_replace`: for `CHECKSUM_COMPLETE` skbs, and for every
/// skb where `skb->ip_summed` cannot be read.
#[inline(always)]
fn l4_csum_by_helper(ctx: &TcContext, p: &Packet, csum_off: usize, d: Delta) -> Result<(), ()> {
    // For UDP, MARK_MANGLED_0 leaves a zero ("no checksum") field alone
    // and turns a computed zero into 0xffff.
    let udp_flags = if p.is_tcp() { 0 } else { BPF_F_MARK_MANGLED_0 as u64 };
    let addr = csum::fold(d.addr);
    let port = csum::fold(d.port);
    if is_zero(addr) {
        if !is_zero(port) {
            ctx.l4_csum_replace(csum_off, 0, port as u64, udp_flags)
                .map_err(|_| ())?;
        }
        return Ok(());
    }
    let before = ctx.l4_csum(csum_off)?;
    l4_csum_replace_addr(ctx, p, csum_off, addr, udp_flags)?;
    if is_zero(port) || (!p.is_tcp() && before == 0) {
        return Ok(());
    }
    // What the helper did to the field tells which kind of sum it
    // holds: a full checksum became `before - addr`, a partial one
    // (pseudo-header only) `before + addr`; the two differ for any
    // non-zero `addr`. Only a full checksum covers the ports.
    let after = ctx.l4_csum(csum_off)?;
    if same_sum(csum::fold(after as u32 + addr as u32), before) {
        let mut c = apply(after, d.port);
        if !p.is_tcp() && c == 0 {
            c = 0xffff;
        }
        ctx.put_l4_csum(csum_off, c)?;
    }
    Ok(())
}
