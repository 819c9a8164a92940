//! `skb->ip_summed` for the TC program (`dataplane_common::skb_summed`).
//!
//! TC rewrites need to know which kind of L4 checksum an skb carries: a
//! full one, a `CHECKSUM_PARTIAL` pseudo-header sum, or a full one that
//! `skb->csum` (`CHECKSUM_COMPLETE`) must follow. `struct __sk_buff` does
//! not say; without knowing, every rewrite goes through
//! `bpf_l4_csum_replace`, which knows. Since 6.2 a TC program can read the
//! kernel's `struct sk_buff` through the kfunc `bpf_cast_to_kern_ctx`
//! (which the verifier turns into a register move). Our toolchain (aya
//! 0.14, bpf-linker) cannot emit a kfunc call with its relocation, so the
//! object carries the call as an instruction with a placeholder immediate,
//! and this module:
//!
//! - finds the kfunc's BTF id and `ip_summed`'s place in `struct sk_buff`
//!   in the kernel's BTF (`/sys/kernel/btf/vmlinux`);
//! - checks both by loading and running a probe program that reads the
//!   field through the kfunc (it must read `CHECKSUM_NONE` for a plain test
//!   run and, where the kernel can make one, `CHECKSUM_COMPLETE` for a
//!   `BPF_F_TEST_SKB_CHECKSUM_COMPLETE` run);
//! - patches the object's placeholders before it is loaded: the kfunc's id,
//!   or `r0 = 0` where any of this fails (the programs then read
//!   `SKB_SUMMED_GLOBAL` as 0 and always call the helper; the verifier
//!   removes the other path).

use std::{borrow::Cow, os::fd::AsFd, sync::OnceLock};

use dataplane_common::skb_summed::{self, CHECKSUM_COMPLETE, CHECKSUM_NONE, MOV_R0_0, PLACEHOLDER_INSN};

use super::sys;

/// Where the kernel's BTF is.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// The kfunc the placeholder stands for.
const KFUNC: &str = "bpf_cast_to_kern_ctx";

/// What this kernel offers the TC program's checksum updates.
/// `Default`: not available.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkbSummed {
    /// The value of `SKB_SUMMED_GLOBAL` (0: not available).
    pub global: u32,
    /// The BTF id of `bpf_cast_to_kern_ctx` the placeholders get, when
    /// `global` is non-zero.
    pub kfunc_id: Option<u32>,
    /// Why it is not available (for the agent's start-up log).
    pub missing: Option<&'static str>,
}

impl SkbSummed {
    const fn none(why: &'static str) -> Self {
        SkbSummed {
            global: 0,
            kfunc_id: None,
            missing: Some(why),
        }
    }
}

/// This kernel's [`SkbSummed`], found once.
pub fn skb_summed() -> SkbSummed {
    static FOUND: OnceLock<SkbSummed> = OnceLock::new();
    *FOUND.get_or_init(|| match std::fs::read(VMLINUX_BTF) {
        Ok(btf) => find(&btf),
        Err(_) => SkbSummed::none("no kernel BTF (/sys/kernel/btf/vmlinux)"),
    })
}

/// [`skb_summed`] from the kernel BTF `btf`, checked by a probe program.
fn find(btf: &[u8]) -> SkbSummed {
    let Some(types) = Btf::parse(btf) else {
        return SkbSummed::none("kernel BTF unreadable");
    };
    let Some(id) = types.func_id(KFUNC) else {
        return SkbSummed::none("no kfunc bpf_cast_to_kern_ctx (kernels before 6.2)");
    };
    let Some((off, shift)) = types.ip_summed() else {
        return SkbSummed::none("no 2-bit sk_buff.ip_summed in the kernel BTF");
    };
    if !probe(id, off, shift) {
        return SkbSummed::none("the probe program reading sk_buff.ip_summed failed");
    }
    SkbSummed {
        global: skb_summed::encode(off, shift),
        kfunc_id: Some(id),
        missing: None,
    }
}

