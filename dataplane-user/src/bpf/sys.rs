//! Every raw `bpf(2)` call of the agent: the commands aya 0.14 has no
//! wrapper for (batched map reads and writes, test runs, pinned-object and
//! link commands, program queries). One place builds each command's
//! `union bpf_attr` member (include/uapi/linux/bpf.h) and one place makes
//! the call, so every failure comes back as a [`SysError`] that names the
//! command and keeps the kernel's errno.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use thiserror::Error;

/// The `bpf(2)` commands used here (`enum bpf_cmd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum Cmd {
    MapLookupElem = 1,
    MapUpdateElem = 2,
    MapDeleteElem = 3,
    MapGetNextKey = 4,
    ProgLoad = 5,
    ObjPin = 6,
    ObjGet = 7,
    ProgTestRun = 10,
    ObjGetInfoByFd = 15,
    ProgQuery = 16,
    MapLookupBatch = 24,
    MapUpdateBatch = 26,
    LinkCreate = 28,
    LinkUpdate = 29,
    MapCreate = 0,
}

impl Cmd {
    /// The command's name in the kernel's headers.
    pub fn name(self) -> &'static str {
        match self {
            Cmd::MapLookupElem => "BPF_MAP_LOOKUP_ELEM",
            Cmd::MapUpdateElem => "BPF_MAP_UPDATE_ELEM",
            Cmd::MapDeleteElem => "BPF_MAP_DELETE_ELEM",
            Cmd::MapGetNextKey => "BPF_MAP_GET_NEXT_KEY",
            Cmd::ProgLoad => "BPF_PROG_LOAD",
            Cmd::ObjPin => "BPF_OBJ_PIN",
            Cmd::ObjGet => "BPF_OBJ_GET",
            Cmd::ProgTestRun => "BPF_PROG_TEST_RUN",
            Cmd::ObjGetInfoByFd => "BPF_OBJ_GET_INFO_BY_FD",
            Cmd::ProgQuery => "BPF_PROG_QUERY",
            Cmd::MapLookupBatch => "BPF_MAP_LOOKUP_BATCH",
            Cmd::MapUpdateBatch => "BPF_MAP_UPDATE_BATCH",
            Cmd::LinkCreate => "BPF_LINK_CREATE",
            Cmd::LinkUpdate => "BPF_LINK_UPDATE",
            Cmd::MapCreate => "BPF_MAP_CREATE",
        }
    }
}

/// A failed `bpf(2)` call: the command, what it was about, and the kernel's
/// error with its errno.
#[derive(Debug, Error)]
#[error("{}{}: {source}", cmd.name(), if context.is_empty() { String::new() } else { format!(" ({context})") })]
pub struct SysError {
    pub cmd: Cmd,
    /// What the call was about (a path, how far a batch got); may be empty.
    pub context: String,
    #[source]
    pub source: io::Error,
}

impl SysError {
    fn new(cmd: Cmd, source: io::Error) -> Self {
        SysError {
            cmd,
            context: String::new(),
            source,
        }
    }

    /// The same error with `context` added.
    pub fn context(mut self, context: impl Into<String>) -> Self {
        self.context = context.into();
        self
    }

    /// The kernel's errno (`ENOENT`, `EPERM`, ...), when the call got one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// Makes one `bpf(2)` call.
///
/// # Safety
///
/// `attr` must be laid out as the kernel's `union bpf_attr` member for
/// `cmd`, and every pointer in it must point at memory of the size it
/// states that stays valid during the call.
unsafe fn bpf<A>(cmd: Cmd, attr: &mut A) -> Result<libc::c_long, SysError> {
    // SAFETY: the caller's contract above; the size passed is A's.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut A,
            size_of::<A>() as u32,
        )
    };
    if rc < 0 {
        Err(SysError::new(cmd, io::Error::last_os_error()))
    } else {
        Ok(rc)
    }
}

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `BPF_MAP_UPDATE_BATCH`: writes `keys[i] -> values[i]` into the map
/// behind `map` (key and value types of the map's exact sizes). On an
/// error, the entries before the failing one are written; the error's
/// context says how many.
pub fn map_update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), SysError> {
    assert_eq!(keys.len(), values.len());
    map_update_batch_raw(map, bytes_of(keys), bytes_of(values), keys.len(), 0)
}

