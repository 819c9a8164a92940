//! Internet checksum helpers for incremental updates (RFC 1624), used by the
//! XDP program where no checksum helper exists. Values are taken exactly as
//! loaded from the packet (network order in a native integer): one's
//! complement sums do not depend on byte order as long as every operand uses
//! the same one.

#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum `check` after a 32-bit field changed from `from` to `to`.
#[inline(always)]
pub fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let sum = (!check) as u32 + ((!from) >> 16) + ((!from) & 0xffff) + (to >> 16) + (to & 0xffff);
    !fold(sum)
}

/// The checksum `check` after a 16-bit field changed from `from` to `to`.
#[inline(always)]
pub fn replace2(check: u16, from: u16, to: u16) -> u16 {
    let sum = (!check) as u32 + (!from) as u32 + to as u32;
    !fold(sum)
}