/// Loads a TC program that returns `ip_summed` read through the kfunc and
/// runs it: `CHECKSUM_NONE` for a plain run, `CHECKSUM_COMPLETE` for a
/// `BPF_F_TEST_SKB_CHECKSUM_COMPLETE` one (6.17+; a kernel that refuses
/// the flag skips that half).
fn probe(id: u32, off: u16, shift: u8) -> bool {
    let insns = [
        // r0 = bpf_cast_to_kern_ctx(r1)
        0x85 | 0x20 << 8 | (id as u64) << 32,
        // r0 = *(u8 *)(r0 + off)
        0x71 | (off as u64) << 16,
        // r0 >>= shift; r0 &= 3; exit
        0x77 | (shift as u64) << 32,
        0x57 | 3 << 32,
        0x95,
    ];
    let Ok(prog) = sys::prog_load(sys::PROG_TYPE_SCHED_CLS, "dp_probe_summed", &insns) else {
        return false;
    };
    // An Ethernet frame with an IPv4/UDP header (the checksum-complete run
    // sums the packet after the Ethernet header).
    let mut frame = [0u8; 64];
    frame[12] = 0x08;
    frame[14] = 0x45;
    frame[16..18].copy_from_slice(&50u16.to_be_bytes());
    frame[22] = 64;
    frame[23] = 17;
    let mut out = [0u8; 64];
    match sys::prog_test_run(prog.as_fd(), &frame, &mut out, 1) {
        Ok(r) if r.retval == CHECKSUM_NONE as u32 => {}
        _ => return false,
    }
    match sys::prog_test_run_flags(prog.as_fd(), &frame, &mut out, 1, sys::TEST_SKB_CHECKSUM_COMPLETE) {
        Ok(r) => r.retval == CHECKSUM_COMPLETE as u32,
        Err(e) => e.errno() == Some(libc::EINVAL),
    }
}

/// `object` (an eBPF ELF object) with every placeholder instruction in its
/// executable sections replaced: by the call of kfunc `kfunc_id`, or by
/// `r0 = 0` without one. Borrowed when there is none to replace.
pub fn patch_object(object: &[u8], kfunc_id: Option<u32>) -> Result<Cow<'_, [u8]>, String> {
    let sections = exec_sections(object)?;
    let replacement = match kfunc_id {
        Some(id) => (PLACEHOLDER_INSN & 0xffff_ffff) | (id as u64) << 32,
        None => MOV_R0_0,
    };
    let placeholder = PLACEHOLDER_INSN.to_le_bytes();
    let mut out: Option<Vec<u8>> = None;
    for (start, len) in sections {
        let mut at = start;
        while at + 8 <= start + len {
            if object[at..at + 8] == placeholder {
                out.get_or_insert_with(|| object.to_vec())[at..at + 8].copy_from_slice(&replacement.to_le_bytes());
            }
            at += 8;
        }
    }
    Ok(match out {
        Some(v) => Cow::Owned(v),
        None => Cow::Borrowed(object),
    })
}

/// (file offset, size) of each executable section of an ELF object.
fn exec_sections(elf: &[u8]) -> Result<Vec<(usize, usize)>, String> {
    use object::{Object, ObjectSection, SectionFlags};
    const SHF_EXECINSTR: u64 = 4;
    let obj = object::File::parse(elf).map_err(|e| format!("not an ELF object: {e}"))?;
    let mut out = Vec::new();
    for section in obj.sections() {
        let SectionFlags::Elf { sh_flags } = section.flags() else {
            continue;
        };
        if sh_flags & SHF_EXECINSTR == 0 {
            continue;
        }
        if let Some((off, size)) = section.file_range() {
            out.push((off as usize, size as usize));
        }
    }
    Ok(out)
}

/// The little of BTF this needs: function ids by name, struct members.
struct Btf<'a> {
    strings: &'a [u8],
    /// Each type's record (the 12-byte common part and what follows it),
    /// by id - 1.
    types: Vec<&'a [u8]>,
}

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

