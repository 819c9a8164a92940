//! Loading the eBPF object and attaching its programs to interfaces.

use std::{
    os::fd::{AsFd, AsRawFd, RawFd},
    path::Path,
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{tc, SchedClassifier, TcAttachType, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use dataplane_common::{
    map_names, program_names, AffinityKey, AffinityValue, Backend, BackendKey, CtKey, CtValue, DpConfig, MaglevChunk,
    MaglevKey, ServiceKey, ServiceStats, ServiceValue,
};
use thiserror::Error;

/// The object built by `cargo xtask build-ebpf`, embedded at compile time
/// (empty if it was not built before this crate).
static EMBEDDED_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane.bpf.o"));

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(
        "no eBPF object: this binary was built before `cargo xtask build-ebpf`; \
         run `cargo xtask build-ebpf` and rebuild, or pass --bpf-object PATH"
    )]
    NoObject,
    #[error("reading eBPF object {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("loading eBPF object: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {0} is missing from the eBPF object (object and agent from different versions?)")]
    MissingMap(&'static str),
    #[error("attaching {program} to interface {iface}: {source}")]
    Attach {
        program: &'static str,
        iface: String,
        source: aya::programs::ProgramError,
    },
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttachMode {
    /// Let the kernel choose (native when the driver supports it).
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode.
    Generic,
}

impl From<XdpAttachMode> for XdpMode {
    fn from(m: XdpAttachMode) -> Self {
        match m {
            XdpAttachMode::Auto => XdpMode::Default,
            XdpAttachMode::Native => XdpMode::Driver,
            XdpAttachMode::Generic => XdpMode::Skb,
        }
    }
}

/// Typed handles on the dataplane's maps.
pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, BackendKey, Backend>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub maglev: HashMap<MapData, MaglevKey, MaglevChunk>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub config: Array<MapData, DpConfig>,
    pub service_stats: PerCpuArray<MapData, ServiceStats>,
    pub reasons: PerCpuArray<MapData, u64>,
}

impl Maps {
    /// Writes the datapath settings (conntrack timeouts).
    pub fn write_config(&mut self, config: &DpConfig) -> Result<(), LoadError> {
        self.config.set(0, config, 0).map_err(|source| LoadError::Map {
            name: map_names::CONFIG,
            source,
        })
    }
}

/// A loaded dataplane: programs in the kernel, maps open. Dropping it
/// detaches every program it attached.
pub struct Dataplane {
    ebpf: Ebpf,
}

impl Dataplane {
    /// Loads the embedded object, or the one at `path`.
    pub fn load(path: Option<&Path>) -> Result<Self, LoadError> {
        let bytes;
        let object: &[u8] = match path {
            Some(p) => {
                bytes = std::fs::read(p).map_err(|source| LoadError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                &bytes
            }
            None if EMBEDDED_OBJECT.is_empty() => return Err(LoadError::NoObject),
            None => EMBEDDED_OBJECT,
        };
        let mut ebpf = EbpfLoader::new().load(object)?;
        for name in [program_names::XDP, program_names::TC] {
            let prog = ebpf.program_mut(name).ok_or(LoadError::Program {
                name,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?;
            match name {
                program_names::XDP => {
                    let p: &mut Xdp = prog.try_into().map_err(|source| LoadError::Program { name, source })?;
                    p.load().map_err(|source| LoadError::Program { name, source })?;
                }
                _ => {
                    let p: &mut SchedClassifier =
                        prog.try_into().map_err(|source| LoadError::Program { name, source })?;
                    p.load().map_err(|source| LoadError::Program { name, source })?;
                }
            }
        }
        Ok(Dataplane { ebpf })
    }

    /// Takes the maps out of the object (once).
    pub fn take_maps(&mut self) -> Result<Maps, LoadError> {
        fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, LoadError> {
            ebpf.take_map(name).ok_or(LoadError::MissingMap(name))
        }
        let e = &mut self.ebpf;
        let m = |name: &'static str| move |source| LoadError::Map { name, source };
        Ok(Maps {
            services: HashMap::try_from(take(e, map_names::SERVICES)?).map_err(m(map_names::SERVICES))?,
            backends: HashMap::try_from(take(e, map_names::BACKENDS)?).map_err(m(map_names::BACKENDS))?,
            conntrack: HashMap::try_from(take(e, map_names::CONNTRACK)?).map_err(m(map_names::CONNTRACK))?,
            maglev: HashMap::try_from(take(e, map_names::MAGLEV)?).map_err(m(map_names::MAGLEV))?,
            affinity: HashMap::try_from(take(e, map_names::AFFINITY)?).map_err(m(map_names::AFFINITY))?,
            config: Array::try_from(take(e, map_names::CONFIG)?).map_err(m(map_names::CONFIG))?,
            service_stats: PerCpuArray::try_from(take(e, map_names::SERVICE_STATS)?)
                .map_err(m(map_names::SERVICE_STATS))?,
            reasons: PerCpuArray::try_from(take(e, map_names::REASON_STATS)?).map_err(m(map_names::REASON_STATS))?,
        })
    }

    /// The file descriptor of a loaded program, for BPF_PROG_TEST_RUN.
    pub fn program_fd(&self, name: &'static str) -> Result<RawFd, LoadError> {
        let prog = self.ebpf.program(name).ok_or(LoadError::Program {
            name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?;
        let fd = prog.fd().map_err(|source| LoadError::Program { name, source })?;
        Ok(fd.as_fd().as_raw_fd())
    }

    /// Attaches the XDP program to `iface`.
    pub fn attach_xdp(&mut self, iface: &str, mode: XdpAttachMode) -> Result<(), LoadError> {
        let name = program_names::XDP;
        let p: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .expect("loaded in Dataplane::load")
            .try_into()
            .map_err(|source| LoadError::Program { name, source })?;
        p.attach(iface, mode.into()).map_err(|source| LoadError::Attach {
            program: name,
            iface: iface.to_string(),
            source,
        })?;
        Ok(())
    }

    /// Attaches the TC program to the ingress of `iface`: a tcx link where
    /// the kernel has them (6.6+), else a clsact qdisc filter.
    /// Returns which of the two was used.
    pub fn attach_tc(&mut self, iface: &str) -> Result<TcMode, LoadError> {
        let name = program_names::TC;
        let p: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .expect("loaded in Dataplane::load")
            .try_into()
            .map_err(|source| LoadError::Program { name, source })?;
        let attach_err = |source| LoadError::Attach {
            program: name,
            iface: iface.to_string(),
            source,
        };
        match p.attach_with_options(
            iface,
            TcAttachType::Ingress,
            tc::TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default()),
        ) {
            Ok(_) => Ok(TcMode::Tcx),
            Err(tcx_err) => {
                tracing::debug!(iface, error = %tcx_err, "tcx attach failed, falling back to clsact");
                // EEXIST: the qdisc is already there, which is fine.
                let _ = tc::qdisc_add_clsact(iface);
                p.attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    tc::TcAttachOptions::Netlink(tc::NlOptions::default()),
                )
                .map_err(attach_err)?;
                Ok(TcMode::Clsact)
            }
        }
    }
}

/// How the TC program got attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcMode {
    Tcx,
    Clsact,
}

impl std::fmt::Display for TcMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TcMode::Tcx => "tcx",
            TcMode::Clsact => "clsact",
        })
    }
}