/// [`map_update_batch`] on raw bytes: `count` keys and values of the map's
/// key and value sizes (per-CPU values: the value size rounded up to 8,
/// times the possible CPUs), with `elem_flags` (`BPF_ANY`,
/// `BPF_NOEXIST`, ...).
pub fn map_update_batch_raw(
    map: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
    elem_flags: u64,
) -> Result<(), SysError> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags,
        ..Default::default()
    };
    // SAFETY: keys and values hold `count` keys and values of the map's
    // sizes (the callers' contract, checked by the kernel against the
    // map), borrowed for the call.
    unsafe { bpf(Cmd::MapUpdateBatch, &mut attr) }
        .map(drop)
        .map_err(|e| e.context(format!("after {} of {count} entries", attr.count)))
}

/// Where a batched lookup stands between calls: an opaque token (a bucket
/// index for hash maps; 8 bytes cover every map type's).
#[derive(Default)]
pub struct BatchCursor {
    started: bool,
    token: u64,
}

/// `BPF_MAP_LOOKUP_BATCH`: reads up to `keys.len()` entries of the map
/// behind `map` from where `cursor` stands and moves it on. Returns how
/// many it read and whether the map has no more (`ENOENT` from the kernel,
/// which still reports what it read).
pub fn map_lookup_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    cursor: &mut BatchCursor,
    keys: &mut [K],
    values: &mut [V],
) -> Result<(usize, bool), SysError> {
    assert_eq!(keys.len(), values.len());
    let n = keys.len();
    map_lookup_batch_raw(map, cursor, bytes_of_mut(keys), bytes_of_mut(values), n)
}