impl<'a> Btf<'a> {
    fn parse(b: &'a [u8]) -> Option<Self> {
        let u32_at = |o: usize| b.get(o..o + 4).map(|x| u32::from_le_bytes(x.try_into().unwrap()));
        if b.get(..2)? != [0x9f, 0xeb] {
            return None;
        }
        let hdr = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let tsec = b.get(hdr + type_off..hdr + type_off + type_len)?;
        let strings = b.get(hdr + str_off..hdr + str_off + str_len)?;
        let mut types = Vec::new();
        let mut at = 0;
        while at < tsec.len() {
            let info = u32::from_le_bytes(tsec.get(at + 4..at + 8)?.try_into().ok()?);
            let vlen = (info & 0xffff) as usize;
            let extra = match (info >> 24) & 0x1f {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                _ => 0,
            };
            let rec = tsec.get(at..at + 12 + extra)?;
            types.push(rec);
            at += 12 + extra;
        }
        Some(Btf { strings, types })
    }

    fn name(&self, off: u32) -> &'a [u8] {
        let s = self.strings.get(off as usize..).unwrap_or(&[]);
        &s[..s.iter().position(|&c| c == 0).unwrap_or(s.len())]
    }

    fn word(rec: &[u8], i: usize) -> u32 {
        u32::from_le_bytes(rec[4 * i..4 * i + 4].try_into().unwrap())
    }

    fn kind(rec: &[u8]) -> u32 {
        (Self::word(rec, 1) >> 24) & 0x1f
    }

    fn func_id(&self, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|r| Self::kind(r) == KIND_FUNC && self.name(Self::word(r, 0)) == name.as_bytes())
            .map(|i| i as u32 + 1)
    }

    /// `(byte offset, bit offset in that byte)` of `struct sk_buff`'s
    /// `ip_summed`, a 2-bit bitfield (or a whole byte), looking through
    /// anonymous structs and unions.
    fn ip_summed(&self) -> Option<(u16, u8)> {
        let skb = self.types.iter().find(|r| {
            Self::kind(r) == KIND_STRUCT && Self::word(r, 2) != 0 && self.name(Self::word(r, 0)) == b"sk_buff"
        })?;
        let (bit, size) = self.member(skb, b"ip_summed", 0, 0)?;
        let (byte, shift) = (bit / 8, (bit % 8) as u8);
        match size {
            2 if shift <= 6 => Some((u16::try_from(byte).ok()?, shift)),
            // A whole-byte field: its low two bits.
            0 | 8 if shift == 0 => Some((u16::try_from(byte).ok()?, 0)),
            _ => None,
        }
    }

    /// The bit offset and bitfield size (0: not a bitfield) of member
    /// `name` of struct/union record `rec` at bit `base`, looking into
    /// anonymous members.
    fn member(&self, rec: &[u8], name: &[u8], base: u32, depth: u32) -> Option<(u32, u32)> {
        if depth > 8 {
            return None;
        }
        let kind_flag = Self::word(rec, 1) >> 31 != 0;
        let vlen = (Self::word(rec, 1) & 0xffff) as usize;
        for m in 0..vlen {
            let m = &rec[12 + 12 * m..24 + 12 * m];
            let (m_name, m_type, m_off) = (Self::word(m, 0), Self::word(m, 1), Self::word(m, 2));
            let (bit, size) = if kind_flag {
                (m_off & 0xff_ffff, m_off >> 24)
            } else {
                (m_off, 0)
            };
            if m_name != 0 {
                if self.name(m_name) == name {
                    return Some((base + bit, size));
                }
                continue;
            }
            let t = self.types.get((m_type as usize).checked_sub(1)?)?;
            if matches!(Self::kind(t), KIND_STRUCT | KIND_UNION) {
                if let Some(found) = self.member(t, name, base + bit, depth + 1) {
                    return Some(found);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 object: one executable section holding `insns` at
    /// file offset 64, and one data section holding the placeholder too
    /// (which must stay).
    fn elf(insns: &[u64]) -> Vec<u8> {
        let text: Vec<u8> = insns.iter().flat_map(|i| i.to_le_bytes()).collect();
        let data = PLACEHOLDER_INSN.to_le_bytes();
        // Code, then data, then an empty section name table (one NUL,
        // padded), then four section headers: null, code, data, names.
        let names = 64 + text.len() + data.len();
        let shoff = names + 8;
        let mut b = vec![0u8; shoff + 4 * 64];
        // ELF64, little-endian, version 1; ET_REL, EM_BPF, version 1,
        // 64-byte header, 64-byte section headers, 4 of them, names in 3.
        b[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]);
        b[0x10..0x12].copy_from_slice(&1u16.to_le_bytes());
        b[0x12..0x14].copy_from_slice(&247u16.to_le_bytes());
        b[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        b[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        b[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        b[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        b[0x3c..0x3e].copy_from_slice(&4u16.to_le_bytes());
        b[0x3e..0x40].copy_from_slice(&3u16.to_le_bytes());
        b[64..64 + text.len()].copy_from_slice(&text);
        b[64 + text.len()..names].copy_from_slice(&data);
        let mut header = |i: usize, ty: u32, flags: u64, off: usize, size: usize| {
            let h = shoff + 64 * i;
            b[h + 4..h + 8].copy_from_slice(&ty.to_le_bytes());
            b[h + 8..h + 16].copy_from_slice(&flags.to_le_bytes());
            b[h + 0x18..h + 0x20].copy_from_slice(&(off as u64).to_le_bytes());
            b[h + 0x20..h + 0x28].copy_from_slice(&(size as u64).to_le_bytes());
        };
        // PROGBITS alloc+exec, PROGBITS alloc, STRTAB.
        header(1, 1, 6, 64, text.len());
        header(2, 1, 2, 64 + text.len(), 8);
        header(3, 3, 0, names, 1);
        b
    }

    #[test]
    fn placeholders_in_code_get_the_kfunc_or_a_move() {
        let obj = elf(&[0xb7, PLACEHOLDER_INSN, 0x95, PLACEHOLDER_INSN]);
        // The instruction `call` to BTF id 1234 with src_reg 2, written
        // out by hand from the kernel's `struct bpf_insn` layout.
        let call = [0x85, 0x20, 0, 0, 0xd2, 0x04, 0, 0];
        let patched = patch_object(&obj, Some(1234)).unwrap();
        assert_eq!(&patched[64 + 8..64 + 16], &call);
        assert_eq!(&patched[64 + 24..64 + 32], &call);
        assert_eq!(&patched[64..64 + 8], &obj[64..64 + 8]);
        // The data section's copy is not code.
        assert_eq!(&patched[96..104], &PLACEHOLDER_INSN.to_le_bytes());
        let patched = patch_object(&obj, None).unwrap();
        assert_eq!(&patched[64 + 8..64 + 16], &[0xb7, 0, 0, 0, 0, 0, 0, 0]);
        let plain = elf(&[0xb7, 0x95]);
        assert!(matches!(patch_object(&plain, Some(1)).unwrap(), Cow::Borrowed(_)));
        assert!(patch_object(b"not an object", None).is_err());
    }

    /// On a kernel with BTF and the kfunc, the field is found and the
    /// probe agrees; `ip_summed` is within the first 256 bytes of
    /// `struct sk_buff` in every kernel since 4.x.
    #[test]
    fn this_kernels_btf_gives_ip_summed() {
        let Ok(btf) = std::fs::read(VMLINUX_BTF) else {
            panic!("{VMLINUX_BTF} is missing: this test needs a kernel built with CONFIG_DEBUG_INFO_BTF");
        };
        let types = Btf::parse(&btf).expect("the kernel's BTF parses");
        let (off, shift) = types.ip_summed().expect("sk_buff.ip_summed in the kernel's BTF");
        assert!(off < 256 && shift <= 6, "ip_summed at byte {off} bit {shift}");
        assert!(types.func_id("bpf_map_lookup_elem").is_some());
        assert!(types.func_id("no_such_function_here").is_none());
        // Where the kernel has the kfunc (6.2+), the probe program must
        // have read CHECKSUM_NONE and CHECKSUM_COMPLETE through it.
        if types.func_id(KFUNC).is_some() {
            let found = skb_summed();
            assert_eq!(found.missing, None);
            assert_eq!(skb_summed::decode(found.global), Some((off, shift)));
            assert_eq!(found.kfunc_id, types.func_id(KFUNC));
        }
    }
}