/// [`map_lookup_batch`] on raw bytes: room for `count` keys and values of
/// the map's sizes (per-CPU values as for [`map_update_batch_raw`]).
pub fn map_lookup_batch_raw(
    map: BorrowedFd<'_>,
    cursor: &mut BatchCursor,
    keys: &mut [u8],
    values: &mut [u8],
    count: usize,
) -> Result<(usize, bool), SysError> {
    let token_in = cursor.token;
    let mut token_out = 0u64;
    let mut attr = BatchAttr {
        in_batch: if cursor.started {
            &token_in as *const u64 as u64
        } else {
            0
        },
        out_batch: &mut token_out as *mut u64 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: count as u32,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: keys and values have room for `count` keys and values of the
    // map's sizes (the callers' contract), the tokens for 8 bytes; all
    // outlive the call.
    let end = match unsafe { bpf(Cmd::MapLookupBatch, &mut attr) } {
        Ok(_) => false,
        Err(e) if e.errno() == Some(libc::ENOENT) => true,
        Err(e) => return Err(e),
    };
    cursor.started = true;
    cursor.token = token_out;
    Ok((attr.count as usize, end))
}

/// The `elem` member of `union bpf_attr` (lookup, update, next key).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

/// A call's result with `ENOENT` (no such key, or no next key) as `false`.
fn found<T>(r: Result<T, SysError>) -> Result<bool, SysError> {
    match r {
        Ok(_) => Ok(true),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_GET_NEXT_KEY`: the key after `key` (the first with `None`)
/// into `next`; `false` at the end. For maps without batch operations
/// (LPM tries).
pub fn map_get_next_key_raw(map: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> Result<bool, SysError> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        value_or_next_key: next.as_mut_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: key and next are of the map's key size (the callers'
    // contract), borrowed for the call.
    found(unsafe { bpf(Cmd::MapGetNextKey, &mut attr) })
}

/// `BPF_MAP_LOOKUP_ELEM` on raw bytes; `false` when the key is absent.
pub fn map_lookup_elem_raw(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> Result<bool, SysError> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value_or_next_key: value.as_mut_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: key and value are of the map's sizes (the callers' contract),
    // borrowed for the call.
    found(unsafe { bpf(Cmd::MapLookupElem, &mut attr) })
}

/// `BPF_MAP_UPDATE_ELEM` on raw bytes with `flags` (`BPF_ANY`,
/// `BPF_NOEXIST`, ...).
pub fn map_update_elem_raw(map: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> Result<(), SysError> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value_or_next_key: value.as_ptr() as u64,
        flags,
        ..Default::default()
    };
    // SAFETY: key and value are of the map's sizes (the callers' contract),
    // borrowed for the call.
    unsafe { bpf(Cmd::MapUpdateElem, &mut attr) }.map(drop)
}

/// `BPF_MAP_DELETE_ELEM` on raw bytes; `false` when the key was absent.
/// (The program tests' pool of loaded objects empties hash maps and LPM
/// tries of any key type with it: `tests/src/prog.rs`.)
pub fn map_delete_elem_raw(map: BorrowedFd<'_>, key: &[u8]) -> Result<bool, SysError> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: key is of the map's key size (the callers' contract),
    // borrowed for the call.
    found(unsafe { bpf(Cmd::MapDeleteElem, &mut attr) })
}

fn bytes_of<T: aya::Pod>(s: &[T]) -> &[u8] {
    // SAFETY: aya::Pod types are plain data without padding bytes that are
    // not fields; a slice of them is readable as bytes.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, size_of_val(s)) }
}

fn bytes_of_mut<T: aya::Pod>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as bytes_of; any bytes the kernel writes are a valid T (Pod).
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut u8, size_of_val(s)) }
}

/// The `test` member of `union bpf_attr`. `batch_size` is left out (the
/// kernel zero-fills a shorter attr); `cpu` is spelled out, so that the
/// struct has no padding, which would not be zeroed and which the kernel
/// reads as `cpu` (EINVAL without `BPF_F_TEST_RUN_ON_CPU`).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `BPF_F_TEST_SKB_CHECKSUM_COMPLETE` (6.17): the skb is given
/// `CHECKSUM_COMPLETE` with the sum of the frame from its network header,
/// and after the run the kernel checks that `skb->csum` still matches the
/// frame (`EBADMSG` when it does not), as the stack does for a NIC's sum.
pub const TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;

/// What `BPF_PROG_TEST_RUN` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRunOut {
    /// The program's return value.
    pub retval: u32,
    /// Bytes of `data_out` the program's output fills.
    pub size_out: usize,
    /// Average run time in ns (over `repeat` runs).
    pub duration_ns: u32,
}

/// `BPF_PROG_TEST_RUN`: runs the loaded program `prog` `repeat` times on
/// `data_in`, its output frame written to `data_out`.
pub fn prog_test_run(
    prog: BorrowedFd<'_>,
    data_in: &[u8],
    data_out: &mut [u8],
    repeat: u32,
) -> Result<TestRunOut, SysError> {
    prog_test_run_flags(prog, data_in, data_out, repeat, 0)
}

/// [`prog_test_run`] with `BPF_F_TEST_*` flags.
pub fn prog_test_run_flags(
    prog: BorrowedFd<'_>,
    data_in: &[u8],
    data_out: &mut [u8],
    repeat: u32,
    flags: u32,
) -> Result<TestRunOut, SysError> {
    prog_test_run_ctx(prog, data_in, data_out, repeat, flags, &[])
}

/// [`prog_test_run_flags`] with the program's context given (`ctx_in`,
/// e.g. the start of a `struct __sk_buff`; empty for none).
pub fn prog_test_run_ctx(
    prog: BorrowedFd<'_>,
    data_in: &[u8],
    data_out: &mut [u8],
    repeat: u32,
    flags: u32,
    ctx_in: &[u8],
) -> Result<TestRunOut, SysError> {
    let mut attr = TestRunAttr {
        flags,
        ctx_size_in: ctx_in.len() as u32,
        ctx_in: if ctx_in.is_empty() { 0 } else { ctx_in.as_ptr() as u64 },
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: data_in.len() as u32,
        data_size_out: data_out.len() as u32,
        data_in: data_in.as_ptr() as u64,
        data_out: data_out.as_mut_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: data_in/data_out/ctx_in point at buffers of the sizes given,
    // borrowed for the call.
    unsafe { bpf(Cmd::ProgTestRun, &mut attr) }?;
    Ok(TestRunOut {
        retval: attr.retval,
        size_out: (attr.data_size_out as usize).min(data_out.len()),
        duration_ns: attr.duration,
    })
}

/// `BPF_F_TEST_XDP_LIVE_FRAMES` (5.18): each run's frame, if the XDP
/// program redirects it (`XDP_REDIRECT`, or `XDP_TX`: out of the context's
/// ingress interface), is really sent, as a driver would; nothing is
/// copied back.
pub const TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// `BPF_PROG_TEST_RUN` of XDP program `prog` in live-frames mode
/// ([`TEST_XDP_LIVE_FRAMES`]): `repeat` frames made from `data_in`, with
/// the `struct xdp_md` context `ctx_in` (its ingress interface is where
/// `XDP_TX` sends), `batch_size` frames per batch (0: the kernel's 64).
/// A frame the target cannot take is dropped by the kernel, unreported.
pub fn prog_test_run_live(
    prog: BorrowedFd<'_>,
    data_in: &[u8],
    ctx_in: &[u8],
    repeat: u32,
    batch_size: u32,
) -> Result<(), SysError> {
    let mut attr = TestRunAttr {
        flags: TEST_XDP_LIVE_FRAMES,
        ctx_size_in: ctx_in.len() as u32,
        ctx_in: ctx_in.as_ptr() as u64,
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: data_in.len() as u32,
        data_in: data_in.as_ptr() as u64,
        repeat,
        batch_size,
        ..Default::default()
    };
    // SAFETY: data_in and ctx_in point at buffers of the sizes given,
    // borrowed for the call; no output buffer.
    unsafe { bpf(Cmd::ProgTestRun, &mut attr) }.map(drop)
}

/// `BPF_PROG_TYPE_XDP`.
pub const PROG_TYPE_XDP: u32 = 6;
/// `BPF_XDP`, the attach type of an XDP link.
pub const ATTACH_TYPE_XDP: u32 = 37;

/// `BPF_LINK_CREATE`: attaches `prog` to interface `ifindex` of the calling
/// thread's network namespace at `attach_type` with `flags`; the program
/// stays attached while the returned link is open.
pub fn link_create(prog: BorrowedFd<'_>, ifindex: u32, attach_type: u32, flags: u32) -> Result<OwnedFd, SysError> {
    #[repr(C)]
    struct Attr {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
    }
    let mut attr = Attr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        flags,
    };
    // SAFETY: plain integers only.
    let fd = unsafe { bpf(Cmd::LinkCreate, &mut attr) }?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The `BPF_PROG_LOAD` member of `union bpf_attr`, up to
/// `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `BPF_PROG_TYPE_SCHED_CLS`.
pub const PROG_TYPE_SCHED_CLS: u32 = 3;

/// `BPF_PROG_LOAD` of raw instructions (8 bytes each, as the kernel reads
/// them), GPL-licensed, for probes of what the kernel supports.
pub fn prog_load(prog_type: u32, name: &str, insns: &[u64]) -> Result<OwnedFd, SysError> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        ..Default::default()
    };
    // SAFETY: insns and license outlive the call; no log buffer is given.
    let fd = unsafe { bpf(Cmd::ProgLoad, &mut attr) }?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn c_path(cmd: Cmd, path: &Path) -> Result<CString, SysError> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| {
        SysError::new(cmd, io::Error::new(io::ErrorKind::InvalidInput, e)).context(path.display().to_string())
    })
}

/// The attributes of `BPF_OBJ_PIN` and `BPF_OBJ_GET`: a path, the fd to
/// pin (0 to get), no flags (so `path_fd` is not read).
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

impl ObjAttr {
    /// `path` must outlive the call the attributes are given to.
    fn new(path: &CString, bpf_fd: u32) -> ObjAttr {
        ObjAttr {
            pathname: path.as_ptr() as u64,
            bpf_fd,
            file_flags: 0,
            path_fd: 0,
            _pad: 0,
        }
    }
}

/// `BPF_OBJ_GET`: opens a pinned BPF object (map, program or link).
pub fn obj_get(pin: &Path) -> Result<OwnedFd, SysError> {
    let c = c_path(Cmd::ObjGet, pin)?;
    let mut attr = ObjAttr::new(&c, 0);
    // SAFETY: pathname points at a NUL-terminated string that outlives the
    // call.
    let fd = unsafe { bpf(Cmd::ObjGet, &mut attr) }.map_err(|e| e.context(pin.display().to_string()))?;
    // SAFETY: a new fd the kernel just returned to us, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `CLOCK_MONOTONIC` in ns: the clock of the programs' timestamps
/// (`bpf_ktime_get_coarse_ns()`, which lags it by at most a tick).
pub fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime writes into the timespec we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `BPF_MAP_CREATE` of a plain map (no BTF, no inner map): for tests that
/// need a map the object does not define, such as one pinned by a release
/// with another map type or other flags.
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
) -> Result<OwnedFd, SysError> {
    #[repr(C)]
    struct Attr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let mut attr = Attr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: flags,
    };
    // SAFETY: a plain struct, read by the kernel for the call only.
    let fd = unsafe { bpf(Cmd::MapCreate, &mut attr) }?;
    // SAFETY: a new fd the kernel just returned to us, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `BPF_OBJ_PIN`: pins the object behind `fd` at `pin` (in a bpffs).
pub fn obj_pin(fd: BorrowedFd<'_>, pin: &Path) -> Result<(), SysError> {
    let c = c_path(Cmd::ObjPin, pin)?;
    let mut attr = ObjAttr::new(&c, fd.as_raw_fd() as u32);
    // SAFETY: pathname points at a NUL-terminated string that outlives the
    // call.
    unsafe { bpf(Cmd::ObjPin, &mut attr) }
        .map(drop)
        .map_err(|e| e.context(pin.display().to_string()))
}

/// `BPF_OBJ_GET_INFO_BY_FD`: fills `info` with the kernel's info struct of
/// the object behind `fd` (`struct bpf_link_info` for a link, ...). A
/// buffer larger than the kernel's struct is accepted; its tail stays zero.
pub fn obj_get_info_by_fd(fd: BorrowedFd<'_>, info: &mut [u64]) -> Result<(), SysError> {
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = Attr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of_val(info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: info points at info_len writable bytes borrowed for the call.
    unsafe { bpf(Cmd::ObjGetInfoByFd, &mut attr) }.map(drop)
}

/// `BPF_LINK_UPDATE`: replaces the program of a link atomically (no moment
/// without one).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> Result<(), SysError> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: plain integers only.
    unsafe { bpf(Cmd::LinkUpdate, &mut attr) }.map(drop)
}

/// `BPF_PROG_QUERY`: the ids of the programs attached to `target` (a cgroup
/// directory's fd) at `attach_type`, at most `ids.len()`. Returns how many
/// it wrote.
pub fn prog_query(target: BorrowedFd<'_>, attach_type: u32, ids: &mut [u32]) -> Result<usize, SysError> {
    #[repr(C)]
    struct Attr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    let mut attr = Attr {
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
    };
    // SAFETY: prog_ids has room for prog_cnt ids, borrowed for the call.
    unsafe { bpf(Cmd::ProgQuery, &mut attr) }?;
    Ok((attr.prog_cnt as usize).min(ids.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_command_and_keep_the_errno() {
        let e = obj_get(Path::new("/nonexistent/dataplane-pin")).unwrap_err();
        assert_eq!(e.cmd, Cmd::ObjGet);
        assert_eq!(e.errno(), Some(libc::ENOENT));
        let text = e.to_string();
        assert!(text.starts_with("BPF_OBJ_GET (/nonexistent/dataplane-pin): "), "{text}");
    }
}
